"""Closed-loop JSON-RPC load generator: N clients, each sending eth_blockNumber and waiting for the response.

It runs on uvloop with asyncio protocols and a small HTTP/1.1 response parser of its own (status
line, Content-Length or chunked body, Connection: close), so it spends little CPU per request.
Each request is recorded with its start time (time.monotonic(), which is CLOCK_MONOTONIC on Linux
and so comparable with the clocks of other processes on the host), its latency and its outcome.

A request fails on a connect error, a reset or early close, a timeout, a status other than 200,
or a body that is not a JSON-RPC response with a `result` and no `error`. After a failure the
client waits --failure-pause seconds before its next request, so a port with no server is not
hit in a busy loop. The failure count therefore depends on that pause.

Modes:
  keep-alive      each client keeps one connection open and reconnects only after it closed or failed
  new-connection  each request opens a connection, sends `Connection: close` and ends with the close

The run ends after --duration seconds, when standard input reaches end of file (with --until-eof),
on SIGTERM or SIGINT, and at the latest after --max-duration seconds. The output file starts with
one JSON line that describes the arrays after it (see write_records()). A JSON summary is printed
to stdout at the end.
"""

import argparse
import array
import asyncio
import json
import os
import resource
import signal
import socket
import sys
import time

import uvloop

# Outcome codes stored per request.
OK = 0
CONNECT_ERROR = 1
RESET = 2
TIMEOUT = 3
BAD_STATUS = 4
BAD_BODY = 5
OUTCOMES = {
    OK: "ok",
    CONNECT_ERROR: "connect error",
    RESET: "reset or closed before the response was complete",
    TIMEOUT: "timeout",
    BAD_STATUS: "status other than 200",
    BAD_BODY: "JSON-RPC error or invalid body",
}

REQUEST_BODY = b'{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}'
# The largest response head the parser accepts, as a guard against a runaway response.
MAX_HEAD_SIZE = 64 * 1024


class ResponseError(Exception):
    """A response that breaks HTTP/1.1 framing, so the connection cannot be reused."""


