"""One probe run: dispatch by probe type, timeout and error handling."""

import asyncio
import logging
import time
from typing import Any

import httpx

from osvm.config.units import format_duration
from osvm.probes.describe import describe_action
from osvm.probes.exec import check_exec
from osvm.probes.http import check_http, new_http_client
from osvm.probes.jsonrpc import check_jsonrpc
from osvm.probes.result import ProbeResult
from osvm.probes.solana import check_solana
from osvm.probes.target import ProbeConfigError, ProbeTarget
from osvm.probes.tcp import check_tcp

HTTP_PROBE_TYPES = frozenset({"http", "jsonrpc", "solana"})

logger = logging.getLogger("osvm.probes")

# Unexpected errors are logged with a traceback once per probe type and exception class,
# then at debug level, because a probe that hits a bug repeats it on every run.
_logged_internal_errors: set[tuple[str, str]] = set()


async def run_probe(probe: Any, target: ProbeTarget, *, client: httpx.AsyncClient | None = None) -> ProbeResult:
    """Run the probe once against the target and return its result.

    The whole run is bounded by probe.timeout. Every failure, including a timeout, an
    unknown port name and an unexpected error, becomes a failed result, so only
    asyncio.CancelledError is raised. HTTP-based probes use `client`, or a new client
    that is closed before returning.
    """
    started = time.monotonic()
    kind = getattr(probe, "type", None)
    own_client: httpx.AsyncClient | None = None
    try:
        if client is None and kind in HTTP_PROBE_TYPES:
            own_client = client = new_http_client()
        async with asyncio.timeout(probe.timeout):
            ok, detail = await _check(probe, target, client)
    except TimeoutError:
        ok, detail = False, _describe_timeout(probe, target)
    except ProbeConfigError as exc:
        ok, detail = False, str(exc)
    except Exception as exc:
        ok, detail = False, f"probe failed with an internal error: {type(exc).__name__}: {exc}"
        _log_internal_error(kind, exc)
    finally:
        if own_client is not None:
            await own_client.aclose()
    return ProbeResult(ok=ok, detail=detail, duration=time.monotonic() - started)


async def _check(probe: Any, target: ProbeTarget, client: httpx.AsyncClient | None) -> tuple[bool, str]:
    kind = getattr(probe, "type", None)
    if kind == "http":
        return await check_http(probe, target, client)
    if kind == "jsonrpc":
        return await check_jsonrpc(probe, target, client)
    if kind == "solana":
        return await check_solana(probe, target, client)
    if kind == "tcp":
        return await check_tcp(probe, target)
    if kind == "exec":
        return await check_exec(probe, target)
    raise ProbeConfigError(f"unknown probe type {kind!r}: use http, jsonrpc, solana, tcp or exec")


def _describe_timeout(probe: Any, target: ProbeTarget) -> str:
    detail = f"{describe_action(probe, target)} timed out after {format_duration(probe.timeout)}"
    if probe.type == "exec":
        detail += ", its process group was killed"
    return detail


def _log_internal_error(kind: str | None, exc: Exception) -> None:
    key = (str(kind), type(exc).__name__)
    if key in _logged_internal_errors:
        logger.debug("%s probe failed with an internal error again: %r", kind, exc)
        return
    _logged_internal_errors.add(key)
    logger.error(
        "%s probe failed with an internal error, later repeats are logged at debug level: %r",
        kind,
        exc,
        exc_info=exc,
    )
