"""Hot-swap benchmark: blue-green swaps of ganache under load, naive restarts, and proxy overhead.

One run measures three parts, so their ratios compare like with like:

1. osvm: the ganache `rpc` component of examples/local-rpc.toml behind its http endpoint, swapped
   --swaps times between ganache 7.9.1 and 7.9.2 with `osvm deploy rpc --file FILE --json`, while
   the load generator (loadgen.py) sends eth_blockNumber through the endpoint. Once with
   keep-alive clients and once with a new connection per request. wrk then runs against the same
   endpoint to check that the load generator is not the bottleneck.
2. naive: the same ganache as a plain child process on a fixed port, stopped with SIGINT and
   started as the other version on the same port, --swaps times, under the same load.
3. overhead: wrk against a fixed-response backend (HAProxy returning one response with
   `http-request return`, run as an osvm component) directly, through the component's osvm endpoint, and through
   HAProxy 2.6 as a proxy with one thread and with one thread per CPU.

It writes bench/results/hotswap.json, per-request CSV files under bench/results/hotswap-requests/,
and prints a summary. Run it through bench/hotswap/run.sh, as root.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import analyze
import services
from services import BenchError, Daemon, LoadRun

RESULTS_DIR = services.REPO / "bench" / "results"
RESULT_PATH = RESULTS_DIR / "hotswap.json"
REQUESTS_DIR = RESULTS_DIR / "hotswap-requests"
CGROUP_ROOT = Path("/sys/fs/cgroup")
VERSIONS = ("7.9.2", "7.9.1")
# Half-width of the window around the moment traffic moves to green, in seconds.
SWITCH_WINDOW = 0.5

# Plain processes started by this run (ganache, HAProxy), stopped by pid in cleanup().
started_processes: list[subprocess.Popen] = []


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=20, help="swaps per load mode, in each of the osvm and naive parts (default 20)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent clients and wrk connections (default 64)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the steady window, not counted (default 3)")
    parser.add_argument("--steady", type=float, default=15.0, help="seconds of steady state measured before the first swap (default 15)")
    parser.add_argument("--gap", type=float, default=3.0, help="seconds between the end of one swap and the start of the next (default 3)")
    parser.add_argument("--after", type=float, default=5.0, help="extra seconds of load after the last swap's gap (default 5)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a request may take before it counts as failed (default 5)")
    parser.add_argument("--failure-pause", type=float, default=0.01, help="seconds a client waits after a failed request (default 0.01)")
    parser.add_argument("--check-duration", type=float, default=10.0, help="seconds of each wrk and load generator check run (default 10)")
    parser.add_argument("--overhead-duration", type=float, default=10.0, help="seconds of each wrk run in the overhead part (default 10)")
    parser.add_argument("--overhead-rounds", type=int, default=3, help="rounds over the overhead targets, medians reported (default 3)")
    parser.add_argument("--modes", default="keep-alive,new-connection", help="load modes, comma-separated (default keep-alive,new-connection)")
    parser.add_argument("--parts", default="osvm,naive,overhead", help="parts to run, comma-separated (default osvm,naive,overhead)")
    parser.add_argument("--keep", action="store_true", help="keep the work and state directories for inspection")
    args = parser.parse_args()
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    for mode in args.modes:
        if mode not in ("keep-alive", "new-connection"):
            parser.error(f"invalid mode {mode!r} in --modes: use keep-alive and new-connection")
    for part in args.parts:
        if part not in ("osvm", "naive", "overhead"):
            parser.error(f"invalid part {part!r} in --parts: use osvm, naive and overhead")
    if args.swaps < 1:
        parser.error(f"--swaps must be at least 1, not {args.swaps}")
    return args


def preflight() -> None:
    if os.geteuid() != 0:
        sys.exit("the hot-swap benchmark runs isolated instances and must run as root")
    missing = [str(path) for path in (services.OSVM, Path(services.HAPROXY), Path(services.WRK)) if not path.exists()]
    for version in VERSIONS:
        program = Path(services.ganache_command(version, 0)[0])
        if not program.exists():
            missing.append(str(program))
    if missing:
        sys.exit(f"missing: {', '.join(missing)}: run scripts/setup, and apt-get install haproxy wrk")


# --- part 1: blue-green swaps through the osvm endpoint ------------------------------------


def run_osvm_part(args: argparse.Namespace, daemon: Daemon, work_dir: Path) -> dict[str, Any]:
    listen_port = services.free_port()
    files = {version: services.write_rpc_deployment(version, work_dir, listen_port) for version in VERSIONS}
    print(f"osvm: `osvm up {files['7.9.2']}` with the endpoint on 127.0.0.1:{listen_port}", flush=True)
    daemon.osvm("up", str(files["7.9.2"]), "--timeout", "300")
    current = "7.9.2"
    part: dict[str, Any] = {"endpoint": f"127.0.0.1:{listen_port}", "deployment_files": {v: str(p) for v, p in files.items()}, "runs": {}}

    for mode in args.modes:
        print(f"osvm [{mode}]: {args.warmup:g} s warm-up, {args.steady:g} s steady, then {args.swaps} swaps", flush=True)
        output = work_dir / f"osvm-{mode}.bin"
        cpu_before = process_cpu_seconds(daemon.process.pid)
        load = LoadRun(listen_port, mode, args.connections, output, args.timeout, args.failure_pause)
        started_processes.append(load.process)
        time.sleep(args.warmup)
        steady_begin = time.monotonic()
        time.sleep(args.steady)

        swaps = []
        for index in range(1, args.swaps + 1):
            target = "7.9.1" if current == "7.9.2" else "7.9.2"
            swap = deploy(daemon, files[target], index, current, target)
            swaps.append(swap)
            if swap["state"] == "complete":
                current = target
            phases = " ".join(f"{name}={seconds:.1f}s" for name, seconds in swap["phase_seconds"].items())
            print(f"  swap {index:2d}: {swap['from']} -> {swap['to']} {swap['state']} in {swap['command_s']:.1f} s ({phases})", flush=True)
            time.sleep(args.gap)
        time.sleep(args.after)
        end = time.monotonic()
        summary = load.stop()
        started_processes.remove(load.process)
        cpu_after = process_cpu_seconds(daemon.process.pid)

        records = analyze.Records(output)
        run = analyze_swap_run(records, load.started, steady_begin, swaps, end, summary["ended_monotonic"])
        run["loadgen"] = summary
        run["daemon_cpu_seconds"] = round(cpu_after - cpu_before, 2)
        run["endpoint_status_after"] = daemon.component("rpc").get("endpoint")
        run["requests_csv"] = write_requests_csv(records, f"osvm-{mode}", load.started)
        run["loadgen_check"] = compare_with_wrk(args, listen_port, mode)
        part["runs"][mode] = run
        output.unlink()

    daemon.osvm("down", timeout=300)
    return part


def deploy(daemon: Daemon, file: Path, index: int, current: str, target: str) -> dict[str, Any]:
    """Run one `osvm deploy rpc --file FILE --json` and return its timestamps and rollout."""
    # Phases carry wall-clock times. This offset turns them into time.monotonic() values.
    clock_offset = time.time() - time.monotonic()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    begin = time.monotonic()
    result = daemon.osvm("deploy", "rpc", "--file", str(file), "--json", timeout=900, check=False)
    end = time.monotonic()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cli_cpu = (children_after.ru_utime - children_before.ru_utime) + (children_after.ru_stime - children_before.ru_stime)

    try:
        rollout = json.loads(result.stdout).get("rollout", {})
    except ValueError:
        rollout = {}

    phases = []
    for phase in rollout.get("phases", []):
        finished = phase["finished_at"] if phase["finished_at"] is not None else rollout.get("finished_at")
        phases.append({
            "phase": phase["phase"],
            "begin": phase["started_at"] - clock_offset,
            "end": (finished - clock_offset) if finished is not None else end,
        })

    return {
        "index": index,
        "from": current,
        "to": target,
        "begin": begin,
        "end": end,
        "command_s": round(end - begin, 3),
        "cli_cpu_s": round(cli_cpu, 3),
        "exit_status": result.returncode,
        "stderr": result.stderr.strip()[-2000:],
        "state": rollout.get("state", "unknown"),
        "reason": rollout.get("reason", ""),
        "rollout_id": rollout.get("id"),
        "rollout_s": round(rollout["finished_at"] - rollout["created_at"], 3) if rollout.get("finished_at") else None,
        "closed_connections": rollout.get("closed_connections"),
        "phases": phases,
        "phase_seconds": {phase["phase"]: round(phase["end"] - phase["begin"], 3) for phase in phases},
    }


def analyze_swap_run(
    records: analyze.Records, origin: float, steady_begin: float, swaps: list[dict[str, Any]], end: float, load_end: float
) -> dict[str, Any]:
    """Summarize a run by window: steady before the first swap, during swaps, between and after them.

    `origin` is the load generator's start and `load_end` its end. The whole run includes the warm-up.
    """
    during = [(swap["begin"], swap["end"]) for swap in swaps]
    between = [(swaps[index]["end"], swaps[index + 1]["begin"]) for index in range(len(swaps) - 1)]
    between.append((swaps[-1]["end"], end))

    by_phase: dict[str, list[tuple[float, float]]] = {}
    for swap in swaps:
        if swap["phases"]:
            # The deploy command starts (Python imports, file validation) before the daemon
            # creates the rollout, and polls until after the rollout's last phase ended.
            by_phase.setdefault("cli_before_rollout", []).append((swap["begin"], swap["phases"][0]["begin"]))
            by_phase.setdefault("cli_after_rollout", []).append((swap["phases"][-1]["end"], swap["end"]))
        for phase in swap["phases"]:
            by_phase.setdefault(phase["phase"], []).append((phase["begin"], phase["end"]))
        promoted = next((phase for phase in swap["phases"] if phase["phase"] == "promoted"), None)
        if promoted is not None:
            by_phase.setdefault("switch", []).append((promoted["begin"] - SWITCH_WINDOW, promoted["begin"] + SWITCH_WINDOW))

    windows = {
        "steady": records.summarize([(steady_begin, swaps[0]["begin"])]),
        "during_swaps": records.summarize(during),
        "between_and_after": records.summarize(between),
        "whole_run": records.summarize([(origin, load_end + 0.001)]),
    }
    phases = {name: records.summarize(intervals) for name, intervals in by_phase.items()}
    swap_rows = []
    for swap in swaps:
        window = records.summarize([(swap["begin"], swap["end"])])
        swap_rows.append({
            **{key: value for key, value in swap.items() if key not in ("begin", "end", "phases")},
            "begin_s": round(swap["begin"] - origin, 3),
            "end_s": round(swap["end"] - origin, 3),
            "phases": [
                {"phase": phase["phase"], "begin_s": round(phase["begin"] - origin, 3), "end_s": round(phase["end"] - origin, 3)}
                for phase in swap["phases"]
            ],
            "requests": window["requests"],
            "failed": window["failed"],
            "p50_ms": window["p50_ms"],
            "p99_ms": window["p99_ms"],
        })
    return {
        "windows": windows,
        "phases": phases,
        "p99_during_over_steady": analyze.ratio(windows["during_swaps"]["p99_ms"], windows["steady"]["p99_ms"]),
        "p99_switch_over_steady": analyze.ratio(phases.get("switch", {}).get("p99_ms"), windows["steady"]["p99_ms"]),
        "swaps": swap_rows,
        "all_complete": all(swap["state"] == "complete" for swap in swaps),
        "steady_begin_s": round(steady_begin - origin, 3),
        "end_s": round(end - origin, 3),
        "timeline_1s": records.timeline(origin, end),
    }


def compare_with_wrk(args: argparse.Namespace, port: int, mode: str) -> dict[str, Any]:
    """Run wrk and the load generator against the same steady endpoint, in the order wrk, load generator, load generator, wrk.

    The mirrored order spreads a drift of the machine's load over both tools equally.
    """
    close = mode == "new-connection"
    print(f"  check [{mode}]: wrk and the load generator, twice each, {args.check_duration:g} s per run", flush=True)
    runs: list[dict[str, Any]] = []
    for tool in ("wrk", "loadgen", "loadgen", "wrk"):
        if tool == "wrk":
            result = services.run_wrk(port, args.connections, args.check_duration, threads=1, close=close)
            runs.append({"tool": "wrk", "requests_per_second": result["requests_per_second"], "p99_ms": result.get("p99_ms"), "output": result["output"]})
        else:
            result = services.run_loadgen_for(port, mode, args.connections, args.check_duration, args.timeout, args.failure_pause)
            runs.append({
                "tool": "loadgen",
                "requests_per_second": result["requests_per_second"],
                "failed": result["failed"],
                "cpu_share_of_one_core": result["cpu_share_of_one_core"],
            })
    wrk_mean = statistics.mean(run["requests_per_second"] for run in runs if run["tool"] == "wrk")
    loadgen_mean = statistics.mean(run["requests_per_second"] for run in runs if run["tool"] == "loadgen")
    return {
        "runs": runs,
        "wrk_requests_per_second": round(wrk_mean, 1),
        "loadgen_requests_per_second": round(loadgen_mean, 1),
        "loadgen_over_wrk_throughput": analyze.ratio(loadgen_mean, wrk_mean),
    }


# --- part 2: naive stop and start on a fixed port ------------------------------------------


def run_naive_part(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    port = services.free_port()
    log_path = work_dir / "ganache-naive.log"
    part: dict[str, Any] = {"address": f"127.0.0.1:{port}", "stop_signal": "SIGINT", "runs": {}}
    for mode in args.modes:
        print(f"naive [{mode}]: ganache on 127.0.0.1:{port}, {args.steady:g} s steady, then {args.swaps} stop-and-start swaps", flush=True)
        current = "7.9.2"
        process, _ = start_ganache(current, port, log_path)
        output = work_dir / f"naive-{mode}.bin"
        load = LoadRun(port, mode, args.connections, output, args.timeout, args.failure_pause)
        started_processes.append(load.process)
        time.sleep(args.warmup)
        steady_begin = time.monotonic()
        time.sleep(args.steady)

        swaps = []
        for index in range(1, args.swaps + 1):
            target = "7.9.1" if current == "7.9.2" else "7.9.2"
            begin = time.monotonic()
            stop_started_process(process, signal.SIGINT, 10.0)
            stopped = time.monotonic()
            process, ready = start_ganache(target, port, log_path)
            # ganache's program is a node script, so the started pid is node itself.
            start_cpu = process_cpu_seconds(process.pid)
            swaps.append({
                "index": index, "from": current, "to": target, "begin": begin, "stopped": stopped, "ready": ready, "start_cpu_s": start_cpu,
            })
            print(
                f"  swap {index:2d}: {current} -> {target}: stopped in {stopped - begin:.1f} s, responding after {ready - begin:.1f} s, "
                f"{start_cpu:.1f} CPU seconds to start",
                flush=True,
            )
            current = target
            time.sleep(args.gap)
        time.sleep(args.after)
        end = time.monotonic()
        summary = load.stop()
        started_processes.remove(load.process)
        stop_started_process(process, signal.SIGINT, 10.0)

        records = analyze.Records(output)
        part["runs"][mode] = analyze_naive_run(records, load.started, steady_begin, swaps, end, summary["ended_monotonic"])
        part["runs"][mode]["loadgen"] = summary
        part["runs"][mode]["requests_csv"] = write_requests_csv(records, f"naive-{mode}", load.started)
        output.unlink()
    return part


def analyze_naive_run(
    records: analyze.Records, origin: float, steady_begin: float, swaps: list[dict[str, Any]], end: float, load_end: float
) -> dict[str, Any]:
    rows = []
    for index, swap in enumerate(swaps):
        window_end = swaps[index + 1]["begin"] if index + 1 < len(swaps) else end
        outage = records.outage(swap["begin"], window_end)
        rows.append({
            "index": swap["index"],
            "from": swap["from"],
            "to": swap["to"],
            "begin_s": round(swap["begin"] - origin, 3),
            "stop_s": round(swap["stopped"] - swap["begin"], 3),
            "ready_after_s": round(swap["ready"] - swap["begin"], 3),
            "start_cpu_s": swap["start_cpu_s"],
            "failed": outage["failed"],
            "downtime_s": round(outage["downtime_s"], 3) if outage["downtime_s"] is not None else None,
        })
    during = [(swap["begin"], swap["ready"]) for swap in swaps]
    downtimes = [row["downtime_s"] for row in rows if row["downtime_s"] is not None]
    return {
        "windows": {
            "steady": records.summarize([(steady_begin, swaps[0]["begin"])]),
            "stop_to_ready": records.summarize(during),
            "whole_run": records.summarize([(origin, load_end + 0.001)]),
        },
        "swaps": rows,
        "downtime_s": {
            "median": round(statistics.median(downtimes), 3) if downtimes else None,
            "min": min(downtimes) if downtimes else None,
            "max": max(downtimes) if downtimes else None,
            "total": round(sum(downtimes), 3),
        },
        "steady_begin_s": round(steady_begin - origin, 3),
        "end_s": round(end - origin, 3),
        "timeline_1s": records.timeline(origin, end),
    }


def start_ganache(version: str, port: int, log_path: Path) -> tuple[subprocess.Popen, float]:
    """Start ganache on the port; return the process and the time.monotonic() of its first eth_blockNumber result."""
    process = services.start_ganache(version, port, log_path)
    started_processes.append(process)
    ready = services.wait_until(
        lambda: services.jsonrpc_ready(port, 0.5) or process.poll() is not None, 120.0, f"ganache {version} on port {port}"
    )
    if process.poll() is not None:
        raise BenchError(f"ganache {version} exited with status {process.returncode} at start: read {log_path}")
    return process, ready


def stop_started_process(process: subprocess.Popen, stop_signal: int, grace: float) -> None:
    services.stop_process(process, stop_signal, grace)
    if process in started_processes:
        started_processes.remove(process)


# --- part 3: proxy overhead against a fixed-response backend -------------------------------


def run_overhead_part(args: argparse.Namespace, daemon: Daemon, work_dir: Path) -> dict[str, Any]:
    endpoint_port = services.free_port()
    deployment = services.write_fixed_backend_deployment(work_dir, endpoint_port)
    print(f"overhead: `osvm up {deployment}` with the endpoint on 127.0.0.1:{endpoint_port}", flush=True)
    daemon.osvm("up", str(deployment), "--timeout", "120")
    instance = daemon.component("fixed")["instances"][0]
    backend_port = instance["ports"]["http"]

    template = (services.HERE / "haproxy.cfg.tmpl").read_text()
    targets: list[tuple[str, int, int | None]] = [
        ("direct", backend_port, None),
        ("osvm_endpoint", endpoint_port, daemon.process.pid),
    ]
    for threads in sorted({1, os.cpu_count() or 1}):
        port = services.free_port()
        config = template.replace("@NBTHREAD@", str(threads)).replace("@LISTEN_PORT@", str(port)).replace("@SERVER_PORT@", str(backend_port))
        process = services.start_haproxy(config, work_dir / f"haproxy-{threads}.cfg", work_dir / f"haproxy-{threads}.log")
        started_processes.append(process)
        targets.append((f"haproxy_{threads}_thread{'s' if threads > 1 else ''}", port, process.pid))
    for name, port, _ in targets:
        services.wait_until(lambda: services.jsonrpc_ready(port, 0.5), 30.0, f"{name} on port {port}")
        # Warm-up, not recorded: connection pools, page cache, CPU frequency.
        services.run_wrk(port, args.connections, 2.0)

    rounds: list[dict[str, Any]] = []
    for round_index in range(1, args.overhead_rounds + 1):
        for name, port, pid in targets:
            cpu_before = process_cpu_seconds(pid) if pid else None
            result = services.run_wrk(port, args.connections, args.overhead_duration, threads=1)
            cpu_after = process_cpu_seconds(pid) if pid else None
            row = {key: value for key, value in result.items() if key != "output"}
            row.update({"round": round_index, "target": name, "port": port})
            if cpu_before is not None and cpu_after is not None and result.get("requests"):
                row["proxy_cpu_seconds"] = round(cpu_after - cpu_before, 3)
                row["proxy_cpu_us_per_request"] = round((cpu_after - cpu_before) / result["requests"] * 1e6, 2)
            rounds.append(row)
            print(f"  round {round_index} {name:18s} {row['requests_per_second']:>10.0f} req/s  p99 {row.get('p99_ms', float('nan')):.2f} ms", flush=True)

    medians = {}
    for name, _, _ in targets:
        rows = [row for row in rounds if row["target"] == name]
        medians[name] = {
            "requests_per_second": statistics.median(row["requests_per_second"] for row in rows),
            "p50_ms": statistics.median(row["p50_ms"] for row in rows),
            "p99_ms": statistics.median(row["p99_ms"] for row in rows),
            "proxy_cpu_us_per_request": (
                statistics.median(row["proxy_cpu_us_per_request"] for row in rows) if "proxy_cpu_us_per_request" in rows[0] else None
            ),
            "errors": sum(sum(row["socket_errors"].values()) + row["non_2xx_3xx"] for row in rows),
        }
    ratios = {}
    for name in medians:
        if name.startswith("haproxy"):
            ratios[f"osvm_over_{name}"] = {
                "throughput": analyze.ratio(medians["osvm_endpoint"]["requests_per_second"], medians[name]["requests_per_second"]),
                "p99": analyze.ratio(medians["osvm_endpoint"]["p99_ms"], medians[name]["p99_ms"]),
            }

    print("  load generator ceiling against the backend directly", flush=True)
    ceiling = {
        mode: services.run_loadgen_for(backend_port, mode, args.connections, args.check_duration, args.timeout, args.failure_pause)
        for mode in args.modes
    }
    wrk_close = services.run_wrk(backend_port, args.connections, args.check_duration, threads=1, close=True)

    for process in list(started_processes):
        stop_started_process(process, signal.SIGTERM, 10.0)
    daemon.osvm("down", timeout=300)
    return {
        "backend": "HAProxy 2.6, one thread, `http-request return` with a fixed JSON-RPC body, run as the osvm component `fixed`",
        "wrk": f"wrk -t1 -c{args.connections} -d{args.overhead_duration:g}s --latency -s bench/hotswap/jsonrpc.lua",
        "targets": {name: port for name, port, _ in targets},
        "rounds": rounds,
        "medians": medians,
        "ratios": ratios,
        "loadgen_ceiling": ceiling,
        "wrk_new_connection_direct": {key: value for key, value in wrk_close.items() if key != "output"},
    }


def process_cpu_seconds(pid: int) -> float | None:
    """Return the user plus system CPU seconds of a process, all its threads included, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in brackets and may contain spaces: utime and stime
    # are fields 14 and 15 of proc(5), so 11 and 12 after the state field.
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- targets, results and summary ----------------------------------------------------------


