"""The restart decision: after an exit, should the instance start again, and after how long?"""

import random
from dataclasses import dataclass

from osvm.config.models import RestartPolicy

# Each delay is spread by up to this fraction either way, so instances that crashed together
# (say, on a shared dependency) do not all restart in the same instant.
JITTER_FRACTION = 0.2


@dataclass(frozen=True)
class RestartDecision:
    restart: bool
    delay: float
    # Restarts within the policy window, counting this one.
    attempt: int
    reason: str
    # True when the instance has given up for good and the component is failed.
    failed: bool = False


class RestartTracker:
    """Keep the times of recent restarts and apply a restart policy to each exit."""

    def __init__(self, policy: RestartPolicy, restart_times: list[float] | None = None, rng: random.Random | None = None):
        self.policy = policy
        self.restart_times: list[float] = list(restart_times or [])
        self._rng = rng or random.Random()

    def decide(self, exit_reason: str, success: bool, now: float) -> RestartDecision:
        """Return whether to restart after an exit described by `exit_reason`, and the delay."""
        policy = self.policy

        # Never restart: the exit is final whatever its status.
        if policy.policy == "never":
            return RestartDecision(False, 0.0, 0, f"{exit_reason}, not restarting (restart policy is never)")

        # A clean exit under on-failure is a finished job, not a failure.
        if policy.policy == "on-failure" and success:
            return RestartDecision(False, 0.0, 0, f"{exit_reason}, not restarting (restart policy is on-failure)")

        window_start = now - policy.window
        self.restart_times = [moment for moment in self.restart_times if moment >= window_start]
        attempt = len(self.restart_times) + 1

        # Too many restarts in the window: a crash loop, so give up and mark the component failed.
        if attempt > policy.max_restarts:
            return RestartDecision(
                False,
                0.0,
                attempt - 1,
                f"{exit_reason}, giving up after {attempt - 1} restarts in {_seconds(policy.window)}: "
                f"the component is failed (fix it, then run `osvm restart`)",
                failed=True,
            )

        base = policy.backoff_initial * policy.backoff_multiplier ** (attempt - 1)
        base = min(base, policy.backoff_max)
        delay = base * (1 + self._rng.uniform(-JITTER_FRACTION, JITTER_FRACTION))
        self.restart_times.append(now)
        return RestartDecision(
            True,
            delay,
            attempt,
            f"{exit_reason}, restarting in {delay:.1f} s "
            f"(attempt {attempt} of {policy.max_restarts} in {_seconds(policy.window)})",
        )

    def reset(self) -> None:
        self.restart_times.clear()


def _seconds(value: float) -> str:
    return f"{value:g} s"
