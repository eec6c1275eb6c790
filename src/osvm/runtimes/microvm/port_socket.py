"""Connecting to the Unix socket that QEMU serves for one of a VM's virtio-serial ports."""

import asyncio
import logging
from pathlib import Path

logger = logging.getLogger("osvm.runtimes.microvm")

# QEMU creates its sockets within a few milliseconds of starting; this bounds a QEMU stuck before that.
CONNECT_TIMEOUT = 30.0
CONNECT_RETRY_INTERVAL = 0.01


async def connect_port_socket(
    port_socket: Path, qemu_exited: "asyncio.Future[None]", instance_id: str, port_name: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """Connect to QEMU's socket for a virtio-serial port once QEMU has created it.

    Returns None when QEMU exits first, or logs an error and returns None after CONNECT_TIMEOUT.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT
    while not qemu_exited.done():
        try:
            return await asyncio.open_unix_connection(str(port_socket))
        except (FileNotFoundError, ConnectionRefusedError) as error:
            if loop.time() >= deadline:
                logger.error(
                    "instance %s: failed to connect to the %s port socket %s within %.0f s: %s",
                    instance_id, port_name, port_socket, CONNECT_TIMEOUT, error,
                )
                return None
            await asyncio.sleep(CONNECT_RETRY_INTERVAL)
    return None