def evaluate_targets(results: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    runs = results.get("osvm", {}).get("runs", {})
    if runs:
        failed = {mode: run["windows"]["whole_run"]["failed"] for mode, run in runs.items()}
        targets["zero_failed_requests"] = {"failed_by_mode": failed, "met": all(count == 0 for count in failed.values())}
        ratios = {mode: run["p99_during_over_steady"] for mode, run in runs.items()}
        targets["p99_during_swap_at_most_2x_steady"] = {
            "ratio_by_mode": ratios,
            "met": all(value is not None and value <= 2.0 for value in ratios.values()),
        }
        targets["all_swaps_complete"] = {"met": all(run["all_complete"] for run in runs.values())}
    ratios = results.get("overhead", {}).get("ratios", {})
    if ratios:
        targets["endpoint_throughput_at_least_half_of_haproxy"] = {
            name: {"ratio": value["throughput"], "met": value["throughput"] is not None and value["throughput"] >= 0.5}
            for name, value in ratios.items()
        }
    return targets


def write_requests_csv(records: analyze.Records, name: str, origin: float) -> str:
    REQUESTS_DIR.mkdir(parents=True, exist_ok=True)
    path = REQUESTS_DIR / f"{name}.csv.gz"
    records.write_csv(path, origin)
    return str(path.relative_to(services.REPO))


def print_summary(results: dict[str, Any]) -> None:
    print("\n==> hot-swap summary")
    machine = results["machine"]
    print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB, kernel {machine['kernel']}, "
        f"Python {machine['python']}, node {machine['node']}, osvm {machine['osvm_commit']}, {machine['date']}"
    )
    for mode, run in results.get("osvm", {}).get("runs", {}).items():
        print(f"\nosvm blue-green, {mode}, {len(run['swaps'])} swaps:")
        for name, window in run["windows"].items():
            print(
                f"  {name:18s} requests {window['requests']:>8d}  failed {window['failed']:>5d}  "
                f"p50 {window['p50_ms']} ms  p99 {window['p99_ms']} ms  {window['requests_per_second']} req/s"
            )
        for name, window in run["phases"].items():
            print(f"  phase {name:12s} requests {window['requests']:>8d}  failed {window['failed']:>5d}  p50 {window['p50_ms']} ms  p99 {window['p99_ms']} ms")
        print(f"  p99 during swaps / steady: {run['p99_during_over_steady']}  (switch ±{SWITCH_WINDOW:g} s / steady: {run['p99_switch_over_steady']})")
        durations = [swap["command_s"] for swap in run["swaps"]]
        states = sorted({swap["state"] for swap in run["swaps"]})
        print(f"  swap command seconds: min {min(durations):.1f}, median {statistics.median(durations):.1f}, max {max(durations):.1f}; outcomes: {', '.join(states)}")
        check = run["loadgen_check"]
        print(
            f"  check: wrk {check['wrk_requests_per_second']:.0f} req/s, load generator "
            f"{check['loadgen_requests_per_second']:.0f} req/s (ratio {check['loadgen_over_wrk_throughput']})"
        )
    for mode, run in results.get("naive", {}).get("runs", {}).items():
        print(f"\nnaive stop and start, {mode}, {len(run['swaps'])} swaps:")
        for name, window in run["windows"].items():
            print(f"  {name:18s} requests {window['requests']:>8d}  failed {window['failed']:>6d}  p50 {window['p50_ms']} ms  p99 {window['p99_ms']} ms")
        downtime = run["downtime_s"]
        print(f"  downtime per swap: median {downtime['median']} s, min {downtime['min']} s, max {downtime['max']} s")
    overhead = results.get("overhead")
    if overhead:
        print(f"\nproxy overhead ({overhead['wrk']}, median of rounds):")
        for name, median in overhead["medians"].items():
            cpu = f"  proxy CPU {median['proxy_cpu_us_per_request']} us/request" if median["proxy_cpu_us_per_request"] else ""
            print(f"  {name:18s} {median['requests_per_second']:>10.0f} req/s  p50 {median['p50_ms']:.2f} ms  p99 {median['p99_ms']:.2f} ms{cpu}")
        for name, value in overhead["ratios"].items():
            print(f"  {name}: throughput {value['throughput']}, p99 {value['p99']}")
    print("\ntargets:")
    for name, target in results.get("targets", {}).items():
        print(f"  {name}: {json.dumps(target)}")
    print(f"\nresults: {RESULT_PATH.relative_to(services.REPO)}")


