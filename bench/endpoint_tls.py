"""Connections per second through an osvm endpoint, plain and with mTLS, side by side.

Each client connection sends one HTTP request and closes, so the figure is dominated by connection
set-up: the TCP accept, and for mTLS the handshake, the certificate check against the CA index and
the policy decision. The backend is a small asyncio HTTP server in a second process. Rounds
alternate plain and mTLS so machine noise spreads over both.

    .venv/bin/python bench/endpoint_tls.py [--seconds 5] [--clients 16] [--rounds 3]

Writes bench/results/endpoint_tls.json.
"""

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from osvm.config.models import Endpoint as EndpointSpec
from osvm.config.models import Policy, PolicyRule
from osvm.endpoints import Backend, Endpoint
from osvm.endpoints.tls import EndpointTls
from osvm.security.ca import CertificateAuthority, PeerRejected
from osvm.security.policy import PolicyEngine

RESULTS = Path(__file__).resolve().parent / "results" / "endpoint_tls.json"

BACKEND_SOURCE = """
import asyncio, sys
RESPONSE = b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: 36\\r\\n\\r\\n" + b'{"jsonrpc":"2.0","id":1,"result":1}\\n'
class Server(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        if b"\\r\\n\\r\\n" in data:
            self.transport.write(RESPONSE)
async def main():
    server = await asyncio.get_running_loop().create_server(Server, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""

REQUEST = b"POST / HTTP/1.1\r\nHost: rpc\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mutual_tls(ca: CertificateAuthority, directory: Path) -> EndpointTls:
    """Build the endpoint's TLS the way the daemon does: CA chain, identity check, then policy."""
    server = ca.issue("rpc", ["rpc", "localhost"], 86400, "endpoint:rpc")
    (directory / "server.pem").write_bytes(server.chain_pem)
    (directory / "server-key.pem").write_bytes(server.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(directory / "server.pem"), str(directory / "server-key.pem"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca.trust_bundle().decode())
    policy = PolicyEngine(Policy(allow=[PolicyRule(source="indexer", to="rpc", ports=["rpc"])]))

    def authorize(certificate: bytes | None, peer: str) -> str | None:
        try:
            identity = ca.verify_peer(certificate)
        except PeerRejected as error:
            return error.reason
        decision = policy.decide(identity.component, "rpc", "rpc")
        return None if decision.allowed else decision.rule

    return EndpointTls(context, authorize, None)


def client_context(ca: CertificateAuthority, directory: Path) -> ssl.SSLContext:
    client = ca.issue("indexer", ["indexer"], 86400, "bench-client")
    (directory / "client.pem").write_bytes(client.chain_pem)
    (directory / "client-key.pem").write_bytes(client.key_pem)
    context = ssl.create_default_context(cadata=ca.trust_bundle().decode())
    context.load_cert_chain(str(directory / "client.pem"), str(directory / "client-key.pem"))
    return context


def run_clients(port: int, context: ssl.SSLContext | None, clients: int, seconds: float) -> dict[str, float]:
    """Run client processes that open a connection per request; return connections/s and latency."""
    script = f"""
import socket, ssl, sys, time, json
port, seconds = {port}, {seconds}
context = None
if {context is not None!r}:
    context = ssl.create_default_context(cafile=sys.argv[1])
    context.load_cert_chain(sys.argv[2], sys.argv[3])
latencies, failures = [], 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    start = time.monotonic()
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        connection = context.wrap_socket(raw, server_hostname="rpc") if context else raw
        connection.sendall({REQUEST!r})
        data = b""
        while b"result" not in data:
            chunk = connection.recv(4096)
            if not chunk:
                break
            data += chunk
        connection.close()
        if b"200 OK" in data:
            latencies.append(time.monotonic() - start)
        else:
            failures += 1
    except OSError:
        failures += 1
print(json.dumps({{"latencies": latencies, "failures": failures}}))
"""
    arguments = []
    if context is not None:
        arguments = [str(BENCH_DIR / "ca.pem"), str(BENCH_DIR / "client.pem"), str(BENCH_DIR / "client-key.pem")]
    processes = [
        subprocess.Popen([sys.executable, "-c", script, *arguments], stdout=subprocess.PIPE)
        for _ in range(clients)
    ]
    latencies: list[float] = []
    failures = 0
    for process in processes:
        output, _ = process.communicate(timeout=seconds + 60)
        result = json.loads(output)
        latencies += result["latencies"]
        failures += result["failures"]
    latencies.sort()
    return {
        "connections_per_second": len(latencies) / seconds,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else 0.0,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0.0,
        "failed": failures,
    }


BENCH_DIR = Path(tempfile.mkdtemp(prefix="osvm-bench-tls-"))


async def measure(arguments: argparse.Namespace) -> dict[str, object]:
    ca = CertificateAuthority.init(BENCH_DIR / "ca")
    (BENCH_DIR / "ca.pem").write_bytes(ca.trust_bundle())
    client_context(ca, BENCH_DIR)
    backend_port = free_port()
    backend = subprocess.Popen([sys.executable, "-c", BACKEND_SOURCE, str(backend_port)])
    await asyncio.sleep(0.5)

    endpoints = {}
    for name, tls in (("plain", None), ("mtls", mutual_tls(ca, BENCH_DIR))):
        spec = EndpointSpec(listen=f"127.0.0.1:{free_port()}", mode="http", tls="mutual" if tls else "none")
        endpoint = Endpoint("rpc", spec, tls=tls)
        await endpoint.start()
        endpoint.set_backends([Backend("rpc-1", "127.0.0.1", backend_port)])
        endpoints[name] = endpoint

    rounds: dict[str, list[dict[str, float]]] = {"plain": [], "mtls": []}
    try:
        for _ in range(arguments.rounds):
            for name, endpoint in endpoints.items():
                port = int(endpoint.listen_address.rsplit(":", 1)[1])
                context = None if name == "plain" else ssl.create_default_context()
                result = await asyncio.to_thread(run_clients, port, context, arguments.clients, arguments.seconds)
                rounds[name].append(result)
                print(f"{name:5}  {result['connections_per_second']:9.1f} conn/s  p50 {result['p50_ms']:.2f} ms  "
                      f"p99 {result['p99_ms']:.2f} ms  failed {result['failed']}", flush=True)
    finally:
        for endpoint in endpoints.values():
            await endpoint.stop()
        backend.terminate()
        backend.wait()
        ca.close()

    summary = {}
    for name, results in rounds.items():
        summary[name] = {
            "connections_per_second_median": statistics.median(r["connections_per_second"] for r in results),
            "p99_ms_median": statistics.median(r["p99_ms"] for r in results),
            "failed": sum(r["failed"] for r in results),
        }
    summary["mtls_over_plain"] = summary["mtls"]["connections_per_second_median"] / summary["plain"]["connections_per_second_median"]
    return {"rounds": rounds, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per round and mode (default 5)")
    parser.add_argument("--clients", type=int, default=16, help="client processes, each a closed loop (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each plain then mTLS (default 3)")
    arguments = parser.parse_args()
    try:
        results = asyncio.run(measure(arguments))
    finally:
        shutil.rmtree(BENCH_DIR, ignore_errors=True)
    summary = results["summary"]
    print()
    print(f"plain: {summary['plain']['connections_per_second_median']:.1f} conn/s, p99 {summary['plain']['p99_ms_median']:.2f} ms")
    print(f"mTLS:  {summary['mtls']['connections_per_second_median']:.1f} conn/s, p99 {summary['mtls']['p99_ms_median']:.2f} ms")
    print(f"mTLS / plain: {summary['mtls_over_plain']:.3f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "endpoint_tls",
        "command": "python bench/endpoint_tls.py " + " ".join(sys.argv[1:]),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "openssl": ssl.OPENSSL_VERSION},
        "settings": vars(arguments),
        **results,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
