"""Probe target: the address, named ports and exec wrapper of one running instance."""

from dataclasses import dataclass, field


class ProbeConfigError(ValueError):
    """A probe refers to something the target does not provide, such as an unknown port name."""


@dataclass(frozen=True)
class ProbeTarget:
    """The running instance that probes check.

    `host` is the address to connect to, such as "127.0.0.1" or the instance's veth address.
    `ports` maps port names to the numbers allocated for this instance, so a probe's `port`
    may be a name from it or a number. `exec_prefix` is the argument vector prefix that runs
    an exec probe inside the instance (such as nsenter and setpriv), and () runs the command
    directly. `env` is added to the environment of exec probes.
    """

    host: str
    ports: dict[str, int]
    exec_prefix: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def resolve_port(target: ProbeTarget, port: int | str) -> int:
    """Return the port number for a probe's `port`, which is a number or a name from target.ports.

    Raises ProbeConfigError when the name is not in target.ports or maps to 0 (not allocated).
    """
    if isinstance(port, int):
        return port

    if port not in target.ports:
        known = ", ".join(sorted(target.ports)) or "none"
        raise ProbeConfigError(f"port name {port!r} is not in the instance's ports (known: {known})")

    number = target.ports[port]
    if number == 0:
        raise ProbeConfigError(f"port {port!r} has no number allocated (0): allocate the port before probing")
    return number


def url_host(host: str) -> str:
    """Return the host as written in a URL, with an IPv6 address in square brackets."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def format_address(host: str, port: int) -> str:
    """Return "host:port", with an IPv6 address in square brackets."""
    return f"{url_host(host)}:{port}"


def endpoint_url(host: str, port: int, path: str) -> str:
    """Return "http://host:port/path", adding the leading "/" to a path without one."""
    if not path.startswith("/"):
        path = "/" + path
    return f"http://{format_address(host, port)}{path}"
