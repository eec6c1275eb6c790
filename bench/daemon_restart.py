"""Requests through an endpoint while the daemon restarts: in place against stop and start.

One daemon serves a small JSON-RPC backend behind an HTTP endpoint. Two closed-loop load
generators (bench/hotswap/loadgen.py) run through the endpoint: one with keep-alive connections
and one with a new connection per request. The run first restarts the daemon in place with
`osvm daemon-restart` --restarts times, then stops it with SIGTERM and starts `osvm daemon` again
as many times, with --gap seconds of load between restarts. Each part reports its failed
requests, the slowest request, and p50/p99 latency of the requests started within a restart
against those started between restarts.

Run as root: .venv/bin/python bench/daemon_restart.py [--restarts 10] [--gap 3] [--keep-alive 16] [--fresh 4]
"""

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness

sys.path.insert(0, str(Path(__file__).resolve().parent / "hotswap"))
import loadgen  # noqa: E402 - the load generator lives beside the hot-swap benchmark.

LOADGEN = Path(__file__).resolve().parent / "hotswap" / "loadgen.py"

# A JSON-RPC backend with HTTP/1.1 keep-alive, on the system Python that the osvm user can read.
BACKEND_CODE = (
    "import os\n"
    "from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer\n"
    "BODY = b'{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":\"0x1\"}'\n"
    "class Handler(BaseHTTPRequestHandler):\n"
    "    protocol_version = 'HTTP/1.1'\n"
    # The handler writes the head and the body separately, so with Nagle's algorithm the body
    # waits for the client's delayed ACK.
    "    disable_nagle_algorithm = True\n"
    "    def do_POST(self):\n"
    "        self.rfile.read(int(self.headers.get('Content-Length', 0)))\n"
    "        self.send_response(200)\n"
    "        self.send_header('Content-Type', 'application/json')\n"
    "        self.send_header('Content-Length', str(len(BODY)))\n"
    "        self.end_headers()\n"
    "        self.wfile.write(BODY)\n"
    "    do_GET = do_POST\n"
    "    def log_message(self, *args):\n"
    "        pass\n"
    "ThreadingHTTPServer((os.environ['OSVM_ADDRESS'], int(os.environ['OSVM_PORT_HTTP'])), Handler).serve_forever()\n"
)


def write_deployment(directory: Path, port: int) -> Path:
    command = json.dumps([harness.PROGRAM, "-c", BACKEND_CODE])
    text = f"""name = "restart-bench"

[components.rpc]
command = {command}
ports = {{ http = 0 }}

[components.rpc.endpoint]
listen = "127.0.0.1:{port}"
queue_timeout = "30s"

[[components.rpc.probes]]
type = "http"
port = "http"
path = "/"
interval = "1s"
startup_interval = "0.1s"
"""
    path = directory / "deployment.toml"
    path.write_text(text)
    path.chmod(0o644)
    return path


