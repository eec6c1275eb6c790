"""End-to-end: errors of the `osvm` command line name what failed and what to do."""

import json

import pytest

from e2e import SLEEPER, Osvm, python_command, wait_for

pytestmark = pytest.mark.root


def test_validate_rejects_bad_file(osvm_stopped: Osvm):
    path = osvm_stopped.base / "bad.toml"
    path.write_text(
        'name = "bad"\n'
        "[components.app]\n"
        'command = ["/bin/true"]\n'
        'restart = { policy = "sometimes" }\n'
        "[components.app.resources]\n"
        "pids = 0\n"
    )

    result = osvm_stopped.cli("validate", str(path), check=False)

    assert result.returncode != 0
    errors = result.stderr.splitlines()
    assert len(errors) == 2, result.stderr
    assert all(line.startswith(f"osvm: error: {path}: components.app.") for line in errors), result.stderr
    assert any("components.app.restart.policy:" in line and "sometimes" in line for line in errors)
    assert any("components.app.resources.pids:" in line for line in errors)
    assert osvm_stopped.ping() is None


def test_validate_accepts_good_file(osvm_stopped: Osvm):
    path = osvm_stopped.write_deployment({"app": {"command": python_command(SLEEPER)}})

    result = osvm_stopped.cli("validate", str(path))

    assert result.stdout.strip() == f"{path}: valid: deployment 'e2e' with 1 component(s): app"


def test_status_without_daemon(osvm_stopped: Osvm):
    result = osvm_stopped.cli("status", check=False)

    assert result.returncode == 1
    assert f"cannot reach the osvm daemon on {osvm_stopped.socket}" in result.stderr
    assert "start it with `osvm daemon` or `osvm up FILE`" in result.stderr
    assert not osvm_stopped.socket.exists()
    assert osvm_stopped.ping() is None


def test_logs_of_unknown_component(osvm: Osvm):
    result = osvm.cli("logs", "unknown", check=False)

    assert result.returncode == 1
    assert "component 'unknown'" in result.stderr
    assert "osvm status" in result.stderr


def test_up_rejects_undeclared_port_reference(osvm: Osvm):
    path = osvm.write_deployment(
        {"app": {"command": python_command(SLEEPER) + ["--port", "${OSVM_PORT_NOPE}"], "ports": {"http": 0}}}
    )

    result = osvm.cli("up", str(path), check=False)

    assert result.returncode == 1
    assert f"{path}: components.app.command[5]:" in result.stderr
    assert "${OSVM_PORT_NOPE} refers to port 'nope', which is not in ports (declared: http)" in result.stderr
    assert osvm.status()["components"] == []
    assert osvm.stored_instance_ids() == []
    assert osvm.instance_cgroups() == {}


def test_up_rejects_unset_variable_reference(osvm: Osvm):
    path = osvm.write_deployment({"app": {"command": python_command(SLEEPER) + ["--name", "${NOPE_NAME}"]}})

    result = osvm.cli("up", str(path), check=False)

    assert result.returncode == 1
    assert "component app: command references ${NOPE_NAME}, which is not set" in result.stderr
    assert osvm.status()["components"] == []
    assert osvm.stored_instance_ids() == []
    assert osvm.instance_cgroups() == {}


def test_logs_json_lines(osvm: Osvm):
    source = """
import sys, time
print("first line", flush=True)
print("second line: naïve", file=sys.stderr, flush=True)
print("third line", flush=True)
while True:
    time.sleep(3600)
"""
    osvm.up(osvm.write_deployment({"chatty": {"command": python_command(source), "stop_grace_period": "2s"}}))
    instance = osvm.instance("chatty")

    def three_lines() -> list[dict[str, str]] | None:
        output = osvm.cli("logs", "chatty", "--json").stdout
        lines = [json.loads(line) for line in output.splitlines()]
        return lines if len(lines) >= 3 else None

    lines = wait_for(three_lines, "three lines in `osvm logs chatty --json`")
    assert lines == [
        {"component": "chatty", "instance": instance["id"], "text": "first line"},
        {"component": "chatty", "instance": instance["id"], "text": "second line: naïve"},
        {"component": "chatty", "instance": instance["id"], "text": "third line"},
    ]

    tail = osvm.cli("logs", "chatty", "--json", "--tail", "1").stdout
    assert [json.loads(line)["text"] for line in tail.splitlines()] == ["third line"]
