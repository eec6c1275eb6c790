"""Tests of `osvm up` applying a changed component: it waits for the new revision and its rollout.

Right after the apply, the old revision still runs healthy and the rollout may not have started,
so `osvm up` must wait for an instance of the new revision rather than for any healthy instance.
"""

from typing import Any

from e2e import HTTP_SERVER, Osvm, exit_after, free_port, python_command

PROBE = {"type": "http", "port": "http", "path": "/", "interval": "0.3s", "startup_interval": "0.1s"}


def component(port: int, source: str, greeting: str) -> dict[str, Any]:
    return {
        "command": python_command(source),
        "ports": {"http": 0},
        "env": {"GREETING": greeting},
        "endpoint": {"listen": f"127.0.0.1:{port}", "mode": "http", "drain_timeout": "1s"},
        "update": {"min_healthy_time": "0.5s", "healthy_deadline": "6s", "post_promotion_window": "1s"},
        "restart": {"backoff_initial": "0.2s"},
        "probes": [PROBE],
    }


def revision_of_instances(osvm: Osvm, name: str) -> list[int]:
    return [instance["revision"] for instance in osvm.component(name)["instances"]]


def test_up_waits_for_new_revision(osvm: Osvm) -> None:
    port = free_port()
    osvm.up(osvm.write_deployment({"web": component(port, HTTP_SERVER, "one")}))
    assert revision_of_instances(osvm, "web") == [1]

    result = osvm.up(osvm.write_deployment({"web": component(port, HTTP_SERVER, "two")}))

    assert "web: revision 2 updated" in result.stdout
    assert "complete" in result.stdout
    assert revision_of_instances(osvm, "web") == [2]
    assert osvm.instance("web")["health"] == "healthy"


def test_up_fails_when_rollout_fails(osvm: Osvm) -> None:
    port = free_port()
    osvm.up(osvm.write_deployment({"web": component(port, HTTP_SERVER, "one")}))

    broken = osvm.write_deployment({"web": component(port, exit_after(0.2, 1), "broken")})
    result = osvm.cli("up", str(broken), "--timeout", "120", check=False)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "web: revision 2 updated" in result.stdout
    assert revision_of_instances(osvm, "web") == [1]
    assert osvm.instance("web")["health"] == "healthy"

    # Applying the same file again starts a new rollout, which fails the same way. The failed
    # rollout of the first attempt must not end the wait before the new one ends.
    again = osvm.cli("up", str(broken), "--timeout", "120", check=False)
    assert again.returncode == 1, again.stdout + again.stderr
    rollouts = osvm.cli_json("deployments", "web")["rollouts"]
    assert [rollout["state"] for rollout in rollouts] == ["failed", "failed"]