class HttpConnection(asyncio.Protocol):
    """One client connection that sends a request and parses the response it gets back."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.closed = False
        # Parse state of the current response: header length, status, body framing.
        self.head_length = 0
        self.status = 0
        self.content_length = -1
        self.chunked = False
        self.keep_alive = True

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None:
            self._parse()

    def eof_received(self) -> bool:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            if self.head_length and self.content_length < 0 and not self.chunked:
                # A body without Content-Length or chunked coding ends with the connection.
                self._finish(bytes(self.buffer[self.head_length:]))
            else:
                self.waiter.set_exception(ConnectionResetError("the server closed the connection before the response was complete"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("the connection closed before the response was complete"))

    # --- requests ---------------------------------------------------------------------------

    def send(self, request: bytes) -> "asyncio.Future[tuple[int, bytes, bool]]":
        """Send one request; the future resolves to (status, body, keep_alive)."""
        self.buffer.clear()
        self.head_length = 0
        self.status = 0
        self.content_length = -1
        self.chunked = False
        self.keep_alive = True
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)  # type: ignore[union-attr]
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- parsing ----------------------------------------------------------------------------

    def _parse(self) -> None:
        try:
            if not self.head_length and not self._parse_head():
                return
            if self.chunked:
                body = self._parse_chunked()
                if body is not None:
                    self._finish(body)
            elif self.content_length >= 0:
                end = self.head_length + self.content_length
                if len(self.buffer) >= end:
                    self._finish(bytes(self.buffer[self.head_length:end]))
        except ResponseError as error:
            if not self.waiter.done():  # type: ignore[union-attr]
                self.waiter.set_exception(error)  # type: ignore[union-attr]

    def _parse_head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD_SIZE:
                raise ResponseError(f"response head longer than {MAX_HEAD_SIZE} bytes")
            return False
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ResponseError(f"invalid status line {lines[0][:80]!r}")
        self.status = int(parts[1])
        self.keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"content-length":
                self.content_length = int(value)
            elif name == b"transfer-encoding":
                self.chunked = b"chunked" in value
            elif name == b"connection":
                if b"close" in value:
                    self.keep_alive = False
                elif b"keep-alive" in value:
                    self.keep_alive = True
        self.head_length = end + 4
        if self.status in (204, 304) or 100 <= self.status < 200:
            self.content_length = 0
        return True

    def _parse_chunked(self) -> bytes | None:
        """Return the decoded body once the last chunk arrived, otherwise None."""
        position = self.head_length
        body = bytearray()
        buffer = self.buffer
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            size_text = bytes(buffer[position:line_end]).split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ResponseError(f"invalid chunk size {size_text[:20]!r}") from None
            position = line_end + 2
            if size == 0:
                # Trailers are not expected: the body ends with an empty line.
                if buffer.find(b"\r\n", position) < 0:
                    return None
                return bytes(body)
            if len(buffer) < position + size + 2:
                return None
            body += buffer[position:position + size]
            position += size + 2

    def _finish(self, body: bytes) -> None:
        waiter = self.waiter
        self.waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.status, body, self.keep_alive and not self.closed))


def is_jsonrpc_result(body: bytes) -> bool:
    """Return whether the body is a JSON-RPC response with a result and no error member."""
    try:
        message = json.loads(body)
    except ValueError:
        return False
    return isinstance(message, dict) and "result" in message and "error" not in message


class LoadGenerator:
    """Closed-loop clients that record (start, latency, outcome) for every request."""

    def __init__(self, host: str, port: int, connections: int, keep_alive: bool, timeout: float, failure_pause: float):
        self.host = host
        self.port = port
        self.connections = connections
        self.keep_alive = keep_alive
        self.timeout = timeout
        self.failure_pause = failure_pause
        connection_header = b"" if keep_alive else b"Connection: close\r\n"
        self.request = (
            b"POST / HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (host.encode(), port, connection_header, len(REQUEST_BODY), REQUEST_BODY)
        )
        self.starts = array.array("d")
        self.latencies = array.array("d")
        self.outcomes = array.array("b")
        # The first message of each outcome kind, for the summary.
        self.first_errors: dict[int, str] = {}
        self.stopping = False

    async def run(self, stop: asyncio.Event) -> None:
        clients = [asyncio.create_task(self._client()) for _ in range(self.connections)]
        await stop.wait()
        self.stopping = True
        # A client finishes the request it has in flight, which takes at most the timeout.
        await asyncio.gather(*clients, return_exceptions=True)

    async def _client(self) -> None:
        loop = asyncio.get_running_loop()
        connection: HttpConnection | None = None
        monotonic = time.monotonic
        while not self.stopping:
            start = monotonic()
            outcome = OK
            message = ""
            try:
                async with asyncio.timeout(self.timeout):
                    if connection is None or connection.closed:
                        try:
                            _, connection = await loop.create_connection(HttpConnection, self.host, self.port)
                        except OSError as error:
                            connection = None
                            raise _ConnectError(str(error)) from None
                    status, body, keep_alive = await connection.send(self.request)
                if status != 200:
                    outcome = BAD_STATUS
                    message = f"status {status}: {body[:200]!r}"
                elif not is_jsonrpc_result(body):
                    outcome = BAD_BODY
                    message = f"body {body[:200]!r}"
                if not (self.keep_alive and keep_alive):
                    connection.close()
                    connection = None
            except _ConnectError as error:
                outcome = CONNECT_ERROR
                message = str(error)
            except TimeoutError:
                outcome = TIMEOUT
                message = f"no complete response within {self.timeout:g} s"
            except (OSError, ResponseError) as error:
                outcome = RESET
                message = f"{type(error).__name__}: {error}"

            self.starts.append(start)
            self.latencies.append(monotonic() - start)
            self.outcomes.append(outcome)
            if outcome != OK:
                self.first_errors.setdefault(outcome, message)
                if connection is not None:
                    connection.abort()
                    connection = None
                await asyncio.sleep(self.failure_pause)
        if connection is not None:
            connection.close()


class _ConnectError(Exception):
    """The TCP connect failed: refused, unreachable or reset during the handshake."""


def write_records(path: str, generator: LoadGenerator, header: dict) -> None:
    """Write one JSON header line, then the arrays starts (float64), latencies (float64) and outcomes (int8).

    The arrays are in the host's byte order, which the header records.
    """
    header = {
        **header,
        "count": len(generator.starts),
        "byteorder": sys.byteorder,
        "arrays": [["starts", "d"], ["latencies", "d"], ["outcomes", "b"]],
    }
    with open(path, "wb") as output:
        output.write(json.dumps(header).encode() + b"\n")
        generator.starts.tofile(output)
        generator.latencies.tofile(output)
        generator.outcomes.tofile(output)


def read_records(path: str) -> tuple[dict, array.array, array.array, array.array]:
    """Read a file written by write_records(); return (header, starts, latencies, outcomes)."""
    with open(path, "rb") as source:
        header = json.loads(source.readline())
        count = header["count"]
        starts = array.array("d")
        latencies = array.array("d")
        outcomes = array.array("b")
        starts.fromfile(source, count)
        latencies.fromfile(source, count)
        outcomes.fromfile(source, count)
    if header["byteorder"] != sys.byteorder:
        starts.byteswap()
        latencies.byteswap()
    return header, starts, latencies, outcomes


async def main_async(args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    limit = args.duration if args.duration is not None else args.max_duration
    loop.call_later(min(limit, args.max_duration), stop.set)
    if args.until_eof:
        # The parent closes the pipe to end the run. A read of b"" is end of file.
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def wait_for_eof() -> None:
            while await reader.read(4096):
                pass
            stop.set()

        loop.create_task(wait_for_eof())

    host, _, port = args.target.rpartition(":")
    generator = LoadGenerator(host, int(port), args.connections, args.mode == "keep-alive", args.timeout, args.failure_pause)
    started = time.monotonic()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"ready": True, "monotonic": started}), flush=True)
    await generator.run(stop)
    ended = time.monotonic()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)

    header = {
        "target": args.target,
        "connections": args.connections,
        "mode": args.mode,
        "timeout_s": args.timeout,
        "failure_pause_s": args.failure_pause,
        "started_monotonic": started,
        "ended_monotonic": ended,
        "cpu_seconds": cpu_seconds,
    }
    if args.output:
        write_records(args.output, generator, header)
    failed = sum(1 for outcome in generator.outcomes if outcome != OK)
    return {
        **header,
        "requests": len(generator.outcomes),
        "failed": failed,
        "requests_per_second": len(generator.outcomes) / (ended - started),
        "cpu_share_of_one_core": cpu_seconds / (ended - started),
        "first_errors": {OUTCOMES[code]: message for code, message in generator.first_errors.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Closed-loop JSON-RPC load generator (eth_blockNumber over HTTP/1.1).")
    parser.add_argument("--target", required=True, help="HOST:PORT of the JSON-RPC server, IPv4 only")
    parser.add_argument("--connections", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--mode", choices=["keep-alive", "new-connection"], default="keep-alive", help="connection reuse (default keep-alive)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a request may take, connect included, before it fails (default 5)")
    parser.add_argument("--failure-pause", type=float, default=0.01, help="seconds a client waits after a failed request (default 0.01)")
    parser.add_argument("--duration", type=float, help="seconds to run (default: until end of input, a signal or --max-duration)")
    parser.add_argument("--max-duration", type=float, default=1800.0, help="upper bound on the run time in seconds (default 1800)")
    parser.add_argument("--until-eof", action="store_true", help="stop when standard input reaches end of file")
    parser.add_argument("--output", help="file for the per-request records (default: none, summary only)")
    args = parser.parse_args(argv)
    if args.connections < 1:
        parser.error(f"--connections must be at least 1, not {args.connections}")
    if args.duration is None and not args.until_eof:
        parser.error("give --duration SECONDS or --until-eof, so the run has an end")
    return args


def main() -> int:
    args = parse_args()
    summary = uvloop.run(main_async(args))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
