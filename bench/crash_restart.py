"""Time from a crash to the restarted instance: SIGKILL the component's command 100 times.

One trivial component runs with the smallest practical restart delay (backoff 1 ms, multiplier 1,
so every restart waits about 1 ms) and a restart limit far above the number of kills. Each
iteration finds the command in the instance's cgroup, records the time, sends SIGKILL, and reads
`osvm events -f --json` until the instance is started and healthy again. The latencies use the
daemon's event times, so they do not include the time the event takes to reach this script. The
tcp probe retries every 10 ms until it passes, so kill -> healthy is at most 10 ms later than the
moment the restarted command listens (plus the probe's own run time).

Run as root: .venv/bin/python bench/crash_restart.py [--kills 100]
"""

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import harness

RESTART = {
    "policy": "always",
    "max_restarts": 1000,
    "window": "1h",
    # Any duration above zero is valid. 1 ms is far below the other costs of a restart.
    "backoff_initial": "1ms",
    "backoff_max": "1ms",
    "backoff_multiplier": 1.0,
}

EVENT_TIMEOUT = 30.0
FIND_TIMEOUT = 10.0


class EventReader:
    """Read `osvm events -f --json` in a thread and hand each event over with its arrival time."""

    def __init__(self, process: subprocess.Popen[str]):
        self.process = process
        self.events: "queue.Queue[tuple[float, dict[str, Any]]]" = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip():
                self.events.put((time.time(), json.loads(line)))

    def wait_for(self, instance_id: str, kind: str, after: float) -> tuple[float, dict[str, Any]]:
        """Return the arrival time and the first event of this kind for the instance published after `after`."""
        deadline = time.monotonic() + EVENT_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise harness.BenchError(f"no {kind} event of instance {instance_id} within {EVENT_TIMEOUT:g} s")
            try:
                arrival, event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if event["instance"] == instance_id and event["kind"] == kind and event["time"] > after:
                return arrival, event
            if event["instance"] == instance_id and event["kind"] == "instance.failed":
                raise harness.BenchError(f"instance {instance_id} failed: {event['reason']}")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _find_command(daemon: harness.BenchDaemon, instance_id: str, previous: int | None) -> int:
    """Return the pid of the instance's command, waiting until it is a process other than `previous`."""
    deadline = time.monotonic() + FIND_TIMEOUT
    while time.monotonic() < deadline:
        pid = daemon.command_pid(instance_id)
        if pid is not None and pid != previous:
            return pid
        time.sleep(0.01)
    raise harness.BenchError(f"no new command process in the cgroup of instance {instance_id} within {FIND_TIMEOUT:g} s")


def measure(kills: int, pause: float, startup_interval: str, keep: bool) -> dict[str, Any]:
    with harness.BenchDaemon(keep=keep) as daemon:
        path = harness.write_deployment(daemon.work_dir, 1, str(daemon.state_dir), startup_interval, RESTART)
        daemon.osvm("up", str(path))
        instance = daemon.status()["components"][0]["instances"][0]
        instance_id = instance["id"]

        reader = EventReader(daemon.follow_events())
        samples = []
        command_pid: int | None = None
        try:
            # The follower is subscribed once it has printed the newest past event.
            reader.events.get(timeout=EVENT_TIMEOUT)
            for index in range(kills):
                command_pid = _find_command(daemon, instance_id, command_pid)
                killed_at = time.time()
                os.kill(command_pid, signal.SIGKILL)
                _, exited = reader.wait_for(instance_id, "instance.backoff", killed_at)
                started_arrival, started = reader.wait_for(instance_id, "instance.started", killed_at)
                _, healthy = reader.wait_for(instance_id, "instance.healthy", started["time"])
                samples.append(
                    {
                        "command_pid": command_pid,
                        "kill_to_exit_seen": exited["time"] - killed_at,
                        "kill_to_started": started["time"] - killed_at,
                        "kill_to_healthy": healthy["time"] - killed_at,
                        "started_event_delivery": started_arrival - started["time"],
                    }
                )
                if (index + 1) % 10 == 0:
                    print(f"{index + 1}/{kills} kills", file=sys.stderr, flush=True)
                time.sleep(pause)
        finally:
            reader.close()

        restarts = daemon.status()["components"][0]["instances"][0]["restarts"]
        if restarts != kills:
            raise harness.BenchError(f"status reports {restarts} restarts after {kills} kills")
        clean = daemon.stop()
    return {"instance": instance_id, "restarts_reported": restarts, "samples": samples, "clean": clean}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="number of SIGKILLs (default 100)")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between healthy and the next kill (default 0.2)")
    parser.add_argument("--startup-interval", default="10ms", help="probe startup_interval (default 10ms)")
    parser.add_argument("--keep", action="store_true", help="keep the state and work directories")
    args = parser.parse_args()
    harness.require_root()
    load_at_start = harness.load_average()

    run = measure(args.kills, args.pause, args.startup_interval, args.keep)
    figures = {
        key: harness.summarize([sample[key] for sample in run["samples"]])
        for key in ("kill_to_exit_seen", "kill_to_started", "kill_to_healthy", "started_event_delivery")
    }
    results = {
        "load_average_at_start": load_at_start,
        "kills": args.kills,
        "pause_seconds": args.pause,
        "startup_interval": args.startup_interval,
        "restart": RESTART,
        "program": harness.PROGRAM,
        "figures": figures,
        **run,
    }

    labels = {
        "kill_to_exit_seen": "kill -> exit seen (instance.backoff)",
        "kill_to_started": "kill -> instance.started",
        "kill_to_healthy": "kill -> instance.healthy",
        "started_event_delivery": "instance.started -> read by the follower",
    }
    print(f"crash to restart over {args.kills} SIGKILLs (milliseconds)")
    rows = [
        [labels[key], f"{figure['median'] * 1000:.1f}", f"{figure['p99'] * 1000:.1f}", f"{figure['min'] * 1000:.1f}", f"{figure['max'] * 1000:.1f}"]
        for key, figure in figures.items()
    ]
    harness.print_table(["INTERVAL", "MEDIAN", "P99", "MIN", "MAX"], rows)
    results["summary"] = [
        f"crash to restart, {args.kills} kills: kill -> started median {figures['kill_to_started']['median'] * 1000:.1f} ms "
        f"(p99 {figures['kill_to_started']['p99'] * 1000:.1f}), kill -> healthy median "
        f"{figures['kill_to_healthy']['median'] * 1000:.1f} ms (p99 {figures['kill_to_healthy']['p99'] * 1000:.1f})"
    ]
    print(f"results: {harness.write_results('crash_restart', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
