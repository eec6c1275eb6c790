"""The outcome of one probe run."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeResult:
    """Whether one probe run passed, why, and how long it took.

    `detail` is a readable reason such as "HTTP 503 from GET http://127.0.0.1:8899/health"
    or "connection refused on 127.0.0.1:6379". `duration` is in seconds.
    """

    ok: bool
    detail: str
    duration: float