# --- setup and cleanup ---------------------------------------------------------------------


def cleanup(daemon: Daemon, state_dir: Path, work_dir: Path, keep: bool) -> dict[str, Any]:
    """Stop what this run started, check that nothing is left, and remove its directories."""
    for process in list(started_processes):
        stop_started_process(process, signal.SIGTERM, 10.0)
    down_error = daemon.stop()

    from osvm.runtimes.process import cgroup_parent_for

    parent = cgroup_parent_for(state_dir)
    parents = [path for path in CGROUP_ROOT.glob(f"*/{parent}") if path.is_dir()]
    parents += [CGROUP_ROOT / parent] if (CGROUP_ROOT / parent).is_dir() else []
    instance_cgroups = [str(child) for path in parents for child in path.iterdir() if child.is_dir()]
    leftovers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(state_dir) in argv or str(work_dir) in argv:
            leftovers.append({"pid": int(entry.name), "cmdline": argv.replace("\0", " ")[:200]})
    for process in leftovers:
        # These processes name this run's directories, so this run started them.
        try:
            os.kill(process["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    removed = []
    if not instance_cgroups:
        # `osvm down --daemon` leaves the empty parent cgroup directories of the state directory.
        for path in parents:
            try:
                path.rmdir()
                removed.append(str(path))
            except OSError as error:
                print(f"cannot remove cgroup directory {path}: {error.strerror}", file=sys.stderr)
    clean = not down_error and not instance_cgroups and not leftovers
    if clean and not keep:
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
    else:
        print(f"kept {state_dir} and {work_dir} for inspection", file=sys.stderr)
    return {
        "clean": clean,
        "down_error": down_error,
        "leftover_instance_cgroups": instance_cgroups,
        "leftover_processes": leftovers,
        "removed_parent_cgroups": removed,
    }


def main() -> int:
    args = parse_args()
    preflight()
    results: dict[str, Any] = {"benchmark": "hotswap", "settings": vars(args), "machine_at_start": services.machine_info()}
    services.WORK_ROOT.mkdir(mode=0o755, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="hotswap-", dir=services.WORK_ROOT))
    work_dir.chmod(0o755)
    # A short path, because the control socket path must fit in sun_path (108 bytes).
    state_dir = Path(tempfile.mkdtemp(prefix="oh-", dir="/tmp"))
    daemon = Daemon(state_dir, work_dir / "daemon.log")
    print(f"state directory {state_dir}, work directory {work_dir}", flush=True)
    failure = None
    try:
        daemon.start()
        if "osvm" in args.parts:
            results["osvm"] = run_osvm_part(args, daemon, work_dir)
        if "naive" in args.parts:
            results["naive"] = run_naive_part(args, work_dir)
        if "overhead" in args.parts:
            results["overhead"] = run_overhead_part(args, daemon, work_dir)
    except Exception as error:  # noqa: BLE001 - any failure still cleans up and writes what was measured.
        failure = f"{type(error).__name__}: {error}"
        traceback.print_exc()
        print(f"hot-swap benchmark failed: {failure}", file=sys.stderr)
    finally:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        if daemon.log_path.exists():
            shutil.copy(daemon.log_path, RESULTS_DIR / "hotswap-daemon.log")
        results["cleanup"] = cleanup(daemon, state_dir, work_dir, args.keep or failure is not None)

    results["failure"] = failure
    results["machine"] = services.machine_info()
    results["targets"] = evaluate_targets(results)
    RESULT_PATH.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)
    if not results["cleanup"]["clean"]:
        print(f"cleanup was not clean: {json.dumps(results['cleanup'])}", file=sys.stderr)
    return 1 if failure or not results["cleanup"]["clean"] else 0


if __name__ == "__main__":
    sys.exit(main())
