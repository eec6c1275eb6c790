"""End-to-end: cgroup limits of an instance, enforced by the kernel."""

import time

import pytest

from e2e import Osvm, python_command, wait_for

pytestmark = pytest.mark.root

MIB = 1024 * 1024

# Allocates and touches 4 MiB at a time until the OOM killer ends it.
MEMORY_HOG = """
import time
chunks = []
while True:
    chunks.append(b"x" * (4 << 20))
    print("allocated", 4 * len(chunks), "MiB", flush=True)
    time.sleep(0.01)
"""

# Starts `sleep 30` children without end, and keeps running when the pids limit refuses a fork.
FORK_LOOP = """
import subprocess, time
children = []
refused = 0
while True:
    try:
        children.append(subprocess.Popen(["sleep", "30"]))
    except OSError as error:
        refused += 1
        if refused == 1 or refused % 100 == 0:
            print(f"fork refused {refused} times: {error}", flush=True)
        time.sleep(0.02)
    children = [child for child in children if child.poll() is None]
"""


def test_memory_limit_oom_kill(osvm: Osvm):
    path = osvm.write_deployment(
        {
            "hog": {
                "command": python_command(MEMORY_HOG),
                "resources": {"memory": "64MiB"},
                "restart": {"policy": "never"},
            }
        }
    )
    osvm.up(path, "--detach")

    component = osvm.wait_status("hog", "exited")

    assert component["reason"] == (
        "killed by the kernel OOM killer at the memory limit, not restarting (restart policy is never)"
    )
    (exited,) = [event for event in osvm.events("hog") if event["kind"] == "instance.exited"]
    assert "OOM killer" in exited["reason"]
    output = osvm.cli("logs", "hog").stdout
    assert "allocated 4 MiB" in output
    assert "allocated 128 MiB" not in output


def test_pids_limit_caps_fork_loop(osvm: Osvm):
    path = osvm.write_deployment(
        {
            "forker": {
                "command": python_command(FORK_LOOP),
                "resources": {"pids": 32, "memory": "256MiB", "cpus": 0.5},
                "stop_grace_period": "1s",
            }
        }
    )
    osvm.up(path)
    instance = osvm.instance("forker")
    pids_dir = osvm.cgroup_dir("pids", instance["id"])

    assert (pids_dir / "pids.max").read_text().strip() == "32"
    memory_dir = osvm.cgroup_dir("memory", instance["id"])
    assert int((memory_dir / "memory.limit_in_bytes").read_text()) == 256 * MIB
    cpu_dir = osvm.cgroup_dir("cpu", instance["id"])
    assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (cpu_dir / "cpu.cfs_period_us").read_text().strip() == "100000"

    def refused_forks() -> int:
        # pids.events counts the forks that pids.max refused, as "max N".
        return int((pids_dir / "pids.events").read_text().split()[1])

    wait_for(refused_forks, "the pids limit to refuse a fork")
    samples = []
    for _ in range(20):
        samples.append(int((pids_dir / "pids.current").read_text()))
        time.sleep(0.1)
    assert max(samples) <= 32
    assert max(samples) >= 30, f"the fork loop should fill the limit, samples: {samples}"
    assert "fork refused" in osvm.cli("logs", "forker").stdout
    after = osvm.instance("forker")
    assert after["state"] == "running"
    assert after["pid"] == instance["pid"]
    assert after["restarts"] == 0

    osvm.cli("stop", "forker")

    assert osvm.component("forker")["status"] == "stopped"
    assert osvm.processes() == []
    assert not pids_dir.exists()
