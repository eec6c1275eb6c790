"""JSON-RPC 2.0 calls over HTTP, and the probe that makes one."""

import itertools
import json
from typing import Any

import httpx

from osvm.config.models import JsonRpcProbe
from osvm.probes.errors import describe_http_error
from osvm.probes.http import send_request
from osvm.probes.target import ProbeTarget, endpoint_url, resolve_port
from osvm.probes.text import snippet

_request_ids = itertools.count(1)


class JsonRpcCallError(Exception):
    """A JSON-RPC call returned no result: transport failure, timeout, invalid response or error member."""


class JsonRpcError(JsonRpcCallError):
    """The response contained an "error" member."""

    def __init__(self, method: str, code: Any, message: Any, data: Any = None) -> None:
        self.method = method
        self.code = code
        self.message = message
        self.data = data
        text = f"{method} returned JSON-RPC error {code}: {message}"
        if data is not None:
            text += f", data {json_snippet(data)}"
        super().__init__(text)


class InvalidJsonRpcResponse(JsonRpcCallError):
    """The response was not a JSON-RPC response object."""


def json_snippet(value: Any, limit: int = 200) -> str:
    """Return the value as compact JSON, cut to `limit` characters with "..." appended."""
    text = json.dumps(value, separators=(",", ":"), default=str)
    if len(text) > limit:
        return text[:limit] + "..."
    return text


async def call_jsonrpc(
    client: httpx.AsyncClient,
    url: str,
    method: str,
    params: list[Any] | dict[str, Any] | None = None,
    *,
    timeout: float,
) -> Any:
    """POST one JSON-RPC 2.0 request to `url` and return its "result" member.

    Raises JsonRpcError when the response has an "error" member, InvalidJsonRpcResponse when
    the response is not a JSON-RPC response, and JsonRpcCallError on transport failure or timeout.
    The message of each is a readable detail.
    """
    payload: dict[str, Any] = {"jsonrpc": "2.0", "id": next(_request_ids), "method": method}
    if params is not None:
        payload["params"] = params
    request = f"POST {url} ({method})"

    try:
        status, body = await send_request(client, "POST", url, json_body=payload, timeout=timeout)
    except httpx.HTTPError as exc:
        parsed = httpx.URL(url)
        raise JsonRpcCallError(describe_http_error(exc, request, parsed.host, parsed.port or 80, timeout)) from exc

    try:
        response = json.loads(body)
    except ValueError:
        raise InvalidJsonRpcResponse(f"HTTP {status} from {request}, body is not JSON: {snippet(body)}") from None

    # Servers send JSON-RPC errors with status 200, and some with 4xx or 5xx. The error member
    # is reported first because it carries more detail than the status code.
    if isinstance(response, dict) and "error" in response:
        error = response["error"]
        if isinstance(error, dict):
            raise JsonRpcError(method, error.get("code"), error.get("message"), error.get("data"))
        raise JsonRpcError(method, None, error)

    if not 200 <= status <= 299:
        raise InvalidJsonRpcResponse(f"HTTP {status} from {request}, body {snippet(body)}")
    if not isinstance(response, dict):
        raise InvalidJsonRpcResponse(f"response to {request} is not a JSON object: {snippet(body)}")
    if "result" not in response:
        raise InvalidJsonRpcResponse(f"response to {request} has neither result nor error: {snippet(body)}")
    return response["result"]


async def check_jsonrpc(probe: JsonRpcProbe, target: ProbeTarget, client: httpx.AsyncClient) -> tuple[bool, str]:
    """Run a JSON-RPC probe and return whether it passed and a readable detail.

    Without expect_result any result passes. Raises ProbeConfigError for an unknown port name.
    """
    port = resolve_port(target, probe.port)
    url = endpoint_url(target.host, port, probe.path)

    try:
        result = await call_jsonrpc(client, url, probe.method, probe.params, timeout=probe.timeout)
    except JsonRpcCallError as exc:
        return False, str(exc)

    if probe.expect_result is not None and result != probe.expect_result:
        return False, f"{probe.method} returned {json_snippet(result)}, expected {json_snippet(probe.expect_result)}"
    return True, f"{probe.method} returned {json_snippet(result)}"
