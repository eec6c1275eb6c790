"""Short readable names of probes and of what a probe run does, for reasons, details and status."""

from typing import Any

from osvm.probes.exec import display_command
from osvm.probes.target import ProbeConfigError, ProbeTarget, endpoint_url, format_address, resolve_port


def describe_probe(probe: Any) -> str:
    """Return a short name such as "jsonrpc eth_blockNumber on port rpc" or "tcp on port 6379"."""
    kind = getattr(probe, "type", type(probe).__name__)
    on_port = f"on port {getattr(probe, 'port', '?')}"
    if kind == "http":
        return f"http {probe.method} {probe.path} {on_port}"
    if kind == "jsonrpc":
        return f"jsonrpc {probe.method} {on_port}"
    if kind in ("solana", "tcp"):
        return f"{kind} {on_port}"
    if kind == "exec":
        return f"exec {display_command(probe.command)}"
    return str(kind)


def describe_action(probe: Any, target: ProbeTarget) -> str:
    """Return what one run of the probe does, such as "GET http://127.0.0.1:8899/health", for timeout details."""
    kind = getattr(probe, "type", None)
    if kind == "exec":
        return display_command(probe.command)

    try:
        port = resolve_port(target, probe.port)
    except ProbeConfigError:
        return describe_probe(probe)

    if kind == "http":
        return f"{probe.method} {endpoint_url(target.host, port, probe.path)}"
    if kind == "jsonrpc":
        return f"JSON-RPC {probe.method} on {endpoint_url(target.host, port, probe.path)}"
    if kind == "solana":
        return f"Solana health check of {format_address(target.host, port)}"
    if kind == "tcp":
        return f"connect to {format_address(target.host, port)}"
    return describe_probe(probe)
