"""Consecutive pass and fail counts of one probe, and the health state they give."""

from typing import Any

from osvm.probes.result import ProbeResult

STARTING = "starting"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"


def _times(count: int) -> str:
    return "1 time" if count == 1 else f"{count} times in a row"


class ProbeTracker:
    """Counts of one probe's results and its state: starting, healthy or unhealthy.

    A probe becomes healthy after success_threshold passes in a row, and unhealthy after
    failure_threshold counted failures in a row. An unhealthy probe becomes healthy again
    after success_threshold passes in a row. A failure during startup grace resets the
    passes but is not counted.
    """

    def __init__(self, probe: Any, label: str) -> None:
        self.probe = probe
        self.label = label
        self.state = STARTING
        self.consecutive_successes = 0
        self.consecutive_failures = 0
        self.runs = 0
        # Whether the probe has passed at least once, which switches it from startup_interval to interval.
        self.has_passed = False
        self.last_result: ProbeResult | None = None

    def record(self, result: ProbeResult, count_failure: bool = True) -> str | None:
        """Count one result and return the reason when the state changed, or None when it did not.

        `count_failure` is False for a failure during startup grace.
        """
        self.runs += 1
        self.last_result = result

        if result.ok:
            self.has_passed = True
            self.consecutive_failures = 0
            self.consecutive_successes += 1
            if self.state != HEALTHY and self.consecutive_successes >= self.probe.success_threshold:
                self.state = HEALTHY
                return f"probe {self.label} passed {_times(self.consecutive_successes)}"
            return None

        self.consecutive_successes = 0
        if not count_failure:
            return None
        self.consecutive_failures += 1
        if self.state != UNHEALTHY and self.consecutive_failures >= self.probe.failure_threshold:
            self.state = UNHEALTHY
            return f"probe {self.label} failed {_times(self.consecutive_failures)}: {result.detail}"
        return None

    def describe(self, index: int) -> dict[str, Any]:
        """Return the probe's state and counts as a JSON-serializable dict."""
        last = self.last_result
        return {
            "index": index,
            "type": getattr(self.probe, "type", None),
            "probe": self.label,
            "liveness": bool(getattr(self.probe, "liveness", False)),
            "state": self.state,
            "ok": None if last is None else last.ok,
            "detail": None if last is None else last.detail,
            "duration": None if last is None else last.duration,
            "consecutive_successes": self.consecutive_successes,
            "consecutive_failures": self.consecutive_failures,
            "runs": self.runs,
        }
