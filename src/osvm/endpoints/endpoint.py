"""The Endpoint: a component's stable address that forwards to its healthy instances."""

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Set as AbstractSet

from osvm.config import models
from osvm.endpoints.backends import Backend, BackendChoice, BackendState, format_host_port
from osvm.endpoints.http import HttpClientProtocol
from osvm.endpoints.tls import EndpointTls, TlsListener, bind_tls_listener
from osvm.endpoints.listener import BACKLOG, EndpointError, bind_tcp, bind_unix, parse_listen, remove_socket_file
from osvm.endpoints.tcp import TcpClientProtocol
from osvm.endpoints.tunnel import Tunnel
from osvm.endpoints.upstream import UpstreamConnection

# Idle upstream connections kept per backend for reuse. A cap below the number of concurrent
# clients makes connections churn: with 50 wrk clients and a cap of 32, 15% of the requests
# opened a new connection. Connections above the steady need expire after POOL_MAX_IDLE_TIME.
POOL_MAX_IDLE = 128
# Pooled connections idle longer than this are closed instead of reused. Node.js HTTP servers,
# such as ganache, close idle keep-alive connections after 5 s (server.keepAliveTimeout default),
# and reusing a connection the server is closing costs a retry.
POOL_MAX_IDLE_TIME = 4.0
# At most one warning per backend in this many seconds. Every error is logged at debug.
WARNING_INTERVAL = 10.0
# When every backend of the set failed to connect for a request, the request tries them all again
# after this pause, which doubles up to CONNECT_RETRY_MAX, until queue_timeout. QEMU's user network
# listens with a backlog of 1 (`ss -ltn`), so a busy VM's forward drops SYNs and a connect times
# out, while a connect a moment later succeeds.
CONNECT_RETRY_INITIAL = 0.05
CONNECT_RETRY_MAX = 1.0
# After release_listener(), an idle client connection may send one more request within this long.
# Closing a keep-alive connection races with a request the client sends on it at that moment, so
# the proxy waits for that request, responds to it with "Connection: close", and closes only then.
HANDOVER_IDLE_GRACE = 1.0


class WarningLimiter:
    """Rate limiter for warnings: at most one per interval for each key, with the count of suppressed ones."""

    def __init__(self, logger: logging.Logger, interval: float = WARNING_INTERVAL) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += f" ({suppressed} similar warnings in the last {self._interval:g}s not logged)"
        self._logger.warning("%s", message)


