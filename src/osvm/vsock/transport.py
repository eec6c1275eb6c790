"""Choice of the host-guest stream transport for a microVM."""

import os
from typing import Literal

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"

Transport = Literal["vhost-vsock", "virtio-serial"]


def select_transport(device: str = VHOST_VSOCK_DEVICE) -> Transport:
    """Return "vhost-vsock" when the vhost-vsock device node exists, else "virtio-serial".

    Only the existence of the node is checked: this never opens it and never creates an AF_VSOCK
    socket. With "virtio-serial", the QEMU runtime carries guest streams over one virtio-serial
    port and HybridVsockMux gives host programs the same Unix socket contract as Firecracker.

    NOTE: an existing node can still fail to open (permissions, or the vhost_vsock module in use
    by another hypervisor). The runtime that opens it must report that failure.
    """
    return "vhost-vsock" if os.path.exists(device) else "virtio-serial"
