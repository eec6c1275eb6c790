"""Time `osvm up` from start to exit, for 1, 10 and 100 trivial components, each on a fresh daemon.

`osvm up` returns once every component has a healthy instance, so its wall-clock time is the
time from command to all healthy. The daemon runs before the clock starts. Each run also reads the
daemon's events to split that time: when the deployment was stored, when the last instance
started, and when the last one turned healthy.

Run as root: .venv/bin/python bench/up_time.py [--sizes 1,10,100] [--runs 5,5,3]
"""

import argparse
import sys
import time
from typing import Any

import harness


def run_once(size: int, startup_interval: str, keep: bool) -> dict[str, Any]:
    """Start a daemon, time `osvm validate` and `osvm up` on `size` components, and stop it."""
    with harness.BenchDaemon(keep=keep) as daemon:
        path = harness.write_deployment(daemon.work_dir, size, str(daemon.state_dir), startup_interval)

        # `osvm validate` loads the same file with the same interpreter start-up, which is the
        # part of `osvm up` that does not involve the daemon.
        started = time.perf_counter()
        daemon.osvm("validate", str(path))
        validate_seconds = time.perf_counter() - started

        started = time.perf_counter()
        daemon.osvm("up", str(path), "--timeout", "600")
        up_seconds = time.perf_counter() - started

        status = daemon.status()
        healthy = sum(
            1
            for component in status["components"]
            if any(instance["health"] == "healthy" for instance in component["instances"])
        )
        if healthy != size:
            raise harness.BenchError(f"`osvm up` returned with {healthy} of {size} components healthy")
        phases = _phases(daemon.events())
        clean = daemon.stop()
    return {"up_seconds": up_seconds, "validate_seconds": validate_seconds, **phases, "clean": clean}


def _phases(events: list[dict[str, Any]]) -> dict[str, float]:
    """Return, from the daemon's events, seconds from the first stored revision to the first and last start and the last healthy."""
    def times(kind: str) -> list[float]:
        return [event["time"] for event in events if event["kind"] == kind]

    applied = min(times("revision.created"))
    return {
        "apply_to_first_started": min(times("instance.started")) - applied,
        "apply_to_last_started": max(times("instance.started")) - applied,
        "apply_to_last_healthy": max(times("instance.healthy")) - applied,
        # Each instance.unhealthy event is a probe that failed failure_threshold times in a row after its startup grace.
        "unhealthy_before_healthy": len(times("instance.unhealthy")),
    }


def _components(count: int) -> str:
    return "1 component" if count == 1 else f"{count} components"


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_int_list, default=[1, 10, 100], help="component counts (default 1,10,100)")
    parser.add_argument("--runs", type=_int_list, default=[5, 5, 3], help="runs per size, in the order of --sizes (default 5,5,3)")
    parser.add_argument("--startup-interval", default="50ms", help="probe startup_interval of every component (default 50ms)")
    parser.add_argument("--keep", action="store_true", help="keep the state and work directories of each run")
    args = parser.parse_args()
    if len(args.runs) != len(args.sizes):
        parser.error(f"--runs has {len(args.runs)} values but --sizes has {len(args.sizes)}: give one run count per size")
    harness.require_root()
    load_at_start = harness.load_average()

    results: dict[str, Any] = {
        "load_average_at_start": load_at_start,
        "startup_interval": args.startup_interval,
        "program": harness.PROGRAM,
        "sizes": [],
    }
    rows = []
    for size, runs in zip(args.sizes, args.runs):
        samples = []
        for run in range(runs):
            sample = run_once(size, args.startup_interval, args.keep)
            print(
                f"{_components(size)}, run {run + 1}/{runs}: up {sample['up_seconds']:.3f} s, "
                f"apply to last healthy {sample['apply_to_last_healthy']:.3f} s, "
                f"{sample['unhealthy_before_healthy']} instances unhealthy before healthy",
                file=sys.stderr,
                flush=True,
            )
            samples.append(sample)
        up = harness.summarize([sample["up_seconds"] for sample in samples])
        last_started = harness.summarize([sample["apply_to_last_started"] for sample in samples])
        last_healthy = harness.summarize([sample["apply_to_last_healthy"] for sample in samples])
        validate = harness.summarize([sample["validate_seconds"] for sample in samples])
        results["sizes"].append(
            {
                "components": size,
                "runs": samples,
                "up_seconds": up,
                "apply_to_last_started": last_started,
                "apply_to_last_healthy": last_healthy,
                "validate_seconds": validate,
            }
        )
        rows.append(
            [
                str(size),
                str(runs),
                f"{up['median']:.3f}",
                f"{up['min']:.3f}",
                f"{up['max']:.3f}",
                f"{last_started['median']:.3f}",
                f"{last_healthy['median']:.3f}",
                f"{validate['median']:.3f}",
            ]
        )

    print("osvm up to all healthy (seconds; the daemon columns come from its event times)")
    harness.print_table(
        ["COMPONENTS", "RUNS", "UP MEDIAN", "UP MIN", "UP MAX", "LAST STARTED", "LAST HEALTHY", "VALIDATE"],
        rows,
    )
    results["summary"] = [
        f"osvm up, {_components(entry['components'])}: median {entry['up_seconds']['median']:.3f} s "
        f"(min {entry['up_seconds']['min']:.3f}, max {entry['up_seconds']['max']:.3f}, {entry['up_seconds']['n']} runs)"
        for entry in results["sizes"]
    ]
    print(f"results: {harness.write_results('up_time', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
