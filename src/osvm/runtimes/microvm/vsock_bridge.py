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

from osvm.runtimes.microvm.port_socket import connect_port_socket
from osvm.vsock import HybridVsockMux

logger = logging.getLogger("osvm.runtimes.microvm")



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
