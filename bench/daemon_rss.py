"""Memory of the daemon with 100 trivial components running, and of the components themselves.

Reads the daemon's VmRSS from /proc/PID/status before `osvm up`, once all components are healthy,
and again after a steady period (30 s by default) in which only the probes run. The components'
memory is summed over every process in their cgroups, as RSS (which counts shared pages once per
process) and as PSS (which divides shared pages among the processes that map them).

Run as root: .venv/bin/python bench/daemon_rss.py [--components 100] [--steady 30]
"""

import argparse
import os
import sys
import time
from typing import Any

import harness


def daemon_sample(pid: int) -> dict[str, Any]:
    return {
        "vm_rss_kib": harness.read_status_number(pid, "VmRSS"),
        "vm_hwm_kib": harness.read_status_number(pid, "VmHWM"),
        "pss_kib": harness.read_pss_kib(pid),
        "threads": harness.read_status_number(pid, "Threads"),
        "open_fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def component_memory(daemon: harness.BenchDaemon, instance_ids: list[str]) -> dict[str, Any]:
    """Sum RSS and PSS over the instances' processes, split into the commands and the sandbox processes."""
    totals = {
        "command": {"processes": 0, "rss_kib": 0, "pss_kib": 0},
        "sandbox": {"processes": 0, "rss_kib": 0, "pss_kib": 0},
    }
    for instance_id in instance_ids:
        for pid in daemon.instance_pids(instance_id):
            argv = harness.read_cmdline(pid)
            rss = harness.read_status_number(pid, "VmRSS")
            pss = harness.read_pss_kib(pid)
            if not argv or rss is None or pss is None:
                continue
            group = totals["command"] if argv[0] == harness.PROGRAM else totals["sandbox"]
            group["processes"] += 1
            group["rss_kib"] += rss
            group["pss_kib"] += pss
    return totals


def measure(count: int, steady: float, startup_interval: str, keep: bool) -> dict[str, Any]:
    with harness.BenchDaemon(keep=keep) as daemon:
        path = harness.write_deployment(daemon.work_dir, count, str(daemon.state_dir), startup_interval)
        status = daemon.status()
        if status["daemon"]["pid"] != daemon.pid:
            raise harness.BenchError(f"status reports daemon pid {status['daemon']['pid']}, but this run started pid {daemon.pid}")
        idle = daemon_sample(daemon.pid)

        started = time.perf_counter()
        daemon.osvm("up", str(path), "--timeout", "600")
        up_seconds = time.perf_counter() - started
        instance_ids = [component["instances"][0]["id"] for component in daemon.status()["components"]]
        if len(instance_ids) != count:
            raise harness.BenchError(f"status lists {len(instance_ids)} instances after `osvm up` of {count} components")
        healthy = daemon_sample(daemon.pid)
        healthy_components = component_memory(daemon, instance_ids)

        cpu_before = harness.read_cpu_seconds(daemon.pid)
        time.sleep(steady)
        cpu_after = harness.read_cpu_seconds(daemon.pid)
        after_steady = daemon_sample(daemon.pid)
        steady_components = component_memory(daemon, instance_ids)

        unhealthy = [
            component["name"]
            for component in daemon.status()["components"]
            if not any(instance["health"] == "healthy" for instance in component["instances"])
        ]
        if unhealthy:
            raise harness.BenchError(f"components not healthy after the steady period: {', '.join(unhealthy)}")
        clean = daemon.stop()
    return {
        "up_seconds": up_seconds,
        "daemon_idle": idle,
        "daemon_all_healthy": healthy,
        "daemon_after_steady": after_steady,
        "daemon_cpu_percent_steady": 100 * (cpu_after - cpu_before) / steady,
        "components_all_healthy": healthy_components,
        "components_after_steady": steady_components,
        "clean": clean,
    }


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--components", type=int, default=100, help="number of components (default 100)")
    parser.add_argument("--steady", type=float, default=30.0, help="seconds to wait after all are healthy (default 30)")
    parser.add_argument("--startup-interval", default="50ms", help="probe startup_interval (default 50ms)")
    parser.add_argument("--keep", action="store_true", help="keep the state and work directories")
    args = parser.parse_args()
    harness.require_root()
    load_at_start = harness.load_average()

    run = measure(args.components, args.steady, args.startup_interval, args.keep)
    results = {
        "load_average_at_start": load_at_start,
        "components": args.components,
        "steady_seconds": args.steady,
        "program": harness.PROGRAM,
        **run,
    }

    print(f"daemon memory with {args.components} components (MiB)")
    rows = []
    for label, key in (
        ("daemon before osvm up", "daemon_idle"),
        ("daemon, all healthy", "daemon_all_healthy"),
        (f"daemon, after {args.steady:g} s steady", "daemon_after_steady"),
    ):
        sample = run[key]
        rows.append([label, _mib(sample["vm_rss_kib"]), _mib(sample["pss_kib"]), _mib(sample["vm_hwm_kib"]), str(sample["threads"]), str(sample["open_fds"])])
    harness.print_table(["WHEN", "VMRSS", "PSS", "VMHWM", "THREADS", "FDS"], rows)
    print()
    print(f"component processes (MiB), daemon CPU in the steady period: {run['daemon_cpu_percent_steady']:.1f} % of one core")
    rows = []
    for when, key in (("all healthy", "components_all_healthy"), (f"after {args.steady:g} s steady", "components_after_steady")):
        for group in ("command", "sandbox"):
            totals = run[key][group]
            rows.append([when, group, str(totals["processes"]), _mib(totals["rss_kib"]), _mib(totals["pss_kib"])])
    harness.print_table(["WHEN", "PROCESSES", "COUNT", "RSS SUM", "PSS SUM"], rows)

    steady_rss = run["daemon_after_steady"]["vm_rss_kib"]
    commands = run["components_after_steady"]["command"]
    results["summary"] = [
        f"daemon VmRSS with {args.components} components: {_mib(run['daemon_all_healthy']['vm_rss_kib'])} MiB all healthy, "
        f"{_mib(steady_rss)} MiB after {args.steady:g} s (idle {_mib(run['daemon_idle']['vm_rss_kib'])} MiB); "
        f"component commands: RSS sum {_mib(commands['rss_kib'])} MiB, PSS sum {_mib(commands['pss_kib'])} MiB"
    ]
    print(f"results: {harness.write_results('daemon_rss', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