def start_loadgen(port: int, mode: str, connections: int, output: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, str(LOADGEN), "--target", f"127.0.0.1:{port}", "--mode", mode,
         "--connections", str(connections), "--timeout", "10", "--until-eof", "--output", str(output)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    ready = json.loads(process.stdout.readline())
    if not ready.get("ready"):
        raise harness.BenchError(f"the load generator did not start: {ready}")
    return process


def status_or_none(daemon: harness.BenchDaemon) -> dict[str, Any] | None:
    result = daemon.osvm("status", "--json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def restart_in_place(daemon: harness.BenchDaemon) -> None:
    daemon.osvm("daemon-restart", "--timeout", "120")


def restart_stop_start(daemon: harness.BenchDaemon) -> None:
    """Stop the daemon with SIGTERM, as `systemctl restart` does, and start `osvm daemon` again."""
    daemon.process.send_signal(signal.SIGTERM)
    daemon.process.wait(harness.DAEMON_EXIT_TIMEOUT)
    daemon.start()
    # The endpoint listens once the first reconcile pass has run.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = status_or_none(daemon)
        endpoint = status["components"][0]["endpoint"] if status else None
        if endpoint and endpoint["backends"]:
            return
        time.sleep(0.05)
    raise harness.BenchError(f"the endpoint did not serve within 60 s after the restart: read {daemon.log_path}")


def run_part(daemon: harness.BenchDaemon, port: int, restart, restarts: int, gap: float, clients: dict[str, int]) -> dict[str, Any]:
    outputs = {mode: daemon.work_dir / f"{restart.__name__}-{mode}.bin" for mode in clients}
    generators = {mode: start_loadgen(port, mode, count, outputs[mode]) for mode, count in clients.items()}
    windows = []
    try:
        time.sleep(gap)
        for _ in range(restarts):
            started = time.monotonic()
            restart(daemon)
            windows.append((started, time.monotonic()))
            time.sleep(gap)
    finally:
        for process in generators.values():
            process.stdin.close()
            process.wait(60)
    return {mode: analyze(outputs[mode], windows) for mode in clients} | {
        "restart_seconds": harness.summarize([end - start for start, end in windows]),
    }


def analyze(path: Path, windows: list[tuple[float, float]]) -> dict[str, Any]:
    """Split the requests into those started within a restart window and the others."""
    header, starts, latencies, outcomes = loadgen.read_records(str(path))
    during, between = [], []
    for start, latency in zip(starts, latencies):
        within = any(begin <= start <= end for begin, end in windows)
        (during if within else between).append(latency * 1000)
    failures: dict[str, int] = {}
    for outcome in outcomes:
        if outcome != loadgen.OK:
            name = loadgen.OUTCOMES[outcome]
            failures[name] = failures.get(name, 0) + 1
    return {
        "requests": len(outcomes),
        "failed": sum(failures.values()),
        "failures": failures,
        "max_latency_ms": round(max(latencies) * 1000, 3),
        "during_restarts": percentiles(during),
        "between_restarts": percentiles(between),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"count": len(values)}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"count": len(values), "p50_ms": round(cuts[49], 3), "p99_ms": round(cuts[98], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=10, help="restarts in each part (default 10)")
    parser.add_argument("--gap", type=float, default=3.0, help="seconds of load before and after each restart (default 3)")
    parser.add_argument("--keep-alive", type=int, default=16, help="keep-alive clients (default 16)")
    parser.add_argument("--fresh", type=int, default=4, help="clients with a new connection per request (default 4)")
    parser.add_argument("--keep", action="store_true", help="keep the state and work directories")
    args = parser.parse_args()
    harness.require_root()

    clients = {"keep-alive": args.keep_alive, "new-connection": args.fresh}
    results: dict[str, Any] = {"arguments": vars(args)}
    with harness.BenchDaemon(keep=args.keep) as daemon:
        port = free_port()
        daemon.osvm("up", str(write_deployment(daemon.work_dir, port)), "--timeout", "120")
        for restart in (restart_in_place, restart_stop_start):
            results[restart.__name__] = run_part(daemon, port, restart, args.restarts, args.gap, clients)

    path = harness.write_results("daemon_restart", results)
    rows = []
    for part in ("restart_in_place", "restart_stop_start"):
        for mode in clients:
            entry = results[part][mode]
            rows.append([
                part, mode, str(entry["requests"]), str(entry["failed"]), str(entry["max_latency_ms"]),
                str(entry["during_restarts"].get("p50_ms")), str(entry["during_restarts"].get("p99_ms")),
                str(entry["between_restarts"].get("p50_ms")), str(entry["between_restarts"].get("p99_ms")),
            ])  # fmt: skip
    harness.print_table(
        ["part", "mode", "requests", "failed", "max ms", "restart p50", "restart p99", "between p50", "between p99"], rows
    )
    for part in ("restart_in_place", "restart_stop_start"):
        print(f"{part}: restart command seconds {results[part]['restart_seconds']}")
    print(f"results: {path}")
    return 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
