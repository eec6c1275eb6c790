"""HealthMonitor: runs an instance's probes and turns their results into one health state."""

import asyncio
import logging
import time
from typing import Any, Callable

import httpx

from osvm.probes.describe import describe_probe
from osvm.probes.http import new_http_client
from osvm.probes.result import ProbeResult
from osvm.probes.runner import HTTP_PROBE_TYPES, run_probe
from osvm.probes.target import ProbeTarget
from osvm.probes.tracker import HEALTHY, STARTING, UNHEALTHY, ProbeTracker

# Minimum pause in seconds between two runs of one probe, so that a probe whose run takes
# longer than its interval does not run back to back without yielding.
MIN_PAUSE = 0.01

StateChangeCallback = Callable[[str, str, str, bool], None]


class HealthMonitor:
    """Health of one instance from its probes: "starting", "healthy" or "unhealthy".

    The state is "starting" until every probe has passed success_threshold times in a row,
    then "healthy". It is "unhealthy" while any probe is unhealthy, which it becomes after
    failure_threshold failures in a row. Failures of runs that start within startup_grace
    after `started_at` do not count. With no probes the state is "healthy" from construction,
    and run() calls on_change("starting", "healthy", ...) once, so a caller that follows
    on_change records the instance as healthy.

    `on_change(old_state, new_state, reason, liveness_failed)` is called on every change
    of the state. liveness_failed is True when a probe with liveness = true turned
    unhealthy. When that happens while the state is already "unhealthy", on_change is
    called with old_state and new_state both "unhealthy", so the caller can still restart
    the instance. `clock` gives the time for startup grace, in the same timebase as
    `started_at`. State changes are logged through `logger`, which defaults to
    "osvm.probes". Pass a child logger or LoggerAdapter that names the instance.
    """

    def __init__(
        self,
        probes: list,
        target: ProbeTarget,
        on_change: StateChangeCallback,
        started_at: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> None:
        self.probes = list(probes)
        self.target = target
        self._on_change = on_change
        self._clock = clock
        self.started_at = clock() if started_at is None else started_at
        self._logger = logger if logger is not None else logging.getLogger("osvm.probes")
        self._trackers = [ProbeTracker(probe, describe_probe(probe)) for probe in self.probes]
        self.last_results: dict[int, ProbeResult] = {}
        self.state = STARTING if self.probes else HEALTHY

    async def run(self) -> None:
        """Run all probes until cancelled.

        Each probe runs every startup_interval until its first pass, then every interval,
        measured from the start of one run to the start of the next. With no probes this
        reports the instance healthy through on_change and waits for cancellation.
        """
        self._logger.debug("health monitor started with %d probes", len(self._trackers))
        client = None
        if any(getattr(probe, "type", None) in HTTP_PROBE_TYPES for probe in self.probes):
            client = new_http_client()
        try:
            if not self._trackers:
                reason = "no probes are configured"
                self._log_change(STARTING, HEALTHY, reason, liveness_failed=False)
                self._notify(STARTING, HEALTHY, reason, liveness_failed=False)
                await asyncio.Event().wait()
            else:
                async with asyncio.TaskGroup() as group:
                    for index in range(len(self._trackers)):
                        group.create_task(self._run_probe_loop(index, client))
        finally:
            if client is not None:
                await client.aclose()
            self._logger.debug("health monitor stopped in state %s", self.state)

    def describe(self) -> list[dict[str, Any]]:
        """Return each probe's type, state, last detail and consecutive counts, as JSON-serializable dicts."""
        return [tracker.describe(index) for index, tracker in enumerate(self._trackers)]

    async def _run_probe_loop(self, index: int, client: httpx.AsyncClient | None) -> None:
        tracker = self._trackers[index]
        probe = tracker.probe
        loop = asyncio.get_running_loop()
        while True:
            run_started = loop.time()
            in_grace = self._clock() - self.started_at < probe.startup_grace
            result = await run_probe(probe, self.target, client=client)
            self.record_result(index, result, in_grace=in_grace)

            interval = probe.interval if tracker.has_passed else probe.startup_interval
            pause = max(MIN_PAUSE, interval - (loop.time() - run_started))
            await asyncio.sleep(pause)

    def record_result(self, index: int, result: ProbeResult, in_grace: bool = False) -> None:
        """Count the result of probe `index`, update the state and call on_change when it changed.

        `in_grace` is True when the run started within startup_grace, so a failure is not counted.
        """
        self.last_results[index] = result
        tracker = self._trackers[index]
        reason = tracker.record(result, count_failure=not in_grace)
        if reason is None:
            return

        liveness_failed = bool(getattr(tracker.probe, "liveness", False)) and tracker.state == UNHEALTHY
        new_state = self._combined_state()
        if new_state == self.state and not liveness_failed:
            return

        if new_state == STARTING:
            waiting = [other.label for other in self._trackers if other.state == STARTING]
            if len(waiting) == 1:
                reason += f", but probe {waiting[0]} has not passed yet"
            else:
                reason += f", but probes {'; '.join(waiting)} have not passed yet"
        old_state = self.state
        self.state = new_state
        self._log_change(old_state, new_state, reason, liveness_failed)
        self._notify(old_state, new_state, reason, liveness_failed)

    def _combined_state(self) -> str:
        states = [tracker.state for tracker in self._trackers]
        if UNHEALTHY in states:
            return UNHEALTHY
        if STARTING in states:
            return STARTING
        return HEALTHY

    def _log_change(self, old_state: str, new_state: str, reason: str, liveness_failed: bool) -> None:
        level = logging.WARNING if new_state == UNHEALTHY else logging.INFO
        if old_state == new_state:
            self._logger.log(level, "liveness probe failed while already unhealthy: %s", reason)
        elif liveness_failed:
            self._logger.log(
                level, "health changed from %s to %s, liveness probe failed: %s", old_state, new_state, reason
            )
        else:
            self._logger.log(level, "health changed from %s to %s: %s", old_state, new_state, reason)

    def _notify(self, old_state: str, new_state: str, reason: str, liveness_failed: bool) -> None:
        try:
            self._on_change(old_state, new_state, reason, liveness_failed)
        except Exception:
            # The monitor keeps running, so a faulty callback does not stop health checking.
            self._logger.exception(
                "on_change callback failed for the change from %s to %s: %s", old_state, new_state, reason
            )
