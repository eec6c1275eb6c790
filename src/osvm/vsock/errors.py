"""Errors of the vsock package."""


class VsockError(Exception):
    """A vsock connection, listener or multiplexer failed; the message names the socket or port and the reason."""


class VsockConnectError(VsockError):
    """A host program could not open a stream to a guest port."""


class GuestPortRefused(VsockConnectError):
    """The guest has no listener on the port, so the VMM or the multiplexer closed the connection."""

    def __init__(self, port: int, uds_path: str):
        self.port = port
        self.uds_path = uds_path
        super().__init__(
            f"guest port {port} refused the connection through {uds_path}: "
            f"nothing listens on vsock port {port} in the guest"
        )


class ProtocolError(VsockError):
    """A peer sent bytes that break the hybrid vsock handshake or the multiplexer framing."""