class Endpoint:
    """Listens on a component's endpoint address and forwards to the current set of backends.

    All methods must be called from the event loop that runs start().
    """

    def __init__(
        self,
        component: str,
        spec: models.Endpoint,
        logger: logging.Logger | None = None,
        tls: EndpointTls | None = None,
    ) -> None:
        self.component = component
        self.spec = spec
        # Set for tls = "server" or "mutual": TLS termination and, for mutual, the client check.
        self.tls = tls
        self.logger = logger if logger is not None else logging.getLogger("osvm.endpoints")
        self.listen_address = spec.listen
        self.queue_timeout = spec.queue_timeout
        self.connect_timeout = spec.connect_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        # Client connections: HttpClientProtocol until a WebSocket upgrade, or TcpClientProtocol.
        self.clients: set[HttpClientProtocol | TcpClientProtocol] = set()
        self.stopping = False
        # Set by release_listener(): every response that starts from then on closes its client connection.
        self.handing_over = False

        self._least_connections = spec.balance == "least_connections"
        self._backends: list[Backend] = []
        self._current: list[BackendState] = []
        # Every backend seen since the endpoint was created, for counts() and drain().
        self._states: dict[Backend, BackendState] = {}
        self._next_index = 0
        self._backends_changed = asyncio.Event()
        self._queued = 0
        self._unavailable = 0
        self._server: asyncio.AbstractServer | None = None
        self._socket_identity: tuple[int, int] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._warnings = WarningLimiter(self.logger)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, inherited: socket.socket | None = None) -> None:
        """Bind the listen address and start accepting connections. Raises EndpointError when binding fails.

        `inherited` is a listening socket for the same address from the previous daemon process,
        which is used instead of binding again.
        """
        if self._server is not None:
            raise EndpointError(f"the endpoint of {self.component} on {self.listen_address} is already started")
        self.loop = asyncio.get_running_loop()
        self.stopping = False
        # asyncio.Event binds to the loop that first waits on it, and start() may run on a new loop.
        self._backends_changed = asyncio.Event()
        protocol_class = HttpClientProtocol if self.spec.mode == "http" else TcpClientProtocol

        def factory() -> asyncio.Protocol:
            return protocol_class(self)

        address = parse_listen(self.spec.listen)
        if inherited is not None:
            await self._serve_inherited(inherited, address.path, factory)
        elif self.tls is not None:
            if address.is_unix:
                raise EndpointError(f"TLS needs a TCP listen address, not {self.spec.listen}: use host:port or tls = \"none\"")
            sock = bind_tls_listener(address.host, address.port, self.spec.listen)
            listener = TlsListener(sock, self.tls, factory)
            listener.start()
            self._server = listener  # type: ignore[assignment]
            bound = sock.getsockname()
            self.listen_address = format_host_port(bound[0], bound[1])
        elif address.is_unix:
            self._server, self._socket_identity = await bind_unix(factory, address.path, self.spec.listen)
            self.listen_address = self.spec.listen
        else:
            self._server, self.listen_address = await bind_tcp(factory, address, self.spec.listen)

        if self.spec.mode == "http":
            self._sweeper = self.loop.create_task(self._close_expired_idle())
        self.logger.info(
            "endpoint %s: listening on %s (%s mode, %s)",
            self.component, self.listen_address, self.spec.mode, self.spec.balance,
        )

    async def _serve_inherited(self, sock: socket.socket, path: str, factory: Callable[[], asyncio.Protocol]) -> None:
        """Accept connections on a listening socket from the previous daemon process."""
        sock.setblocking(False)
        if self.tls is not None:
            listener = TlsListener(sock, self.tls, factory)
            listener.start()
            self._server = listener  # type: ignore[assignment]
        elif path:
            self._server = await self.loop.create_unix_server(factory, sock=sock, backlog=BACKLOG)
            file_status = os.stat(path)
            self._socket_identity = (file_status.st_dev, file_status.st_ino)
        else:
            self._server = await self.loop.create_server(factory, sock=sock, backlog=BACKLOG)
        if not path:
            bound = sock.getsockname()
            self.listen_address = format_host_port(bound[0], bound[1])
        self.logger.info("endpoint %s: took over the listening socket of %s from the previous daemon", self.component, self.listen_address)

    def release_listener(self) -> int:
        """Stop accepting and return a duplicate of the listening socket's descriptor, for the next daemon.

        Connections that arrive afterwards wait in the kernel's accept queue. The socket file of a
        Unix socket endpoint stays. HTTP client connections close after their next response, and
        requests waiting for a backend get 503. Call finish_clients() next.
        """
        server = self._server
        assert server is not None, "the endpoint is not started"
        descriptor = os.dup(server.sockets[0].fileno())
        self.handing_over = True
        for client in self.clients:
            if isinstance(client, HttpClientProtocol):
                client.close_after_response()
        # No backend can join the set before the restart, so requests waiting for one end now.
        self._wake_waiters()
        # stop() must not remove the socket file, which the next daemon keeps serving.
        self._socket_identity = (-1, -1)
        if isinstance(server, TlsListener):
            # The connections in a handshake become clients, which finish_clients() serves.
            server.stop_accepting()
        else:
            server.close()
        return descriptor

    async def finish_clients(self, timeout: float) -> None:
        """Wait for the client connections to end after release_listener(), then stop.

        HTTP connections end after their next response. An idle one that sends no request within
        HANDOVER_IDLE_GRACE of its last response is closed. TCP-mode connections are closed at
        once, and whatever is still open after `timeout` is closed by stop().
        """
        loop = self.loop
        deadline = loop.time() + timeout
        for client in list(self.clients):
            if isinstance(client, TcpClientProtocol):
                client.close_for_stop()
        while self.clients and loop.time() < deadline:
            idle_before = loop.time() - HANDOVER_IDLE_GRACE
            for client in list(self.clients):
                if isinstance(client, HttpClientProtocol) and not client.busy and client.idle_since <= idle_before:
                    client.close_for_stop()
            await asyncio.sleep(0.02)
        if self.clients:
            self.logger.warning(
                "endpoint %s: drain timed out after %gs of the daemon restart: closing %d client connection(s)",
                self.component, timeout, len(self.clients),
            )
        await self.stop()

    async def stop(self) -> None:
        """Close the listener and every client, upstream and tunnelled connection."""
        if self._server is None:
            return
        self.stopping = True
        self._wake_waiters()
        server, self._server = self._server, None
        server.close()

        # In-flight requests end first, with a 502 where no response byte was sent yet, so the
        # client connections are idle when they close.
        for state in self._states.values():
            state.close_idle()
            state.close_active()
        workers = []
        for client in list(self.clients):
            task = client.close_for_stop()
            if task is not None:
                workers.append(task)
        if self._sweeper is not None:
            self._sweeper.cancel()
            workers.append(self._sweeper)
            self._sweeper = None
        await asyncio.gather(*workers, return_exceptions=True)
        await server.wait_closed()

        address = parse_listen(self.spec.listen)
        if address.is_unix:
            remove_socket_file(address.path, self._socket_identity)
        if self.handing_over:
            self.logger.info("endpoint %s: closed its connections; the next daemon serves %s", self.component, self.listen_address)
        else:
            self.logger.info("endpoint %s: stopped listening on %s", self.component, self.listen_address)

    # --- backends ---------------------------------------------------------------------------

    def set_backends(self, backends: list[Backend]) -> None:
        """Replace the backend set. Every request or connection that picks a backend after this uses the new set.

        Idle pooled connections to backends that left the set are closed. In-flight requests
        and long-lived connections on them continue until drain().
        """
        unique = list(dict.fromkeys(backends))
        previous = self._backends
        new_states = []
        for backend in unique:
            state = self._states.get(backend)
            if state is None:
                state = self._states[backend] = BackendState(backend)
            new_states.append(state)

        for state in self._current:
            state.current = False
        for state in new_states:
            state.current = True
        old_states = self._current
        self._current = new_states
        self._backends = unique

        closed = 0
        for state in old_states:
            if not state.current:
                closed += state.close_idle()
        self._wake_waiters()

        if unique != previous:
            self.logger.info(
                "endpoint %s: backends changed from [%s] to [%s], closed %d idle upstream connections",
                self.component,
                ", ".join(f"{b.instance_id} {b.address}" for b in previous),
                ", ".join(f"{b.instance_id} {b.address}" for b in unique),
                closed,
            )

    @property
    def backends(self) -> list[Backend]:
        """The current backend set, in the order given to set_backends()."""
        return list(self._backends)

    def pick(self, excluded: AbstractSet[BackendState]) -> BackendState | None:
        """Choose a backend of the current set that is not excluded, or return None."""
        current = self._current
        count = len(current)
        if not count:
            return None
        start = self._next_index
        self._next_index = start + 1
        if not self._least_connections:
            for offset in range(count):
                state = current[(start + offset) % count]
                if state not in excluded:
                    self._next_index = start + offset + 1
                    return state
            return None

        # The backend with the minimum load (in-flight requests plus long-lived connections)
        # wins. The rotating start spreads ties.
        best = None
        best_load = 0
        for offset in range(count):
            state = current[(start + offset) % count]
            if state in excluded:
                continue
            load = len(state.exchanges) + len(state.long_lived)
            if best is None or load < best_load:
                best = state
                best_load = load
        return best

    async def wait_for_backend(self, choice: BackendChoice) -> BackendState | None:
        """Wait for a backend the request or connection may try, after pick(choice.excluded) found none.

        While the set is empty, waits for set_backends() to provide a backend. When every backend
        of the set failed to connect, tries them all again after a pause that doubles up to
        CONNECT_RETRY_MAX. Returns None once queue_timeout has passed since the first wait, or when
        the endpoint stops.
        """
        loop = self.loop
        if not choice.deadline:
            choice.deadline = loop.time() + self.queue_timeout
        self._queued += 1
        try:
            while not self.stopping and not self.handing_over:
                retry_at = choice.deadline
                if choice.excluded and self._current:
                    pause = min(CONNECT_RETRY_MAX, CONNECT_RETRY_INITIAL * 2**choice.rounds)
                    retry_at = min(retry_at, loop.time() + pause)
                state = await self._wait_for_change(choice.excluded, retry_at)
                if state is not None:
                    return state
                if self.stopping or self.handing_over or loop.time() >= choice.deadline:
                    return None
                choice.excluded.clear()
                choice.rounds += 1
                state = self.pick(choice.excluded)
                if state is not None:
                    return state
            return None
        finally:
            self._queued -= 1

    async def _wait_for_change(self, excluded: AbstractSet[BackendState], until: float) -> BackendState | None:
        """Wait until set_backends() provides a backend that is not excluded, up to `until` (loop time)."""
        while not self.stopping and not self.handing_over:
            changed = self._backends_changed
            try:
                async with asyncio.timeout_at(until):
                    await changed.wait()
            except TimeoutError:
                return None
            state = self.pick(excluded)
            if state is not None:
                return state
        return None

    def _wake_waiters(self) -> None:
        changed, self._backends_changed = self._backends_changed, asyncio.Event()
        changed.set()

    # --- upstream connections ---------------------------------------------------------------

    async def connect_http(self, state: BackendState) -> UpstreamConnection:
        """Open an HTTP connection to the backend. Raises OSError, or TimeoutError after connect_timeout."""
        backend = state.backend
        async with asyncio.timeout(self.connect_timeout):
            _, upstream = await self.loop.create_connection(
                lambda: UpstreamConnection(state), backend.host, backend.port
            )
        return upstream

    async def connect_tunnel(self, tunnel: Tunnel) -> None:
        """Open the upstream connection of a TCP-mode tunnel. Raises like connect_http()."""
        backend = tunnel.state.backend
        async with asyncio.timeout(self.connect_timeout):
            await self.loop.create_connection(lambda: tunnel.upstream, backend.host, backend.port)

    def take_idle(self, state: BackendState) -> UpstreamConnection | None:
        return state.take_idle(self.loop.time(), POOL_MAX_IDLE_TIME)

    def release_upstream(self, upstream: UpstreamConnection, reusable: bool) -> None:
        """Return a connection whose exchange finished to the pool, or close it."""
        upstream.detach()
        state = upstream.state
        if (
            reusable
            and state.current
            and not self.stopping
            and not upstream.lost
            and not upstream.transport.is_closing()
            and len(state.idle) < POOL_MAX_IDLE
        ):
            upstream.idle_since = self.loop.time()
            state.idle.append(upstream)
        else:
            upstream.close()

    async def _close_expired_idle(self) -> None:
        while True:
            await asyncio.sleep(POOL_MAX_IDLE_TIME / 2)
            cutoff = self.loop.time() - POOL_MAX_IDLE_TIME
            for state in self._states.values():
                if state.idle:
                    state.close_idle(older_than=cutoff)

    # --- errors -----------------------------------------------------------------------------

    def record_connect_failure(self, state: BackendState, exc: BaseException) -> str:
        """Count a failed connect as a request with an error, log it, and return its description."""
        if isinstance(exc, TimeoutError):
            description = f"connect to {state.backend.address} timed out after {self.connect_timeout:g}s"
        elif isinstance(exc, ConnectionRefusedError):
            description = f"connection to {state.backend.address} refused"
        else:
            description = f"connect to {state.backend.address} failed: {exc}"
        state.requests += 1
        state.errors += 1
        self.log_upstream_error(state, description)
        return description

    def log_upstream_error(self, state: BackendState, description: str) -> None:
        instance_id = state.backend.instance_id
        self.logger.debug("endpoint %s: instance %s: %s", self.component, instance_id, description)
        self._warnings.warning(instance_id, f"endpoint {self.component}: instance {instance_id}: {description}")

    def log_unavailable(self, description: str) -> None:
        self.logger.debug("endpoint %s: %s", self.component, description)
        self._warnings.warning("", f"endpoint {self.component}: {description}")

    def count_unavailable(self) -> None:
        """Count a request or connection that found no backend within queue_timeout."""
        self._unavailable += 1

    # --- drain and status -------------------------------------------------------------------

    async def drain(self, instance_id: str, timeout: float) -> int:
        """Wait up to timeout seconds for the instance's in-flight requests and long-lived connections to end.

        Closes what remains after the timeout and returns how many exchanges and connections
        were closed, 0 when the instance drained on its own. Idle pooled connections to the
        instance are closed at once. Call it after set_backends() removed the instance, because
        requests keep arriving while it is in the set.
        """
        states = [state for backend, state in self._states.items() if backend.instance_id == instance_id]
        for state in states:
            state.close_idle()
        if any(state.current for state in states):
            self.logger.warning(
                "endpoint %s: draining instance %s while it is still a backend, so new requests keep reaching it",
                self.component, instance_id,
            )

        closed = 0
        try:
            async with asyncio.timeout(timeout):
                for state in states:
                    await state.wait_idle()
        except TimeoutError:
            closed = sum(state.close_active() for state in states)

        if closed:
            self.logger.info(
                "endpoint %s: drained instance %s: closed %d requests and connections still open after %gs",
                self.component, instance_id, closed, timeout,
            )
        else:
            self.logger.info("endpoint %s: drained instance %s: no requests or connections left", self.component, instance_id)
        return closed

    def counts(self, instance_id: str) -> tuple[int, int]:
        """Return (requests, errors) forwarded to the instance since the endpoint was created.

        An error is a 5xx response, an upstream connection failure, or a failed connect.
        In TCP mode each connection counts as one request.
        """
        requests = 0
        errors = 0
        for backend, state in self._states.items():
            if backend.instance_id == instance_id:
                requests += state.requests
                errors += state.errors
        return requests, errors

    def describe(self) -> dict:
        """Status for `osvm status --json`.

        "backends" lists the current set, which new requests go to. "draining" lists former
        backends that still have in-flight requests or long-lived connections.
        """
        draining = [state for state in self._states.values() if not state.current and state.load]
        return {
            "component": self.component,
            "listen": self.listen_address,
            "mode": self.spec.mode,
            "balance": self.spec.balance,
            "backends": [state.describe() for state in self._current],
            "draining": [state.describe() for state in draining],
            "queued": self._queued,
            "client_connections": len(self.clients),
            "unavailable": self._unavailable,
        }
