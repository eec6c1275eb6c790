"""The host end of a microVM's "osvm.vsock" port: Firecracker's hybrid vsock contract on vsock.sock.

QEMU serves the port on <instance_dir>/vsock-port.sock. The bridge connects to it once QEMU has
created it and runs HybridVsockMux there, which listens on <instance_dir>/vsock.sock. A host
client connects to vsock.sock, sends `CONNECT <port>\\n` and reads `OK <host_port>\\n`, and the
guest agent joins the stream to the guest's TCP listener on 127.0.0.1:<port>. In the other
direction, a guest program connects to 127.0.0.1:P for a port P in vm.host_ports, and the
multiplexer joins that stream to <instance_dir>/vsock.sock_<P>.
"""

import asyncio
import contextlib
import glob
import logging
import os
from pathlib import Path

from osvm.vsock import HybridVsockMux

logger = logging.getLogger("osvm.runtimes.microvm")

# QEMU creates its sockets within a few milliseconds of starting; this bounds a QEMU stuck before that.
CONNECT_TIMEOUT = 30.0
CONNECT_RETRY_INTERVAL = 0.01


class VsockBridge:
    """One HybridVsockMux between vsock.sock and the agent's vsock port, kept until QEMU exits or close()."""

    def __init__(self, port_socket: Path, uds_path: Path, instance_id: str, host_ports: list[int] | None = None):
        self.port_socket = port_socket
        self.uds_path = uds_path
        self.instance_id = instance_id
        # vm.host_ports: the only host ports that guest programs may open channels to.
        self.host_ports = set(host_ports or [])
        self.mux: HybridVsockMux | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, qemu_exited: "asyncio.Future[None]") -> None:
        """Start the background task that connects to QEMU's port socket and runs the multiplexer."""
        self._task = asyncio.get_running_loop().create_task(self._run(qemu_exited), name=f"vsock-{self.instance_id}")

    async def close(self) -> None:
        """Stop the multiplexer, which closes every host client and removes vsock.sock."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.mux is not None:
            await self.mux.close()
            self.mux = None

    async def _run(self, qemu_exited: "asyncio.Future[None]") -> None:
        streams = await connect_port_socket(self.port_socket, qemu_exited, self.instance_id, "vsock")
        if streams is None:
            return
        reader, writer = streams
        mux = HybridVsockMux(self.uds_path, reader, writer, guest_ports=self.host_ports)
        try:
            await mux.start()
        except OSError as error:
            logger.error("instance %s: cannot listen on %s: %s", self.instance_id, self.uds_path, error)
            writer.close()
            return
        self.mux = mux
        # The multiplexer ends by itself when QEMU exits and closes the port socket.
        await mux.wait_closed()



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
                    "instance %s: cannot connect to the %s port socket %s within %.0f s: %s",
                    instance_id, port_name, port_socket, CONNECT_TIMEOUT, error,
                )
                return None
            await asyncio.sleep(CONNECT_RETRY_INTERVAL)
    return None


def remove_vsock_sockets(instance_dir: Path, listeners: bool = True) -> None:
    """Remove vsock.sock and QEMU's vsock-port.sock, and with listeners the host programs' vsock.sock_<P>.

    A restart of the VM keeps the vsock.sock_<P> sockets, because the host programs that listen
    there outlive it.
    """
    paths = [instance_dir / "vsock.sock", instance_dir / "vsock-port.sock"]
    if listeners:
        paths += [Path(path) for path in glob.glob(glob.escape(os.fspath(instance_dir / "vsock.sock")) + "_*")]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
