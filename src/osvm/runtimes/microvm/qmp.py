"""Short QMP sessions with QEMU through the qemu.qmp library: connect, run one command, disconnect.

QEMU's QMP socket serves one client at a time, so the daemon keeps no connection open.
"""

import asyncio
import concurrent.futures
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

QMP_TIMEOUT = 5.0


class QmpFailure(Exception):
    """QEMU's QMP socket could not be reached, timed out or returned an error."""


async def qmp_execute(socket_path: Path, command: str, timeout: float = QMP_TIMEOUT) -> Any:
    """Run one QMP command and return its result.

    Raises QmpFailure when the socket cannot be reached, QEMU returns an error, or no reply
    arrives within timeout seconds.
    """
    client = QMPClient(f"osvm-{socket_path.parent.name}")
    try:
        async with asyncio.timeout(timeout):
            await client.connect(str(socket_path))
            return await client.execute(command)
    except EOFError:
        # QEMU closes the connection while it exits, which a successful "quit" does at once.
        if command == "quit":
            return None
        raise QmpFailure(f"QMP {command} on {socket_path} failed: QEMU closed the connection") from None
    except (OSError, QMPError, TimeoutError) as error:
        raise QmpFailure(f"QMP {command} on {socket_path} failed: {error or type(error).__name__}") from None
    finally:
        try:
            await client.disconnect()
        except (OSError, QMPError, EOFError):
            pass


def qmp_execute_blocking(socket_path: Path, command: str, timeout: float = QMP_TIMEOUT) -> Any:
    """Run one QMP command from synchronous code, even inside a running event loop.

    The command runs on its own event loop in a worker thread. Raises QmpFailure like qmp_execute.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(asyncio.run, qmp_execute(socket_path, command, timeout))
        try:
            return future.result(timeout + 1.0)
        except concurrent.futures.TimeoutError:
            raise QmpFailure(f"QMP {command} on {socket_path} timed out after {timeout:g} s") from None
