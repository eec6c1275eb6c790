"""Measure how many leaf certificates the internal CA issues per second, for each key type.

Each issue() generates a key, signs the leaf and commits a row to the SQLite index with
synchronous=FULL, so the rate depends on the disk under the CA directory as much as on the CPU.
The "sign only" column repeats the key generation and signing without the index, to show that
split. Results go to stdout as a table and to bench/results/ca_issue.json.

    .venv/bin/python bench/ca_issue.py [--count 500] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cryptography
from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend

from osvm.security import certs
from osvm.security.ca import CertificateAuthority
from osvm.security.identity import SpiffeId

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "ca_issue.json"
KEY_TYPES = ("ecdsa-p256", "ed25519")
WARMUP = 10


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def filesystem_of(path: Path) -> str:
    """Return the type of the filesystem that contains path, from /proc/mounts, or "unknown"."""
    best_mount, best_type = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best_type
    resolved = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point, fs_type = fields[1], fields[2]
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best_mount):
            best_mount, best_type = mount_point, fs_type
    return best_type


def machine_facts(directory: Path) -> dict[str, object]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_total_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "openssl": openssl_backend.openssl_version_text(),
        "ca_directory_filesystem": filesystem_of(directory),
    }


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def measure_issue(authority: CertificateAuthority, count: int) -> dict[str, float]:
    """Time count calls of issue() and return the rate and latency figures."""
    for _ in range(WARMUP):
        authority.issue("bench", ["bench.osvm.test"])
    latencies = []
    started = time.perf_counter()
    for number in range(count):
        call_started = time.perf_counter()
        authority.issue("bench", ["bench.osvm.test"], instance_id=f"bench-{number}")
        latencies.append(time.perf_counter() - call_started)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "seconds": elapsed,
        "per_second": count / elapsed,
        "mean_ms": statistics.fmean(latencies) * 1000,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


def measure_sign_only(authority: CertificateAuthority, key_type: str, count: int) -> float:
    """Return leaves per second for key generation and signing alone, without the index."""
    issuer = authority.intermediate_certificate
    serial = certs.serial_hex(issuer.serial_number)
    issuer_key = certs.key_from_pem(
        (authority.directory / "intermediates" / f"{serial}-key.pem").read_bytes()
    )
    identity = SpiffeId(authority.trust_domain, "bench").uri
    now = dt.datetime.now(dt.timezone.utc)
    started = time.perf_counter()
    for _ in range(count):
        key = certs.generate_key(key_type)
        certs.build_leaf(
            key.public_key(),
            "bench",
            identity,
            ["bench.osvm.test"],
            now - certs.CLOCK_SKEW,
            now + dt.timedelta(days=1),
            issuer,
            issuer_key,
        )
        certs.key_to_pem(key)
    return count / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="certificates to issue per key type (default 500)")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory in which to create the temporary CAs; its disk sets the index commit cost "
        "(default: the system temporary directory)",
    )
    arguments = parser.parse_args()
    if arguments.count < 1:
        parser.error("--count must be at least 1")

    rows = []
    with tempfile.TemporaryDirectory(prefix="osvm-ca-bench-", dir=arguments.dir) as scratch:
        scratch_path = Path(scratch)
        facts = machine_facts(scratch_path)
        for key_type in KEY_TYPES:
            with CertificateAuthority.init(scratch_path / key_type, key_type=key_type) as authority:
                issue = measure_issue(authority, arguments.count)
                sign_only = measure_sign_only(authority, key_type, arguments.count)
            rows.append({"key_type": key_type, "count": arguments.count, **issue, "sign_only_per_second": sign_only})

    print("Machine: " + ", ".join(f"{name}={value}" for name, value in facts.items()))
    print()
    header = f"{'key type':<11} {'N':>5} {'issued/s':>9} {'mean ms':>8} {'p50 ms':>7} {'p99 ms':>7} {'sign only/s':>12}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['key_type']:<11} {row['count']:>5} {row['per_second']:>9.0f} {row['mean_ms']:>8.2f} "
            f"{row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} {row['sign_only_per_second']:>12.0f}"
        )

    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "ca_issue",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "measured_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": facts,
        "results": rows,
    }
    RESULTS_PATH.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWrote {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
