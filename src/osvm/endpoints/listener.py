"""Binding an endpoint's listen address: TCP host:port or a Unix socket file."""

import asyncio
import errno
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

from osvm.endpoints.backends import format_host_port

# Owner and group may connect. Connecting to a Unix socket needs write permission on its file.
UNIX_SOCKET_MODE = 0o660
BACKLOG = 1024


class EndpointError(Exception):
    """An endpoint failed to start, such as a listen address that is in use."""


@dataclass(frozen=True)
class ListenAddress:
    """A parsed listen address: `path` for a Unix socket, otherwise `host` and `port`."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)


def parse_listen(listen: str) -> ListenAddress:
    """Parse "host:port", "[v6]:port" or "unix:/path", raising EndpointError for any other form."""
    if listen.startswith("unix:"):
        path = listen[len("unix:"):]
        if not path.startswith("/"):
            raise EndpointError(f"invalid listen address {listen!r}: write an absolute path such as unix:/run/osvm/rpc.sock")
        return ListenAddress(path=path)

    host, separator, port_text = listen.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise EndpointError(f"invalid listen address {listen!r}: write \"127.0.0.1:8545\", \"[::1]:8545\" or \"unix:/path\"")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise EndpointError(f"invalid listen port {port} in {listen!r}: use 0 to 65535")
    return ListenAddress(host=host, port=port)


async def bind_tcp(
    protocol_factory: Callable[[], asyncio.Protocol], address: ListenAddress, listen: str
) -> tuple[asyncio.AbstractServer, str]:
    """Start a TCP server on the address and return it with the bound address, such as "127.0.0.1:40123"."""
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(
            protocol_factory, address.host, address.port, reuse_address=True, backlog=BACKLOG
        )
    except socket.gaierror as exc:
        raise EndpointError(
            f"failed to resolve the host in listen address {listen}: {exc.strerror}: use an IP address such as 127.0.0.1"
        ) from exc
    except OSError as exc:
        raise EndpointError(describe_bind_error(exc, listen)) from exc

    bound = server.sockets[0].getsockname()
    return server, format_host_port(bound[0], bound[1])


async def bind_unix(
    protocol_factory: Callable[[], asyncio.Protocol], path: str, listen: str
) -> tuple[asyncio.AbstractServer, tuple[int, int]]:
    """Start a server on a Unix socket file with mode 0660, and return it with the file's (st_dev, st_ino).

    A socket file that no process listens on is left over from an earlier run and is removed.
    The file identity lets stop() remove only the file that this server created.
    """
    remove_stale_socket(path, listen)

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # chmod before listen(), so no connection is accepted while the file has another mode.
        os.chmod(path, UNIX_SOCKET_MODE)
        file_status = os.stat(path)
    except OSError as exc:
        sock.close()
        raise EndpointError(describe_bind_error(exc, listen)) from exc

    try:
        server = await asyncio.get_running_loop().create_unix_server(protocol_factory, sock=sock, backlog=BACKLOG)
    except OSError as exc:
        sock.close()
        remove_socket_file(path, (file_status.st_dev, file_status.st_ino))
        raise EndpointError(describe_bind_error(exc, listen)) from exc
    return server, (file_status.st_dev, file_status.st_ino)


def remove_stale_socket(path: str, listen: str) -> None:
    """Remove a socket file at path unless a process accepts connections on it."""
    try:
        file_status = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise EndpointError(describe_bind_error(exc, listen)) from exc

    if not stat.S_ISSOCK(file_status.st_mode):
        raise EndpointError(
            f"cannot listen on {listen}: {path} exists and is not a socket: remove it or choose another endpoint.listen"
        )

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A listener whose backlog is full blocks connect() instead of accepting.
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        # Nothing listens: the file is left over from a process that exited.
        pass
    except TimeoutError as exc:
        raise EndpointError(
            f"address {listen} is in use: stop what listens there or choose another endpoint.listen"
        ) from exc
    except OSError as exc:
        raise EndpointError(describe_bind_error(exc, listen)) from exc
    else:
        raise EndpointError(
            f"address {listen} is in use: stop what listens there or choose another endpoint.listen"
        )
    finally:
        probe.close()

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise EndpointError(f"cannot remove the stale socket file {path}: {exc.strerror}: remove it by hand") from exc


def remove_socket_file(path: str, identity: tuple[int, int] | None) -> None:
    """Remove the socket file if it is still the one with identity (st_dev, st_ino)."""
    try:
        file_status = os.lstat(path)
        if identity is None or (file_status.st_dev, file_status.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass


def describe_bind_error(exc: OSError, listen: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"address {listen} is in use: stop what listens there or choose another endpoint.listen"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"address {listen} is not assigned to this host: use an address of a local interface, "
            f"such as 127.0.0.1, or 0.0.0.0 for all"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied to listen on {listen}: use a port above 1023 or give osvm CAP_NET_BIND_SERVICE, "
            f"and for a socket file choose a directory that osvm can write to"
        )
    if exc.errno == errno.ENOENT:
        return f"cannot listen on {listen}: the directory does not exist: create it or choose another endpoint.listen"
    return f"cannot listen on {listen}: {exc.strerror or exc}"
