"""Readable descriptions of connection and HTTP transport failures."""

import errno
import socket

import httpx

from osvm.config.units import format_duration
from osvm.probes.target import format_address

_UNREACHABLE_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}


def describe_connection_error(exc: BaseException, host: str, port: int) -> str:
    """Describe why a connection to host:port failed, such as "connection refused on 127.0.0.1:6379".

    Looks through the exception's cause chain, because httpx wraps the OSError of the
    socket in its own ConnectError whose message is only "All connection attempts failed".
    """
    address = format_address(host, port)
    for cause in _cause_chain(exc):
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused on {address}"
        if isinstance(cause, ConnectionResetError):
            return f"connection reset by {address}"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve host {host!r}: {cause.strerror or cause}"
        if isinstance(cause, OSError) and cause.errno in _UNREACHABLE_ERRNOS:
            return f"host unreachable for {address}: {cause.strerror}"
    return f"connection to {address} failed: {_message(exc)}"


def describe_http_error(exc: httpx.HTTPError, request: str, host: str, port: int, timeout: float) -> str:
    """Describe a failed HTTP request to host:port, where `request` reads like "GET http://127.0.0.1:8899/health"."""
    if isinstance(exc, httpx.TimeoutException):
        return f"{request} timed out after {format_duration(timeout)}"

    if isinstance(exc, httpx.ConnectError):
        return describe_connection_error(exc, host, port)

    for cause in _cause_chain(exc):
        if isinstance(cause, ConnectionResetError):
            return f"{request} failed: connection reset by the server"
    return f"{request} failed: {_message(exc)}"


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain
