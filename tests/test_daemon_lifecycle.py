"""End-to-end: starting and stopping the daemon, and applying a deployment file again."""

import json
import subprocess

import pytest

from e2e import HTTP_SERVER, PYTHON, Osvm, http_request, is_alive, python_command

pytestmark = pytest.mark.root


def web_spec(greeting: str) -> dict:
    return {
        "command": python_command(HTTP_SERVER),
        "env": {"GREETING": greeting},
        "ports": {"http": 0},
        "probes": [{"type": "http", "port": "http", "path": "/"}],
        "stop_grace_period": "5s",
    }


def greeting_of(instance: dict) -> str:
    status, body = http_request(f"http://127.0.0.1:{instance['ports']['http']}/")
    assert status == 200
    return json.loads(body)["greeting"]


def test_up_starts_daemon_and_down_stops_it(osvm_stopped: Osvm):
    path = osvm_stopped.write_deployment({"web": web_spec("hello")})

    result = osvm_stopped.up(path)

    assert f"started the osvm daemon (state in {osvm_stopped.state_dir}" in result.stdout
    ping = osvm_stopped.ping()
    assert ping is not None
    assert ping["state_dir"] == str(osvm_stopped.state_dir)
    instance = osvm_stopped.wait_healthy("web")
    assert greeting_of(instance) == "hello"

    result = osvm_stopped.cli("down", "--daemon")

    assert "stopped and removed: web" in result.stdout
    assert "daemon stopped" in result.stdout
    assert not is_alive(instance["pid"])
    assert osvm_stopped.instance_cgroups() == {}
    again = osvm_stopped.cli("down")
    assert "no daemon is running on this state directory" in again.stdout


def test_second_daemon_on_state_dir_rejected(osvm: Osvm):
    result = subprocess.run(
        [str(PYTHON), "-m", "osvm", "--state-dir", str(osvm.state_dir), "daemon"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert osvm.daemon is not None
    assert f"another osvm daemon (pid {osvm.daemon.pid}) already uses {osvm.state_dir}" in result.stderr
    assert osvm.ping() is not None


def test_reapply_same_file_is_noop(osvm: Osvm):
    path = osvm.write_deployment({"web": web_spec("hello")})
    first = osvm.up(path)
    instance = osvm.wait_healthy("web")

    second = osvm.up(path)

    assert "web: revision 1 created" in first.stdout
    assert "web: revision 1 unchanged" in second.stdout
    applied = osvm.cli_json("up", str(path), "--detach")
    assert applied["changes"] == [{"action": "unchanged", "component": "web", "revision": 1}]
    again = osvm.wait_healthy("web")
    assert again["id"] == instance["id"]
    assert again["pid"] == instance["pid"]
    assert again["restarts"] == 0
    assert [revision["number"] for revision in osvm.cli_json("revisions", "web")["revisions"]] == [1]
    events = osvm.events("web")
    assert len([event for event in events if event["kind"] == "revision.created"]) == 1
    assert len([event for event in events if event["kind"] == "instance.started"]) == 1


def test_env_change_replaces_instance(osvm: Osvm):
    path = osvm.write_deployment({"web": web_spec("hello")})
    osvm.up(path)
    old = osvm.wait_healthy("web")
    assert greeting_of(old) == "hello"

    osvm.write_deployment({"web": web_spec("bonjour")})
    result = osvm.up(path)

    assert "web: revision 2 updated" in result.stdout
    new = osvm.wait_healthy("web")
    assert new["revision"] == 2
    assert new["id"] != old["id"]
    assert new["pid"] != old["pid"]
    assert greeting_of(new) == "bonjour"
    assert not is_alive(old["pid"])
    assert not osvm.cgroup_dir("pids", old["id"]).exists()
    assert osvm.instance_cgroups()["pids"] == [new["id"]]
    assert len(osvm.component_processes()) == 1
    assert [revision["number"] for revision in osvm.cli_json("revisions", "web")["revisions"]] == [1, 2]
    events = osvm.events("web")
    created = [event["reason"] for event in events if event["kind"] == "revision.created"]
    assert created == [f"revision 1 stored from {path}", f"revision 2 stored from {path}"]
    stopped = [event for event in events if event["kind"] == "instance.stopped"]
    assert [event["instance"] for event in stopped] == [old["id"]]
