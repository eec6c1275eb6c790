"""Security end to end: instance certificates, mutual TLS at endpoints, policy and the namespace firewall.

Each test runs a real daemon as root on its own state directory under /tmp, with isolated instances
that run as user osvm. Clients in the test use the instances' own certificate files, or
certificates that the test signs itself, and check both the outcome of the connection and the
reason that the daemon records in its event log. The fixture's teardown fails a test that leaves a
process, network namespace, veth interface or host nftables table of its daemon behind.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from osvm.runtimes.netns import HOST_IFNAME_PREFIX, NETNS_PREFIX, InstanceNetwork, NetworkError, short_id
from osvm.runtimes.process import cgroup_parent_for
from osvm.security.ca import INTERMEDIATE_CERT_FILE, INTERMEDIATES_DIR, ROOT_CERT_FILE, ROOT_KEY_FILE, CertificateAuthority

ROOT = Path(__file__).resolve().parent.parent
OSVM = [str(ROOT / ".venv" / "bin" / "osvm")] if (ROOT / ".venv" / "bin" / "osvm").exists() else [sys.executable, "-m", "osvm"]
BACKEND = Path(__file__).resolve().parent / "security_backend.py"
# Components run as the unprivileged user osvm, which cannot read a Python inside the virtualenv.
GUEST_PYTHON = "/usr/bin/python3"
# Not under /tmp: instances get a private /tmp and could not see the backend script there.
WORK_ROOT = Path("/var/lib/osvm-tests")

# Generous deadlines: they bound a hung test and are never asserted as performance limits.
DAEMON_START_TIMEOUT = 30.0
WAIT_TIMEOUT = 90.0
CLI_TIMEOUT = 180.0
# How long teardown waits for the processes and networks of the state directory to go away.
LEFTOVER_TIMEOUT = 20.0

TRUST_DOMAIN = "osvm.local"
POLICY_DENIALS_METRIC = "osvm_policy_denials_total"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="security tests need root for isolated instances and namespaces"),
    pytest.mark.skipif(not Path(GUEST_PYTHON).exists(), reason=f"{GUEST_PYTHON} is missing"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ip", "nft", "nsenter", "bwrap", "curl", "openssl")),
        reason="security tests need ip, nft, nsenter, bwrap, curl and openssl on PATH",
    ),
]

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = WAIT_TIMEOUT, interval: float = 0.2) -> T:
    """Call `check` until it returns a true value, and return that value.

    Raises AssertionError naming `what` and the last value when `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_subnet_pool() -> str:
    """Return a /24 of 10.213.64.0/18 that no host address or route overlaps.

    Each test daemon gets a pool of its own, so that its namespaces stay clear of any other osvm
    daemon on the host, which uses 10.213.0.0/16 by default.
    """
    used: list[ipaddress.IPv4Network] = []
    for command in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        for match in re.finditer(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", output):
            try:
                used.append(ipaddress.IPv4Network(match.group(1), strict=False))
            except ValueError:
                continue
    first = os.getpid() % 64
    for offset in range(64):
        candidate = ipaddress.IPv4Network(f"10.213.{64 + (first + offset) % 64}.0/24")
        if not any(candidate.overlaps(network) for network in used if network.prefixlen > 0):
            return str(candidate)
    raise RuntimeError("no free /24 left in 10.213.64.0/18 for a test daemon's subnet pool")


# --- host facts ------------------------------------------------------------------------------


def netns_names() -> set[str]:
    output = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    # Lines look like "osvm-x" or "osvm-x (id: 0)".
    return {line.split()[0] for line in output.splitlines() if line.strip()}


def link_names() -> set[str]:
    output = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    # Lines look like "7: ov-0123456789@if6: <BROADCAST,...> ...".
    return {line.split(":")[1].strip().split("@")[0] for line in output.splitlines() if line.strip()}


def host_nft_tables() -> list[str]:
    output = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in output.splitlines() if line.strip()]


@dataclass(frozen=True)
class HostProcess:
    pid: int
    cmdline: str
    cgroup: str


def host_processes() -> list[HostProcess]:
    """Return every live (not zombie) process on the host except this one."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat_text = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cgroup = Path(f"/proc/{entry}/cgroup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state = stat_text[stat_text.rindex(")") + 2:].split()[0]
        if state not in ("Z", "X"):
            found.append(HostProcess(int(entry), cmdline, cgroup))
    return found


def http_get(url: str) -> tuple[int, bytes]:
    """Send GET straight to url, never through a proxy from the environment, and return the status and body."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=20) as response:
        return response.status, response.read()


def process_environment(pid: int) -> dict[str, str]:
    data = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = [item.split(b"=", 1) for item in data.split(b"\0") if b"=" in item]
    return {key.decode(): value.decode(errors="replace") for key, value in pairs}


# --- the daemon ------------------------------------------------------------------------------


@dataclass
class Daemon:
    """One daemon on a private state directory, driven through the `osvm` command line."""

    state_dir: Path
    work_dir: Path
    subnet_pool: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the daemon and wait until it responds on its socket."""
        assert self.process is None or self.process.poll() is not None, "the daemon is already running"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *OSVM, "--state-dir", str(self.state_dir),
                    "daemon", "--log-level", "debug", "--subnet-pool", self.subnet_pool,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        process = self.process

        def responds() -> bool:
            assert process.poll() is None, f"the daemon exited with status {process.returncode}:\n{self.log_tail()}"
            return self.osvm("status", check=False, timeout=10).returncode == 0

        wait_for(responds, f"the daemon to respond on {self.state_dir / 'osvm.sock'}", DAEMON_START_TIMEOUT)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, signum: signal.Signals) -> None:
        """Send signum to the daemon, as a crash or an init system would, and wait until it exits."""
        assert self.process is not None and self.process.poll() is None, "the daemon is not running"
        os.kill(self.process.pid, signum)
        self.process.wait(timeout=60)

    def log_tail(self, lines: int = 200) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no daemon output)"
        return "\n".join(text.splitlines()[-lines:])

    def osvm(self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run `osvm --state-dir DIR ARGS...`. With `check`, a non-zero exit status fails the test."""
        command = [*OSVM, "--state-dir", str(self.state_dir), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"osvm {' '.join(args)} exited with status {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def osvm_json(self, *args: str) -> Any:
        return json.loads(self.osvm(*args, "--json").stdout)

    def up(self, path: Path) -> None:
        self.osvm("up", str(path), "--timeout", str(int(WAIT_TIMEOUT)))

    def status(self) -> dict[str, Any]:
        return self.osvm_json("status")

    def instance(self, name: str) -> dict[str, Any]:
        """Return the one instance of a component, failing when there is not exactly one."""
        for component in self.status()["components"]:
            if component["name"] == name:
                instances = component["instances"]
                assert len(instances) == 1, f"expected one instance of {name}, found {len(instances)}: {instances}"
                return instances[0]
        raise AssertionError(f"component {name!r} not in `osvm status`")

    def wait_healthy(self, name: str) -> dict[str, Any]:
        """Wait until a component runs one healthy instance, and return that instance."""

        def healthy() -> dict[str, Any] | None:
            for component in self.status()["components"]:
                instances = component["instances"]
                if component["name"] == name and component["status"] == "running" and len(instances) == 1:
                    return instances[0] if instances[0]["health"] in ("healthy", "none") else None
            return None

        return wait_for(healthy, f"component {name} to run healthy")

    def events(self) -> list[dict[str, Any]]:
        """Return past events, oldest first, from `osvm events --json`."""
        output = self.osvm("events", "--json", "--limit", "100000").stdout
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    def metrics(self) -> str:
        return subprocess.run(
            ["curl", "--silent", "--show-error", "--fail", "--unix-socket", str(self.state_dir / "osvm.sock"), "http://x/metrics"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout

    def tls_dir(self, instance_id: str) -> Path:
        return self.state_dir / "data" / instance_id / "tls"

    def ca_dir(self) -> Path:
        return self.state_dir / "ca"

    def instance_credentials(self, name: str) -> Credentials:
        """Return the certificate files of a component's running instance, which root can read."""
        directory = self.tls_dir(self.instance(name)["id"])
        return Credentials(directory / "cert.pem", directory / "key.pem")

    def stored_instance_ids(self) -> list[str]:
        """Return the ids of every instance in state.db, read from the file directly."""
        database = self.state_dir / "state.db"
        if not database.exists():
            return []
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            return [row[0] for row in connection.execute("SELECT id FROM instances")]
        finally:
            connection.close()

    def processes(self, instance_ids: list[str]) -> list[HostProcess]:
        """Return live host processes of this state directory, leaving out the daemon itself.

        A process belongs to it when its command line names the state directory, the work directory
        or an instance id, or when it is in a cgroup under the daemon's cgroup parent.
        """
        daemon_pid = self.process.pid if self.running() and self.process is not None else None
        marks = [str(self.state_dir), str(self.work_dir), *instance_ids]
        cgroup_mark = f"/{cgroup_parent_for(self.state_dir)}/"
        return [
            process
            for process in host_processes()
            if process.pid != daemon_pid and (cgroup_mark in process.cgroup or any(mark in process.cmdline for mark in marks))
        ]

    def leftover_networks(self, instance_ids: list[str]) -> list[str]:
        """Return the network namespaces and host veth interfaces of these instances that still exist."""
        namespaces = netns_names()
        links = link_names()
        left = [f"network namespace {NETNS_PREFIX}{instance}" for instance in instance_ids if NETNS_PREFIX + instance in namespaces]
        left += [
            f"veth interface {HOST_IFNAME_PREFIX}{short_id(instance)} of {instance}"
            for instance in instance_ids
            if HOST_IFNAME_PREFIX + short_id(instance) in links
        ]
        return left


@pytest.fixture
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    # A short path, because the daemon's socket path must fit in 108 bytes.
    state_dir = Path(tempfile.mkdtemp(prefix="osvm-sec-", dir="/tmp"))
    WORK_ROOT.mkdir(mode=0o755, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="security-", dir=WORK_ROOT))
    os.chmod(work_dir, 0o755)
    shutil.copy(BACKEND, work_dir / "backend.py")
    os.chmod(work_dir / "backend.py", 0o644)
    handle = Daemon(state_dir, work_dir, free_subnet_pool(), Path(f"{state_dir}.log"))
    try:
        handle.start()
        yield handle
    finally:
        problems = tear_down(handle)
        report = getattr(request.node, "report_call", None)
        if problems or (report is not None and report.failed):
            print(f"--- daemon output ({handle.log_path}) ---")
            print(handle.log_tail())
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
        handle.log_path.unlink(missing_ok=True)
        if problems:
            pytest.fail("teardown found leftovers of the test's daemon:\n" + "\n".join(problems), pytrace=False)


def tear_down(daemon: Daemon) -> list[str]:
    """Stop the daemon and its instances, then return what is left of them after removing it."""
    problems: list[str] = []
    if not daemon.running() and daemon.stored_instance_ids():
        # A test that killed the daemon leaves instances that only a daemon can stop.
        try:
            daemon.start()
        except AssertionError as error:
            problems.append(f"cannot restart the daemon for teardown: {error}")
    if daemon.running():
        result = daemon.osvm("down", "--daemon", check=False)
        if result.returncode != 0:
            problems.append(f"`osvm down --daemon` exited with status {result.returncode}: {result.stderr.strip()}")
        assert daemon.process is not None
        try:
            daemon.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            problems.append(f"the daemon (pid {daemon.process.pid}) was still running 30 s after `osvm down --daemon`")
            daemon.process.kill()
            daemon.process.wait(timeout=30)

    instance_ids = daemon.stored_instance_ids()

    def nothing_left() -> bool:
        return not daemon.processes(instance_ids) and not daemon.leftover_networks(instance_ids)

    try:
        wait_for(nothing_left, "the processes and networks of the state directory to go away", LEFTOVER_TIMEOUT)
    except AssertionError:
        pass
    problems += [f"process left: pid {process.pid}: {process.cmdline[:200]}" for process in daemon.processes(instance_ids)]
    problems += [f"{item} left" for item in daemon.leftover_networks(instance_ids)]
    # The firewall tables belong in the instances' namespaces, never in the host's ruleset.
    problems += [f"host nftables table left: {table}" for table in host_nft_tables() if table == "table inet osvm"]

    for process in daemon.processes(instance_ids):
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for instance in instance_ids:
        try:
            InstanceNetwork(instance, None).remove()
        except NetworkError as error:
            print(f"cannot remove the leftover network of {instance}: {error}")
    return problems


# --- deployment files ------------------------------------------------------------------------


def http_probe(interval: str = "0.5s") -> str:
    return f"""type = "http"
port = "http"
path = "/health"
interval = "{interval}"
startup_interval = "0.2s"
"""


def write_deployment(daemon: Daemon, text: str) -> Path:
    path = daemon.work_dir / "deploy.toml"
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


def sleeper(name: str, network: str = "host") -> str:
    return f"""
[components.{name}]
command = ["sleep", "infinity"]
stop_grace_period = "1s"
network = {{ mode = "{network}" }}
"""


def mutual_tls_deployment(daemon: Daemon, endpoint_port: int, network: str = "host", listen_host: str = "127.0.0.1") -> Path:
    """Write a deployment: rpc behind an endpoint with tls = "mutual", which policy lets indexer reach and not rogue."""
    text = f"""
name = "security"

[components.rpc]
command = ["{GUEST_PYTHON}", "{daemon.work_dir}/backend.py"]
ports = {{ http = 0 }}
stop_grace_period = "1s"
network = {{ mode = "{network}" }}

[components.rpc.endpoint]
listen = "{listen_host}:{endpoint_port}"
mode = "http"
tls = "mutual"

[[components.rpc.probes]]
{http_probe()}
{sleeper("indexer", network)}
{sleeper("rogue", network)}

[[policy.allow]]
from = "indexer"
to = "rpc"
ports = ["http"]
"""
    return write_deployment(daemon, text)


# --- TLS clients and certificates ------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A client certificate chain (leaf first) and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Attempt:
    """One HTTPS request through an endpoint: the client's local port, and the status or the error."""

    local_port: int
    status: int | None
    body: bytes
    error: str


def client_context(ca_file: Path, credentials: Credentials | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_file))
    if credentials is not None:
        context.load_cert_chain(str(credentials.cert), str(credentials.key))
    return context


def https_get(port: int, ca_file: Path, credentials: Credentials | None, server_hostname: str = "rpc", path: str = "/health") -> Attempt:
    """Send GET over TLS to 127.0.0.1:port and return what happened, without raising on a rejection.

    With TLS 1.3 the client finishes its handshake before the server checks the client
    certificate, so a rejection shows up as an error or an empty response when reading.
    """
    context = client_context(ca_file, credentials)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        local_port = raw.getsockname()[1]
        try:
            with context.wrap_socket(raw, server_hostname=server_hostname) as connection:
                request = f"GET {path} HTTP/1.1\r\nHost: {server_hostname}\r\nConnection: close\r\n\r\n"
                connection.sendall(request.encode())
                response = b""
                while chunk := connection.recv(65536):
                    response += chunk
        except (ssl.SSLError, OSError) as error:
            return Attempt(local_port, None, b"", f"{type(error).__name__}: {error}")
    if not response:
        return Attempt(local_port, None, b"", "the server closed the connection without a response")
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return Attempt(local_port, status, body, "")


def peer_certificate_serial(port: int, ca_file: Path, server_hostname: str) -> str:
    """Connect over TLS to 127.0.0.1:port and return the serial of the server's certificate, in lowercase hex."""
    context = client_context(ca_file, None)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as connection:
            der = connection.getpeercert(binary_form=True)
    assert der is not None, f"the server on port {port} presented no certificate"
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def certificate_serial(path: Path) -> str:
    """Return the serial of the first certificate in a PEM file, in lowercase hex as `osvm ca list` prints it."""
    return format(x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number, "x")


def wait_refused_event(daemon: Daemon, attempt: Attempt) -> str:
    """Wait for the endpoint.refused event of one connection, found by its client port, and return its reason."""
    marker = f"refused 127.0.0.1:{attempt.local_port}: "

    def reason() -> str | None:
        for event in daemon.events():
            if event["kind"] == "endpoint.refused" and marker in event["reason"]:
                return event["reason"].split(marker, 1)[1]
        return None

    return wait_for(reason, f"an endpoint.refused event for client port {attempt.local_port}")


def policy_denials(daemon: Daemon) -> float:
    """Return the sum of all samples of the policy denial counter on the daemon's /metrics."""
    total = 0.0
    for line in daemon.metrics().splitlines():
        if line.startswith(POLICY_DENIALS_METRIC + "{") or line.startswith(POLICY_DENIALS_METRIC + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def load_intermediate(daemon: Daemon) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the CA's current intermediate certificate and its key from the state directory."""
    certificate = x509.load_pem_x509_certificate((daemon.ca_dir() / INTERMEDIATE_CERT_FILE).read_bytes())
    key_path = daemon.ca_dir() / INTERMEDIATES_DIR / f"{format(certificate.serial_number, 'x')}-key.pem"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey), f"expected an ECDSA intermediate key in {key_path}"
    return certificate, key


def sign_leaf(
    directory: Path,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    uris: list[str],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> Credentials:
    """Sign a client leaf with the given URI SANs and validity, and write it with the issuer as its chain."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uris]
    names.append(x509.DNSName("indexer"))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "indexer")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    credentials = Credentials(directory / "cert.pem", directory / "key.pem")
    chain = certificate.public_bytes(serialization.Encoding.PEM) + issuer.public_bytes(serialization.Encoding.PEM)
    credentials.cert.write_bytes(chain)
    credentials.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return credentials


def spiffe_id(component: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/component/{component}"


def start_mutual_tls(daemon: Daemon) -> int:
    """Apply the mutual TLS deployment on the host network and return the endpoint's port."""
    port = free_port()
    daemon.up(mutual_tls_deployment(daemon, port))
    daemon.wait_healthy("rpc")
    return port


def assert_rejected(daemon: Daemon, port: int, credentials: Credentials | None, expected_reason: str) -> str:
    """Send a request that the endpoint must reject, then check the reason in the event log and the metric."""
    before = policy_denials(daemon)
    attempt = https_get(port, daemon.ca_dir() / ROOT_CERT_FILE, credentials)

    assert attempt.status is None, f"the endpoint answered HTTP {attempt.status}: {attempt.body[:200]!r}"
    reason = wait_refused_event(daemon, attempt)
    assert expected_reason in reason, reason
    wait_for(lambda: policy_denials(daemon) > before, f"{POLICY_DENIALS_METRIC} to grow above {before:g}")
    return reason


# --- mutual TLS at an endpoint ---------------------------------------------------------------


def test_endpoint_accepts_allowed_client(daemon: Daemon) -> None:
    port = start_mutual_tls(daemon)
    indexer = daemon.instance("indexer")
    tls_dir = daemon.tls_dir(indexer["id"])

    attempt = https_get(port, tls_dir / "ca.pem", Credentials(tls_dir / "cert.pem", tls_dir / "key.pem"))

    assert attempt.error == ""
    assert attempt.status == 200
    assert attempt.body == b"ok"
    leaf = x509.load_pem_x509_certificates((tls_dir / "cert.pem").read_bytes())[0]
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == [spiffe_id("indexer")]
    rejections = [event for event in daemon.events() if event["kind"] == "endpoint.refused"]
    assert rejections == []


def test_endpoint_rejects_missing_certificate(daemon: Daemon) -> None:
    port = start_mutual_tls(daemon)

    reason = assert_rejected(daemon, port, None, "no client certificate")

    assert reason == "no client certificate"


def test_endpoint_rejects_expired_certificate(daemon: Daemon, tmp_path: Path) -> None:
    port = start_mutual_tls(daemon)
    issuer, issuer_key = load_intermediate(daemon)
    now = dt.datetime.now(dt.timezone.utc)
    expired = sign_leaf(
        tmp_path / "expired", issuer, issuer_key, [spiffe_id("indexer")], now - dt.timedelta(days=2), now - dt.timedelta(days=1)
    )

    assert_rejected(daemon, port, expired, "expired")


def test_endpoint_rejects_other_ca(daemon: Daemon, tmp_path: Path) -> None:
    port = start_mutual_tls(daemon)
    with CertificateAuthority.init(tmp_path / "other-ca", TRUST_DOMAIN) as other:
        issued = other.issue("indexer", ["indexer"], 3600.0, "other-instance")
    foreign = Credentials(tmp_path / "foreign-cert.pem", tmp_path / "foreign-key.pem")
    foreign.cert.write_bytes(issued.chain_pem)
    foreign.key.write_bytes(issued.key_pem)

    assert_rejected(daemon, port, foreign, "not issued by this CA")


def test_endpoint_rejects_revoked_certificate(daemon: Daemon) -> None:
    port = start_mutual_tls(daemon)
    credentials = daemon.instance_credentials("indexer")
    root = daemon.ca_dir() / ROOT_CERT_FILE
    assert https_get(port, root, credentials).status == 200
    serial = certificate_serial(credentials.cert)

    daemon.osvm("ca", "revoke", serial, "--reason", "keyCompromise")

    reason = assert_rejected(daemon, port, credentials, "revoked")
    assert "keyCompromise" in reason
    record = daemon.osvm_json("ca", "show", serial)
    assert record["revoked_at"] is not None
    crl = x509.load_pem_x509_crl((daemon.ca_dir() / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None


def test_endpoint_rejects_two_uri_sans(daemon: Daemon, tmp_path: Path) -> None:
    port = start_mutual_tls(daemon)
    issuer, issuer_key = load_intermediate(daemon)
    now = dt.datetime.now(dt.timezone.utc)
    two_identities = sign_leaf(
        tmp_path / "two-uris",
        issuer,
        issuer_key,
        [spiffe_id("indexer"), spiffe_id("rogue")],
        now - dt.timedelta(minutes=1),
        now + dt.timedelta(hours=1),
    )

    reason = assert_rejected(daemon, port, two_identities, "2 URI SANs")

    assert "exactly one" in reason


def test_endpoint_rejects_denied_identity(daemon: Daemon) -> None:
    port = start_mutual_tls(daemon)

    reason = assert_rejected(daemon, port, daemon.instance_credentials("rogue"), "policy denies")

    assert spiffe_id("rogue") in reason
    assert "default deny" in reason
    metrics = daemon.metrics()
    assert re.search(rf'^{POLICY_DENIALS_METRIC}\{{[^}}]*source="rogue"[^}}]*\}} [1-9]', metrics, re.MULTILINE), metrics


# --- kernel enforcement in network namespaces ------------------------------------------------

# Opens one TCP connection with a 2 s timeout and prints the outcome. It exits with status 1 when the connection fails.
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
except OSError as error:
    print(f"failed: {type(error).__name__}: {error}")
    sys.exit(1)
print("connected")
"""


# Sends GET /health over mutual TLS with the given certificate files and prints the status line.
MUTUAL_TLS_GET = """
import socket, ssl, sys
host, port, cert, key, ca = sys.argv[1:6]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.load_verify_locations(cafile=ca)
context.load_cert_chain(cert, key)
with socket.create_connection((host, int(port)), timeout=20) as raw:
    with context.wrap_socket(raw, server_hostname="rpc") as connection:
        connection.sendall(b"GET /health HTTP/1.1\\r\\nHost: rpc\\r\\nConnection: close\\r\\n\\r\\n")
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
print(response.split(b"\\r\\n", 1)[0].decode())
"""


def run_in_namespace(instance_id: str, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a Python program as root in an instance's network namespace, with the host's files and processes."""
    return subprocess.run(
        ["ip", "netns", "exec", NETNS_PREFIX + instance_id, GUEST_PYTHON, "-c", source, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def connect_from_namespace(instance_id: str, host: str, port: int) -> subprocess.CompletedProcess[str]:
    """Open a TCP connection from inside an instance's network namespace."""
    return run_in_namespace(instance_id, CONNECT, host, str(port))


def egress_drops(instance_id: str) -> int:
    """Return the packets counted by "drop the rest", the last rule of the output chain in an instance's namespace."""
    output = subprocess.run(
        ["ip", "netns", "exec", NETNS_PREFIX + instance_id, "nft", "-j", "list", "chain", "inet", "osvm", "output"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rules = [item["rule"] for item in json.loads(output)["nftables"] if "rule" in item]
    last = rules[-1]
    assert any("drop" in expression for expression in last["expr"]), f"the output chain does not end in a drop: {last}"
    return sum(expression["counter"]["packets"] for expression in last["expr"] if "counter" in expression)


def test_namespace_firewall_enforces_policy(daemon: Daemon) -> None:
    endpoint_port = free_port()
    daemon.up(mutual_tls_deployment(daemon, endpoint_port, network="namespace", listen_host="0.0.0.0"))
    rpc = daemon.wait_healthy("rpc")
    rogue = daemon.wait_healthy("rogue")
    indexer = daemon.wait_healthy("indexer")
    rpc_port = rpc["ports"]["http"]
    rogue_gateway = process_environment(rogue["pid"])["OSVM_GATEWAY"]
    indexer_gateway = process_environment(indexer["pid"])["OSVM_GATEWAY"]

    assert rpc["netns"] == NETNS_PREFIX + rpc["id"]
    assert ipaddress.ip_address(rogue_gateway) + 1 == ipaddress.ip_address(rogue["address"])

    # The host may not forward between veths at all, so only the drop counter in rogue's
    # namespace shows that rogue's own egress rules stopped the connection.
    drops_before = egress_drops(rogue["id"])
    direct = connect_from_namespace(rogue["id"], rpc["address"], rpc_port)
    assert direct.returncode == 1, direct.stdout + direct.stderr
    assert "failed" in direct.stdout
    assert egress_drops(rogue["id"]) > drops_before
    with socket.create_connection((rpc["address"], rpc_port), timeout=10):
        pass
    status, _ = http_get(f"http://{rpc['address']}:{rpc_port}/health")
    assert status == 200

    drops_before = egress_drops(rogue["id"])
    rogue_to_endpoint = connect_from_namespace(rogue["id"], rogue_gateway, endpoint_port)
    assert rogue_to_endpoint.returncode == 1, rogue_to_endpoint.stdout + rogue_to_endpoint.stderr
    assert "failed" in rogue_to_endpoint.stdout
    assert egress_drops(rogue["id"]) > drops_before

    indexer_to_endpoint = connect_from_namespace(indexer["id"], indexer_gateway, endpoint_port)
    assert indexer_to_endpoint.returncode == 0, indexer_to_endpoint.stdout + indexer_to_endpoint.stderr
    assert indexer_to_endpoint.stdout.strip() == "connected"
    tls_dir = daemon.tls_dir(indexer["id"])
    files = [str(tls_dir / name) for name in ("cert.pem", "key.pem", "ca.pem")]
    indexer_request = run_in_namespace(indexer["id"], MUTUAL_TLS_GET, indexer_gateway, str(endpoint_port), *files)
    assert indexer_request.returncode == 0, indexer_request.stdout + indexer_request.stderr
    assert indexer_request.stdout.strip() == "HTTP/1.1 200 OK"

    rogue_check = daemon.osvm("policy", "check", "rogue", "rpc", "http", check=False)
    assert rogue_check.returncode == 1, rogue_check.stdout + rogue_check.stderr
    assert rogue_check.stdout.startswith("DENY")
    assert "default deny" in rogue_check.stdout
    indexer_check = daemon.osvm("policy", "check", "indexer", "rpc", "http", check=False)
    assert indexer_check.returncode == 0, indexer_check.stdout + indexer_check.stderr
    assert indexer_check.stdout.startswith("ALLOW")
    assert 'allow[0] from "indexer" to "rpc" ports ["http"]' in indexer_check.stdout


# --- renewal, restart and an offline root ----------------------------------------------------


def test_renewal_reloads_serving_instance(daemon: Daemon) -> None:
    text = f"""
name = "renewal"

[components.tlsapp]
command = ["{GUEST_PYTHON}", "{daemon.work_dir}/backend.py"]
ports = {{ http = 0 }}
env = {{ SERVE_TLS = "1" }}
stop_grace_period = "1s"

[components.tlsapp.tls]
lifetime = "5m"
reload_signal = "SIGHUP"

[[components.tlsapp.probes]]
type = "tcp"
port = "http"
interval = "0.5s"
startup_interval = "0.2s"
"""
    daemon.up(write_deployment(daemon, text))
    instance = daemon.wait_healthy("tlsapp")
    tls_dir = daemon.tls_dir(instance["id"])
    port = instance["ports"]["http"]
    first_serial = certificate_serial(tls_dir / "cert.pem")
    assert peer_certificate_serial(port, tls_dir / "ca.pem", "tlsapp") == first_serial

    daemon.osvm("ca", "renew", "tlsapp")

    def renewal_event() -> dict[str, Any] | None:
        for event in daemon.events():
            if event["kind"] == "certificate.renewed" and event["instance"] == instance["id"]:
                return event
        return None

    event = wait_for(renewal_event, "a certificate.renewed event of the tlsapp instance")
    assert "sent SIGHUP" in event["reason"]
    second_serial = certificate_serial(tls_dir / "cert.pem")
    assert second_serial != first_serial
    assert second_serial in event["reason"]
    assert daemon.instance("tlsapp")["pid"] == instance["pid"]
    wait_for(
        lambda: peer_certificate_serial(port, tls_dir / "ca.pem", "tlsapp") == second_serial,
        f"the instance to serve certificate {second_serial}",
    )
    body = json.loads(https_get(port, tls_dir / "ca.pem", None, server_hostname="tlsapp", path="/").body)
    assert body["serial"] == second_serial


def test_daemon_restart_keeps_ca(daemon: Daemon) -> None:
    port = start_mutual_tls(daemon)
    root_before = (daemon.ca_dir() / ROOT_CERT_FILE).read_bytes()
    listed_before = daemon.osvm_json("ca", "list")
    credentials = daemon.instance_credentials("indexer")
    assert https_get(port, daemon.ca_dir() / ROOT_CERT_FILE, credentials).status == 200

    daemon.kill(signal.SIGKILL)
    daemon.start()
    daemon.wait_healthy("rpc")

    listed_after = daemon.osvm_json("ca", "list")
    assert listed_after["trust_domain"] == listed_before["trust_domain"] == TRUST_DOMAIN
    assert listed_after["key_type"] == listed_before["key_type"]
    before = {item["serial"]: item for item in listed_before["certificates"]}
    after = {item["serial"]: item for item in listed_after["certificates"]}
    assert {serial: after.get(serial) for serial in before} == before
    # The endpoint issues itself a fresh certificate when it starts, so that is the only new one.
    assert {after[serial]["instance"] for serial in after.keys() - before.keys()} <= {"endpoint:rpc"}
    assert (daemon.ca_dir() / ROOT_CERT_FILE).read_bytes() == root_before

    def answered() -> Attempt | None:
        attempt = https_get(port, daemon.ca_dir() / ROOT_CERT_FILE, credentials)
        return attempt if attempt.status == 200 else None

    attempt = wait_for(answered, "HTTP 200 over mutual TLS through the endpoint after the restart")
    assert attempt.body == b"ok"


def test_offline_root_key(daemon: Daemon, tmp_path: Path) -> None:
    root_out = tmp_path / "offline-root"
    root_out.mkdir(mode=0o700)

    daemon.osvm("ca", "init", "--trust-domain", "example.org", "--root-out", str(root_out))

    assert [path.name for path in root_out.iterdir()] == [ROOT_KEY_FILE]
    root_key = root_out / ROOT_KEY_FILE
    assert stat.S_IMODE(root_key.stat().st_mode) == 0o600
    assert not (daemon.ca_dir() / ROOT_KEY_FILE).exists()
    key_text = root_key.read_bytes()
    key_body = b"".join(line for line in key_text.splitlines() if not line.startswith(b"-----"))
    for path in daemon.state_dir.rglob("*"):
        if path.is_file():
            assert key_body[:64] not in path.read_bytes().replace(b"\n", b""), f"the root key is also in {path}"
    root = x509.load_pem_x509_certificate((daemon.ca_dir() / ROOT_CERT_FILE).read_bytes())
    key = serialization.load_pem_private_key(key_text, password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == root.public_key().public_bytes(*spki)
    listed = daemon.osvm_json("ca", "list")
    assert listed["trust_domain"] == "example.org"
    assert listed["root_key_online"] is False

    daemon.up(write_deployment(daemon, 'name = "offline-root"\n' + sleeper("indexer")))
    leaf = x509.load_pem_x509_certificates(daemon.instance_credentials("indexer").cert.read_bytes())[0]
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == [spiffe_id("indexer", "example.org")]

    intermediate_before = (daemon.ca_dir() / INTERMEDIATE_CERT_FILE).read_bytes()
    without_key = daemon.osvm("ca", "rotate", check=False)
    assert without_key.returncode != 0
    assert "root key" in without_key.stderr
    assert "--root-key" in without_key.stderr
    assert (daemon.ca_dir() / INTERMEDIATE_CERT_FILE).read_bytes() == intermediate_before

    rotated = daemon.osvm_json("ca", "rotate", "--root-key", str(root_key))
    intermediate = x509.load_pem_x509_certificate((daemon.ca_dir() / INTERMEDIATE_CERT_FILE).read_bytes())
    assert format(intermediate.serial_number, "x") == rotated["intermediate"]
    assert (daemon.ca_dir() / INTERMEDIATE_CERT_FILE).read_bytes() != intermediate_before
    intermediate.verify_directly_issued_by(root)
