"""Backends of an endpoint and the per-backend state that the data plane keeps."""

import asyncio
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Backend:
    """An instance address that an endpoint forwards to."""

    instance_id: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """The address as "host:port", with an IPv6 host in brackets."""
        return format_host_port(self.host, self.port)


def format_host_port(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class Closable(Protocol):
    """An in-flight exchange or long-lived connection that drain() can close."""

    def close_for_drain(self) -> None: ...


class Idle(Protocol):
    """A pooled upstream connection."""

    idle_since: float

    @property
    def usable(self) -> bool: ...

    def close(self) -> None: ...


class BackendState:
    """Counters, active work and the idle connection pool of one backend.

    `exchanges` contains the HTTP exchanges that have chosen this backend and not finished,
    including those still connecting. `long_lived` contains TCP-mode connections and WebSocket
    tunnels, including TCP-mode connections still connecting. drain() waits for both to empty.
    """

    __slots__ = ("backend", "current", "requests", "errors", "exchanges", "long_lived", "idle", "_idle_waiters")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        # Whether the backend is in the endpoint's current set. Connections to a backend outside
        # the set are closed instead of pooled.
        self.current = False
        self.requests = 0
        self.errors = 0
        self.exchanges: set[Closable] = set()
        self.long_lived: set[Closable] = set()
        # Most recently used last, so reuse takes the connection least likely to have timed out.
        self.idle: list[Idle] = []
        self._idle_waiters: list[asyncio.Future[None]] = []

    @property
    def load(self) -> int:
        """The number of in-flight exchanges plus long-lived connections."""
        return len(self.exchanges) + len(self.long_lived)

    def release_exchange(self, exchange: Closable) -> None:
        self.exchanges.discard(exchange)
        if self._idle_waiters and not self.exchanges and not self.long_lived:
            self._wake_idle_waiters()

    def release_long_lived(self, connection: Closable) -> None:
        self.long_lived.discard(connection)
        if self._idle_waiters and not self.exchanges and not self.long_lived:
            self._wake_idle_waiters()

    async def wait_idle(self) -> None:
        """Wait until the backend has no in-flight exchange and no long-lived connection."""
        while self.load:
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._idle_waiters:
                    self._idle_waiters.remove(waiter)

    def _wake_idle_waiters(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def take_idle(self, now: float, max_idle_time: float) -> Idle | None:
        """Remove and return the most recently pooled connection, closing any that idled too long or are closing."""
        idle = self.idle
        while idle:
            connection = idle.pop()
            if connection.usable and now - connection.idle_since <= max_idle_time:
                return connection
            connection.close()
        return None

    def close_idle(self, older_than: float | None = None) -> int:
        """Close all pooled connections, or those idle since before `older_than`, and return how many were closed."""
        if older_than is None:
            expired, self.idle = self.idle, []
        else:
            expired = [connection for connection in self.idle if connection.idle_since < older_than]
            if not expired:
                return 0
            self.idle = [connection for connection in self.idle if connection.idle_since >= older_than]
        for connection in expired:
            connection.close()
        return len(expired)

    def close_active(self) -> int:
        """Close every in-flight exchange and long-lived connection, and return how many were closed."""
        active = list(self.exchanges) + list(self.long_lived)
        for item in active:
            item.close_for_drain()
        return len(active)

    def describe(self) -> dict:
        return {
            "instance_id": self.backend.instance_id,
            "address": self.backend.address,
            "current": self.current,
            "in_flight": len(self.exchanges),
            "long_lived": len(self.long_lived),
            "idle_connections": len(self.idle),
            "requests": self.requests,
            "errors": self.errors,
        }


class BackendChoice:
    """The backends one request or client connection has tried, and how long it may go on trying.

    `excluded` contains the backends whose connect failed in the current round, `failure` describes
    the last failure, `deadline` is the loop time at which it gives up (0 until it first waits),
    and `rounds` counts the rounds after every backend of the set had failed.
    """

    __slots__ = ("excluded", "failure", "deadline", "rounds")

    def __init__(self) -> None:
        self.excluded: set[BackendState] = set()
        self.failure = ""
        self.deadline = 0.0
        self.rounds = 0
