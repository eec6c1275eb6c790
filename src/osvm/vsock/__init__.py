"""Host-guest streams for microVMs: CID and port allocation, and Firecracker's hybrid vsock contract.

No code in this package creates an AF_VSOCK socket. Host programs reach guests through Unix
sockets: Firecracker's own vsock device, or HybridVsockMux over a virtio-serial agent stream.
"""

from osvm.vsock.allocation import (
    FIRST_GUEST_CID,
    VMADDR_CID_HOST,
    AllocationError,
    CidAllocator,
    PortAllocator,
)
from osvm.vsock.errors import GuestPortRefused, ProtocolError, VsockConnectError, VsockError
from osvm.vsock.guest import GuestMux
from osvm.vsock.hybrid import GuestPortServer, HybridVsockMux, connect, guest_port_path, serve_guest_port
from osvm.vsock.mux import ChannelRefused
from osvm.vsock.transport import select_transport

__all__ = [
    "FIRST_GUEST_CID",
    "VMADDR_CID_HOST",
    "AllocationError",
    "ChannelRefused",
    "CidAllocator",
    "GuestMux",
    "GuestPortRefused",
    "GuestPortServer",
    "HybridVsockMux",
    "PortAllocator",
    "ProtocolError",
    "VsockConnectError",
    "VsockError",
    "connect",
    "guest_port_path",
    "select_transport",
    "serve_guest_port",
]
