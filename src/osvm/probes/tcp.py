"""TCP probe: the port accepts a connection."""

import asyncio

from osvm.config.models import TcpProbe
from osvm.probes.errors import describe_connection_error
from osvm.probes.target import ProbeTarget, format_address, resolve_port


async def check_tcp(probe: TcpProbe, target: ProbeTarget) -> tuple[bool, str]:
    """Connect to the probe's port, close the connection, and return whether it passed and a detail.

    The caller bounds the time with probe.timeout. Raises ProbeConfigError for an unknown port name.
    """
    port = resolve_port(target, probe.port)

    try:
        _reader, writer = await asyncio.open_connection(target.host, port)
    except OSError as exc:
        return False, describe_connection_error(exc, target.host, port)

    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        # The connection was accepted, which is all this probe checks. A reset while closing
        # does not change that.
        pass
    return True, f"connected to {format_address(target.host, port)}"
