"""The restart decision: policy, backoff growth, jitter bounds and crash-loop detection."""

import random

import pytest

from osvm.config.models import RestartPolicy
from osvm.supervise.restart import JITTER_FRACTION, RestartTracker


def tracker(**settings: object) -> RestartTracker:
    return RestartTracker(RestartPolicy(**settings), rng=random.Random(7))


def test_never_policy_does_not_restart() -> None:
    decision = tracker(policy="never").decide("exited with status 1", success=False, now=100.0)
    assert not decision.restart
    assert not decision.failed
    assert "restart policy is never" in decision.reason


def test_on_failure_policy_keeps_clean_exit() -> None:
    decision = tracker(policy="on-failure").decide("exited with status 0", success=True, now=100.0)
    assert not decision.restart
    assert "restart policy is on-failure" in decision.reason


def test_on_failure_policy_restarts_failure() -> None:
    decision = tracker(policy="on-failure").decide("exited with status 3", success=False, now=100.0)
    assert decision.restart
    assert decision.attempt == 1


def test_backoff_grows_and_stays_within_jitter() -> None:
    restarts = tracker(backoff_initial=1.0, backoff_multiplier=2.0, backoff_max=30.0, max_restarts=10)
    for attempt in range(1, 7):
        decision = restarts.decide("exited with status 1", success=False, now=float(attempt))
        base = min(2.0 ** (attempt - 1), 30.0)
        assert decision.restart
        assert decision.attempt == attempt
        assert base * (1 - JITTER_FRACTION) <= decision.delay <= base * (1 + JITTER_FRACTION)


def test_backoff_capped_at_backoff_max() -> None:
    restarts = tracker(backoff_initial=1.0, backoff_max=4.0, max_restarts=20)
    delays = [restarts.decide("x", success=False, now=float(i)).delay for i in range(10)]
    assert max(delays) <= 4.0 * (1 + JITTER_FRACTION)


def test_reason_names_delay_and_attempt() -> None:
    decision = tracker(max_restarts=5, window=60.0).decide("exited with status 1", success=False, now=10.0)
    assert decision.reason.startswith("exited with status 1, restarting in ")
    assert "(attempt 1 of 5 in 60 s)" in decision.reason


def test_crash_loop_marks_failed() -> None:
    restarts = tracker(max_restarts=3, window=60.0)
    outcomes = [restarts.decide("exited with status 1", success=False, now=float(i)) for i in range(4)]
    assert [outcome.restart for outcome in outcomes] == [True, True, True, False]
    assert outcomes[-1].failed
    assert "giving up after 3 restarts in 60 s" in outcomes[-1].reason


def test_old_restarts_leave_window() -> None:
    restarts = tracker(max_restarts=2, window=10.0)
    assert restarts.decide("x", success=False, now=0.0).restart
    assert restarts.decide("x", success=False, now=1.0).restart
    decision = restarts.decide("x", success=False, now=20.0)
    assert decision.restart
    assert decision.attempt == 1


@pytest.mark.parametrize("jitter_seed", range(5))
def test_jitter_differs_between_trackers(jitter_seed: int) -> None:
    first = RestartTracker(RestartPolicy(), rng=random.Random(jitter_seed)).decide("x", False, 0.0).delay
    second = RestartTracker(RestartPolicy(), rng=random.Random(jitter_seed + 100)).decide("x", False, 0.0).delay
    assert first != second
