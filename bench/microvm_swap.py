"""Blue-green swap time between two revisions of a microVM component, through the daemon.

One VM component (the static C JSON-RPC server of the daemon tests, in an initramfs image) runs
behind an HTTP endpoint. The script deploys a new revision several times in a row, each changing
the VERSION the server reports, while a closed-loop client sends requests through the endpoint.
It reports each swap's wall time and phase durations, and the failed requests.

    .venv/bin/python bench/microvm_swap.py [--swaps 5]

Writes bench/results/microvm_swap.json. Needs root, QEMU and gcc.
"""

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import BenchDaemon, load_average, machine_info, require_root, summarize, write_results  # noqa: E402
from test_microvm_daemon import EXEC_PROBE, HTTP_PROBE, SERVER_SOURCE  # noqa: E402

from osvm.runtimes.microvm import detect_accelerator  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Load:
    """Two closed-loop clients sending JSON-RPC requests through the endpoint."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/"
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "version", "params": []}).encode()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while not self._stop.is_set():
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with opener.open(request, timeout=30) as response:
                    ok = response.status == 200
            except OSError:
                ok = False
            self.sent += 1
            if not ok:
                self.failed += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=5, help="swaps in a row (default 5)")
    arguments = parser.parse_args()
    require_root()
    accelerator, reason = detect_accelerator("auto")

    swaps = []
    with BenchDaemon() as daemon:
        source = daemon.work_dir / "vm-server.c"
        source.write_text(SERVER_SOURCE)
        binary = daemon.work_dir / "vm-server"
        subprocess.run(["gcc", "-static", "-O2", "-s", "-o", str(binary), str(source)], check=True)
        port = free_port()
        component = f"""
name = "vm-swap"

[components.web]
runtime = "microvm"
command = ["{binary}"]
ports = {{ http = 0 }}
env = {{ VERSION = "1" }}
stop_grace_period = "3s"
vm = {{ vcpus = 1, memory = "256MiB", accel = "auto" }}
image = {{ kind = "binary", path = "{binary}", format = "initramfs" }}
endpoint = {{ listen = "127.0.0.1:{port}", mode = "http", drain_timeout = "5s", queue_timeout = "30s" }}
update = {{ min_healthy_time = "1s", healthy_deadline = "180s", post_promotion_window = "2s" }}

[[components.web.probes]]
{_inline(HTTP_PROBE)}

[[components.web.probes]]
{_inline(EXEC_PROBE)}
"""
        path = daemon.work_dir / "deploy.toml"
        path.write_text(component)
        path.chmod(0o644)
        daemon.osvm("up", str(path), "--timeout", "600")

        with Load(port) as load:
            for number in range(arguments.swaps):
                started = time.monotonic()
                result = daemon.osvm("deploy", "web", "--set", f"env.VERSION={number + 2}", "--json", check=False)
                elapsed = time.monotonic() - started
                rollout = json.loads(result.stdout)["rollout"]
                phases = {
                    phase["phase"]: round(phase["finished_at"] - phase["started_at"], 3) for phase in rollout["phases"]
                }
                swaps.append({"seconds": round(elapsed, 3), "state": rollout["state"], "phases": phases})
                print(f"swap {number + 1}: {rollout['state']} in {elapsed:.2f} s  {phases}", flush=True)
        failed, sent = load.failed, load.sent

    durations = [swap["seconds"] for swap in swaps]
    verifying = [swap["phases"].get("verifying", 0.0) for swap in swaps]
    print()
    print(f"accelerator: {accelerator} ({reason})")
    print(f"swap wall time: {summarize(durations)}")
    print(f"verifying phase (new VM boot to healthy + min_healthy_time): {summarize(verifying)}")
    print(f"requests through the endpoint: {sent} sent, {failed} failed")
    write_results(
        "microvm_swap",
        {
            "benchmark": "microvm_swap",
            "command": "python bench/microvm_swap.py " + " ".join(sys.argv[1:]),
            "accelerator": accelerator,
            "accelerator_reason": reason,
            "machine": machine_info(),
            "load_average_at_end": load_average(),
            "swaps": swaps,
            "swap_seconds": summarize(durations),
            "verifying_seconds": summarize(verifying),
            "requests": {"sent": sent, "failed": failed},
        },
    )
    return 0


def _inline(table: dict[str, object]) -> str:
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in table.items())


if __name__ == "__main__":
    raise SystemExit(main())
