"""Solana RPC node health: the /health endpoint, the getHealth method, and the current slot."""

import asyncio

import httpx

from osvm.config.models import SolanaProbe
from osvm.config.units import format_duration
from osvm.probes.errors import describe_http_error
from osvm.probes.http import new_http_client, send_request
from osvm.probes.jsonrpc import InvalidJsonRpcResponse, JsonRpcCallError, JsonRpcError, call_jsonrpc, json_snippet
from osvm.probes.target import ProbeTarget, endpoint_url, format_address, resolve_port
from osvm.probes.text import snippet

# JSON-RPC error code of getHealth when the node is behind the cluster or its health is unknown.
NODE_UNHEALTHY_CODE = -32005


async def check_solana(probe: SolanaProbe, target: ProbeTarget, client: httpx.AsyncClient) -> tuple[bool, str]:
    """Run a Solana probe and return whether it passed and a readable detail.

    GET health_path must return status 200 and the body "ok". Any other body, such as
    "behind" or "unknown", fails even with status 200. With get_health, the getHealth
    method must then return "ok" as well. Raises ProbeConfigError for an unknown port name.
    """
    port = resolve_port(target, probe.port)
    health_url = endpoint_url(target.host, port, probe.health_path)
    request = f"GET {health_url}"

    try:
        status, body = await send_request(client, "GET", health_url, timeout=probe.timeout)
    except httpx.HTTPError as exc:
        return False, describe_http_error(exc, request, target.host, port, probe.timeout)

    if status != 200:
        return False, f"HTTP {status} from {request}, body {snippet(body)}"
    if body.strip() != "ok":
        return False, f"body {snippet(body)} from {request} is not 'ok'"

    if not probe.get_health:
        return True, f"{request} returned 'ok'"

    rpc_url = endpoint_url(target.host, port, probe.rpc_path)
    try:
        result = await call_jsonrpc(client, rpc_url, "getHealth", timeout=probe.timeout)
    except JsonRpcError as exc:
        if exc.code == NODE_UNHEALTHY_CODE:
            return False, f"{_describe_unhealthy(exc)}: {exc}"
        return False, str(exc)
    except JsonRpcCallError as exc:
        return False, str(exc)

    if result != "ok":
        return False, f"getHealth returned {json_snippet(result)}, expected \"ok\""
    return True, f"{request} returned 'ok' and getHealth returned \"ok\""


def _describe_unhealthy(error: JsonRpcError) -> str:
    slots_behind = error.data.get("numSlotsBehind") if isinstance(error.data, dict) else None
    if isinstance(slots_behind, int):
        return f"node is behind by {slots_behind} slots"
    return "node is unhealthy"


async def get_slot(
    host: str,
    port: int,
    path: str = "/",
    timeout: float = 2.0,
    *,
    commitment: str | None = None,
    client: httpx.AsyncClient | None = None,
) -> int:
    """Call getSlot on the node at host:port and return the slot.

    `commitment` is "processed", "confirmed" or "finalized", and None leaves the node's
    default. `timeout` in seconds bounds the whole call. Without `client` a new one is
    made and closed. Raises JsonRpcCallError, with a readable message, on every failure:
    JsonRpcError when the node returns an error, InvalidJsonRpcResponse when the result
    is not a slot number.
    """
    url = endpoint_url(host, port, path)
    params = [{"commitment": commitment}] if commitment is not None else None

    own_client = client is None
    http_client = new_http_client() if client is None else client
    try:
        async with asyncio.timeout(timeout):
            result = await call_jsonrpc(http_client, url, "getSlot", params, timeout=timeout)
    except TimeoutError:
        raise JsonRpcCallError(
            f"getSlot on {format_address(host, port)} timed out after {format_duration(timeout)}"
        ) from None
    finally:
        if own_client:
            await http_client.aclose()

    # bool is a subclass of int but never a slot.
    if not isinstance(result, int) or isinstance(result, bool) or result < 0:
        raise InvalidJsonRpcResponse(f"getSlot returned {json_snippet(result)}, expected a slot number")
    return result
