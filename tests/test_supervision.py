"""End-to-end: restart policies, backoff, giving up, and stopping with the grace period."""

import time

import pytest

from e2e import CGROUP_CONTROLLERS, SLEEPER, Osvm, exit_after, python_command, wait_for

pytestmark = pytest.mark.root

# Ignores SIGTERM, so only SIGKILL after the grace period ends it.
IGNORES_SIGTERM = """
import signal, time

def ignore(number, frame):
    print("received SIGTERM, ignoring it", flush=True)

signal.signal(signal.SIGTERM, ignore)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def kinds(events: list[dict], kind: str) -> list[dict]:
    return [event for event in events if event["kind"] == kind]


def test_crash_backoff_then_failed(osvm: Osvm):
    path = osvm.write_deployment(
        {
            "crasher": {
                "command": python_command(exit_after(0.5, 1)),
                "restart": {"policy": "always", "max_restarts": 3, "window": "60s", "backoff_initial": "0.2s"},
            }
        }
    )
    osvm.up(path, "--detach")

    component = osvm.wait_status("crasher", "failed")

    assert "giving up after 3 restarts" in component["reason"]
    assert "exited with status 1" in component["reason"]
    assert "fix it, then run `osvm restart`" in component["reason"]
    events = osvm.events("crasher")
    assert len(kinds(events, "instance.started")) == 4
    backoffs = [event["reason"] for event in kinds(events, "instance.backoff")]
    assert len(backoffs) == 3
    for attempt, reason in enumerate(backoffs, start=1):
        assert reason.startswith("exited with status 1, restarting in "), reason
        assert f"(attempt {attempt} of 3 in 60 s)" in reason
    failed = kinds(events, "instance.failed")
    assert len(failed) == 1
    assert "giving up after 3 restarts in 60 s" in failed[0]["reason"]
    # One instance ran all four times: restarts reuse the instance.
    (first_instance,) = {event["instance"] for event in kinds(events, "instance.started")}

    result = osvm.cli("restart", "crasher")

    assert "crasher: restart requested" in result.stdout

    def second_instance_starts() -> list[dict]:
        started = kinds(osvm.events("crasher"), "instance.started")
        return [event for event in started if event["instance"] != first_instance]

    started = wait_for(second_instance_starts, "a new instance of crasher to start")
    assert started[0]["reason"].startswith("started revision 1 as pid ")
    # The new instance counts its restarts afresh, so it fails again after three more.
    component = osvm.wait_status("crasher", "failed")
    assert "giving up after 3 restarts" in component["reason"]
    assert len(second_instance_starts()) == 4


def test_exit_without_restart(osvm: Osvm):
    cases = {
        "never-ok": ("never", 0, "exited with status 0, not restarting (restart policy is never)"),
        "never-fail": ("never", 1, "exited with status 1, not restarting (restart policy is never)"),
        "on-failure-ok": ("on-failure", 0, "exited with status 0, not restarting (restart policy is on-failure)"),
    }
    path = osvm.write_deployment(
        {
            name: {
                "command": python_command(exit_after(0.2, code)),
                "restart": {"policy": policy, "backoff_initial": "0.2s"},
            }
            for name, (policy, code, _) in cases.items()
        }
    )
    osvm.up(path, "--detach")

    for name, (_, _, reason) in cases.items():
        component = osvm.wait_status(name, "exited")
        assert component["reason"] == reason, name
        assert component["instances"] == [], name
    # Leave time for a wrong restart: the reconciler runs a pass at least every 2 s.
    time.sleep(3)
    for name, (_, _, reason) in cases.items():
        events = osvm.events(name)
        assert len(kinds(events, "instance.started")) == 1, name
        assert kinds(events, "instance.backoff") == [], name
        assert [event["reason"] for event in kinds(events, "instance.exited")] == [reason], name
        assert osvm.component(name)["status"] == "exited", name


def test_on_failure_restarts_failed_exit(osvm: Osvm):
    path = osvm.write_deployment(
        {
            "job": {
                "command": python_command(exit_after(0.2, 3)),
                "restart": {"policy": "on-failure", "max_restarts": 1, "backoff_initial": "0.2s"},
            }
        }
    )
    osvm.up(path, "--detach")

    component = osvm.wait_status("job", "failed")

    assert "exited with status 3, giving up after 1 restarts" in component["reason"]
    events = osvm.events("job")
    assert len(kinds(events, "instance.started")) == 2
    assert len(kinds(events, "instance.backoff")) == 1


def test_stop_sends_sigkill_after_grace(osvm: Osvm):
    path = osvm.write_deployment(
        {"stubborn": {"command": python_command(IGNORES_SIGTERM), "stop_grace_period": "1s"}}
    )
    osvm.up(path)
    instance = osvm.instance("stubborn")
    wait_for(lambda: "ready" in osvm.cli("logs", "stubborn").stdout, "stubborn to print ready")

    result = osvm.cli("stop", "stubborn")

    assert "stubborn: stopped" in result.stdout
    component = osvm.component("stubborn")
    assert component["status"] == "stopped"
    assert component["desired"] == "stopped"
    assert component["instances"] == []
    stopped = kinds(osvm.events("stubborn"), "instance.stopped")
    assert [event["reason"] for event in stopped] == ["stop requested: killed by SIGKILL"]
    assert "received SIGTERM, ignoring it" in osvm.cli("logs", "stubborn").stdout
    assert "did not exit within 1.0s of SIGTERM: sending SIGKILL" in osvm.daemon_log.read_text()
    assert osvm.component_processes() == []
    assert osvm.instance_cgroups() == {}
    assert not any(osvm.cgroup_dir(controller, instance["id"]).exists() for controller in CGROUP_CONTROLLERS)


def test_stop_then_start(osvm: Osvm):
    path = osvm.write_deployment({"sleeper": {"command": python_command(SLEEPER), "stop_grace_period": "5s"}})
    osvm.up(path)
    first = osvm.instance("sleeper")

    osvm.cli("stop", "sleeper")

    assert osvm.component("sleeper")["status"] == "stopped"
    assert osvm.component_processes() == []

    result = osvm.cli("start", "sleeper", "--wait", "--timeout", "60")

    assert "sleeper: start requested" in result.stdout
    second = osvm.wait_healthy("sleeper")
    assert second["id"] != first["id"]
    assert second["pid"] != first["pid"]
    assert len(osvm.component_processes()) == 1
    stopped = kinds(osvm.events("sleeper"), "instance.stopped")
    assert [event["reason"] for event in stopped] == ["stop requested: killed by SIGTERM"]
