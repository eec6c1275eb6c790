"""HTTP probe: a request whose status code and body decide health."""

from typing import Any

import httpx

from osvm.config.models import HttpProbe
from osvm.probes.errors import describe_http_error
from osvm.probes.target import ProbeTarget, endpoint_url, resolve_port
from osvm.probes.text import snippet

# Bodies are read up to this size. A health endpoint that returns more is unusual, and the
# cap keeps a misbehaving server from filling memory.
MAX_BODY_BYTES = 1 << 20


async def send_request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
    json_body: Any = None,
) -> tuple[int, str]:
    """Send one request and return the status code and the body decoded as text.

    The body is cut at MAX_BODY_BYTES. Raises httpx.HTTPError on transport failures.
    """
    async with client.stream(method, url, headers=headers, json=json_body, timeout=timeout) as response:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= MAX_BODY_BYTES:
                break
        return response.status_code, _decode(bytes(body[:MAX_BODY_BYTES]), response.charset_encoding)


def _decode(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def describe_expected_status(expect_status: list[int]) -> str:
    """Return the accepted status codes as text, such as "200 to 399" or "200 or 204"."""
    if not expect_status:
        return "200 to 399"
    codes = [str(code) for code in expect_status]
    if len(codes) == 1:
        return codes[0]
    return ", ".join(codes[:-1]) + " or " + codes[-1]


def status_accepted(status: int, expect_status: list[int]) -> bool:
    """Return whether the status code passes, where an empty list accepts 200 to 399."""
    if not expect_status:
        return 200 <= status <= 399
    return status in expect_status


async def check_http(probe: HttpProbe, target: ProbeTarget, client: httpx.AsyncClient) -> tuple[bool, str]:
    """Run an HTTP probe and return whether it passed and a readable detail.

    Raises ProbeConfigError for an unknown port name.
    """
    port = resolve_port(target, probe.port)
    url = endpoint_url(target.host, port, probe.path)
    request = f"{probe.method} {url}"

    try:
        status, body = await send_request(client, probe.method, url, headers=probe.headers, timeout=probe.timeout)
    except httpx.HTTPError as exc:
        return False, describe_http_error(exc, request, target.host, port, probe.timeout)

    if not status_accepted(status, probe.expect_status):
        expected = describe_expected_status(probe.expect_status)
        detail = f"HTTP {status} from {request}, expected {expected}"
        if body.strip():
            detail += f", body {snippet(body)}"
        return False, detail

    if probe.body_contains is not None and probe.body_contains not in body:
        return False, f"body of {request} does not contain {probe.body_contains!r}: {snippet(body)}"

    return True, f"HTTP {status} from {request}"


def new_http_client() -> httpx.AsyncClient:
    """Create the HTTP client for probes.

    trust_env=False keeps HTTP_PROXY and similar variables from sending probes of local
    instances through a proxy. Each request passes its own timeout.
    """
    return httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=None)
