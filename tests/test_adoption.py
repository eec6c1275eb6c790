"""End-to-end: a daemon killed with SIGKILL leaves its instances running, and the next one adopts them."""

import json
import os
import signal

import pytest

from e2e import HTTP_SERVER, Osvm, http_request, is_alive, python_command, wait_for

pytestmark = pytest.mark.root

NAMES = ("alpha", "beta")


def write_two_servers(osvm: Osvm):
    server = {
        "command": python_command(HTTP_SERVER),
        "ports": {"http": 0},
        "probes": [{"type": "http", "port": "http", "path": "/"}],
        "stop_grace_period": "5s",
    }
    return osvm.write_deployment({name: dict(server) for name in NAMES})


def component_pids_by_instance(osvm: Osvm) -> dict[str, list[int]]:
    """Return the host pids of the component programs, by the instance cgroup they run in."""
    found: dict[str, list[int]] = {}
    for process in osvm.component_processes():
        for line in process.cgroup.splitlines():
            # Lines look like "5:pids:/osvm-0123abcd/alpha-1-0a1b2c".
            _, controllers, path = line.split(":", 2)
            if "pids" in controllers.split(","):
                instance = path.split(f"/{osvm.cgroup_parent}/", 1)[1].split("/")[0]
                found.setdefault(instance, []).append(process.pid)
    return found


def serves_own_id(instance: dict) -> bool:
    status, body = http_request(f"http://127.0.0.1:{instance['ports']['http']}/")
    return status == 200 and json.loads(body)["instance"] == instance["id"]


def test_daemon_sigkill_adopts_instances(osvm: Osvm):
    osvm.up(write_two_servers(osvm))
    before = {name: osvm.instance(name) for name in NAMES}
    events_before = osvm.events()
    first_daemon = osvm.kill_daemon()

    for name, instance in before.items():
        assert is_alive(instance["pid"]), name
        assert serves_own_id(instance), name
    assert not is_alive(first_daemon)

    osvm.start_daemon()

    after = {name: osvm.wait_healthy(name) for name in NAMES}
    for name in NAMES:
        assert after[name]["id"] == before[name]["id"], name
        assert after[name]["pid"] == before[name]["pid"], name
        assert serves_own_id(after[name]), name
    events = osvm.cli_events()
    assert events[: len(events_before)] == events_before
    adopted = [event for event in events if event["kind"] == "instance.adopted"]
    assert sorted(event["instance"] for event in adopted) == sorted(instance["id"] for instance in before.values())
    for event in adopted:
        pid = before[event["component"]]["pid"]
        assert event["reason"] == f"adopted pid {pid} after a daemon restart"
    assert [event for event in events if event["kind"] == "instance.lost"] == []
    for name in NAMES:
        revisions = osvm.cli_json("revisions", name)["revisions"]
        assert [revision["number"] for revision in revisions] == [1], name
        assert osvm.cli("revisions", name).stdout.strip().startswith("1  ")
    # No instance runs twice: one program per instance, and no cgroups beside the two instances.
    pids = component_pids_by_instance(osvm)
    assert sorted(pids) == sorted(instance["id"] for instance in before.values())
    assert all(len(found) == 1 for found in pids.values()), pids
    assert osvm.instance_cgroups()["pids"] == sorted(instance["id"] for instance in before.values())

    # Second crash: while the daemon is down, alpha's process is killed too.
    before = after
    events_before = osvm.events()
    lost_programs = pids[before["alpha"]["id"]]
    osvm.kill_daemon()

    os.kill(before["alpha"]["pid"], signal.SIGKILL)
    wait_for(lambda: not is_alive(before["alpha"]["pid"]), "the killed instance process to exit")
    osvm.start_daemon()

    alpha = osvm.wait_healthy("alpha")
    beta = osvm.wait_healthy("beta")
    assert alpha["id"] != before["alpha"]["id"]
    assert alpha["pid"] != before["alpha"]["pid"]
    assert beta["id"] == before["beta"]["id"]
    assert beta["pid"] == before["beta"]["pid"]
    assert serves_own_id(alpha)
    assert serves_own_id(beta)
    events = osvm.events()[len(events_before):]
    lost = [event for event in events if event["kind"] == "instance.lost"]
    assert [event["instance"] for event in lost] == [before["alpha"]["id"]]
    assert lost[0]["reason"] == (
        "not adopted after a daemon restart because its process was gone: cleaning up and replacing it"
    )
    adopted = [event for event in events if event["kind"] == "instance.adopted"]
    assert [event["instance"] for event in adopted] == [before["beta"]["id"]]
    # The lost instance's other processes were killed with its cgroup, and nothing runs twice.
    assert not any(is_alive(pid) for pid in lost_programs)
    assert not osvm.cgroup_dir("pids", before["alpha"]["id"]).exists()
    pids = component_pids_by_instance(osvm)
    assert sorted(pids) == sorted([alpha["id"], beta["id"]])
    assert all(len(found) == 1 for found in pids.values()), pids
