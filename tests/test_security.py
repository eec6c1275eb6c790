"""Security end to end: instance certificates, mutual TLS at endpoints, policy and the namespace firewall.

Each test runs a real daemon as root through the `osvm` fixture of conftest.py, with isolated
instances that run as user osvm. Clients in the test use the instances' own certificate files, or
certificates that the test signs itself, and check both the outcome of the connection and the
reason that the daemon records in its event log. The fixture's teardown fails a test that leaves a
process, cgroup, network namespace or veth interface of its daemon behind, or a table inet osvm in
the host's nftables ruleset.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import shutil
import socket
import ssl
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from e2e import COMPONENT_PYTHON, Osvm, free_port, http_request, wait_for
from osvm.runtimes.netns import NETNS_PREFIX
from osvm.security.ca import INTERMEDIATE_CERT_FILE, INTERMEDIATES_DIR, ROOT_CERT_FILE, ROOT_KEY_FILE, CertificateAuthority

BACKEND = Path(__file__).resolve().parent / "security_backend.py"

TRUST_DOMAIN = "osvm.local"
POLICY_DENIALS_METRIC = "osvm_policy_denials_total"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("nft", "openssl")),
        reason="security tests need nft for the namespace firewall and openssl for their backend, on PATH",
    ),
]


@pytest.fixture
def osvm(osvm: Osvm) -> Osvm:
    """The `osvm` fixture of conftest.py, with security_backend.py in the work directory as backend.py."""
    osvm.copy_to_work_dir(BACKEND, "backend.py")
    return osvm


# --- host facts ------------------------------------------------------------------------------


def process_environment(pid: int) -> dict[str, str]:
    data = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = [item.split(b"=", 1) for item in data.split(b"\0") if b"=" in item]
    return {key.decode(): value.decode(errors="replace") for key, value in pairs}


# --- deployment files ------------------------------------------------------------------------


def http_probe(interval: str = "0.5s") -> str:
    return f"""type = "http"
port = "http"
path = "/health"
interval = "{interval}"
startup_interval = "0.2s"
"""


def sleeper(name: str, network: str = "host") -> str:
    return f"""
[components.{name}]
command = ["sleep", "infinity"]
stop_grace_period = "1s"
network = {{ mode = "{network}" }}
"""


def mutual_tls_deployment(osvm: Osvm, endpoint_port: int, network: str = "host", listen_host: str = "127.0.0.1") -> Path:
    """Write a deployment: rpc behind an endpoint with tls = "mutual", which policy lets indexer reach and not rogue."""
    text = f"""
name = "security"

[components.rpc]
command = ["{COMPONENT_PYTHON}", "{osvm.work_dir}/backend.py"]
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
    return osvm.write_deployment_text(text)


# --- TLS clients and certificates ------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A client certificate chain (leaf first) and its private key, as PEM files."""

    cert: Path
    key: Path


def instance_credentials(osvm: Osvm, name: str) -> Credentials:
    """Return the certificate files of a component's running instance, which root can read."""
    directory = osvm.tls_dir(osvm.instance(name)["id"])
    return Credentials(directory / "cert.pem", directory / "key.pem")


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


def wait_rejection_event(osvm: Osvm, attempt: Attempt) -> str:
    """Wait for the endpoint.refused event of one connection, found by its client port, and return its reason."""
    marker = f"refused 127.0.0.1:{attempt.local_port}: "

    def reason() -> str | None:
        for event in osvm.events():
            if event["kind"] == "endpoint.refused" and marker in event["reason"]:
                return event["reason"].split(marker, 1)[1]
        return None

    return wait_for(reason, f"an endpoint.refused event for client port {attempt.local_port}")


def policy_denials(osvm: Osvm) -> float:
    """Return the sum of all samples of the policy denial counter on the daemon's /metrics."""
    total = 0.0
    for line in osvm.metrics().splitlines():
        if line.startswith(POLICY_DENIALS_METRIC + "{") or line.startswith(POLICY_DENIALS_METRIC + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def load_intermediate(osvm: Osvm) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the CA's current intermediate certificate and its key from the state directory."""
    certificate = x509.load_pem_x509_certificate((osvm.ca_dir / INTERMEDIATE_CERT_FILE).read_bytes())
    key_path = osvm.ca_dir / INTERMEDIATES_DIR / f"{format(certificate.serial_number, 'x')}-key.pem"
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


def start_mutual_tls(osvm: Osvm) -> int:
    """Apply the mutual TLS deployment on the host network and return the endpoint's port."""
    port = free_port()
    osvm.up(mutual_tls_deployment(osvm, port))
    osvm.wait_healthy("rpc")
    return port


def assert_rejected(osvm: Osvm, port: int, credentials: Credentials | None, expected_reason: str) -> str:
    """Send a request that the endpoint must reject, then check the reason in the event log and the metric."""
    before = policy_denials(osvm)
    attempt = https_get(port, osvm.ca_dir / ROOT_CERT_FILE, credentials)

    assert attempt.status is None, f"the endpoint answered HTTP {attempt.status}: {attempt.body[:200]!r}"
    reason = wait_rejection_event(osvm, attempt)
    assert expected_reason in reason, reason
    wait_for(lambda: policy_denials(osvm) > before, f"{POLICY_DENIALS_METRIC} to grow above {before:g}")
    return reason


# --- mutual TLS at an endpoint ---------------------------------------------------------------


def test_endpoint_accepts_allowed_client(osvm: Osvm) -> None:
    port = start_mutual_tls(osvm)
    indexer = osvm.instance("indexer")
    tls_dir = osvm.tls_dir(indexer["id"])

    attempt = https_get(port, tls_dir / "ca.pem", Credentials(tls_dir / "cert.pem", tls_dir / "key.pem"))

    assert attempt.error == ""
    assert attempt.status == 200
    assert attempt.body == b"ok"
    leaf = x509.load_pem_x509_certificates((tls_dir / "cert.pem").read_bytes())[0]
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == [spiffe_id("indexer")]
    rejections = [event for event in osvm.events() if event["kind"] == "endpoint.refused"]
    assert rejections == []


def test_endpoint_rejects_missing_certificate(osvm: Osvm) -> None:
    port = start_mutual_tls(osvm)

    reason = assert_rejected(osvm, port, None, "no client certificate")

    assert reason == "no client certificate"


def test_endpoint_rejects_expired_certificate(osvm: Osvm, tmp_path: Path) -> None:
    port = start_mutual_tls(osvm)
    issuer, issuer_key = load_intermediate(osvm)
    now = dt.datetime.now(dt.timezone.utc)
    expired = sign_leaf(
        tmp_path / "expired", issuer, issuer_key, [spiffe_id("indexer")], now - dt.timedelta(days=2), now - dt.timedelta(days=1)
    )

    assert_rejected(osvm, port, expired, "expired")


def test_endpoint_rejects_other_ca(osvm: Osvm, tmp_path: Path) -> None:
    port = start_mutual_tls(osvm)
    with CertificateAuthority.init(tmp_path / "other-ca", TRUST_DOMAIN) as other:
        issued = other.issue("indexer", ["indexer"], 3600.0, "other-instance")
    foreign = Credentials(tmp_path / "foreign-cert.pem", tmp_path / "foreign-key.pem")
    foreign.cert.write_bytes(issued.chain_pem)
    foreign.key.write_bytes(issued.key_pem)

    assert_rejected(osvm, port, foreign, "not issued by this CA")


def test_endpoint_rejects_revoked_certificate(osvm: Osvm) -> None:
    port = start_mutual_tls(osvm)
    credentials = instance_credentials(osvm, "indexer")
    root = osvm.ca_dir / ROOT_CERT_FILE
    assert https_get(port, root, credentials).status == 200
    serial = certificate_serial(credentials.cert)

    osvm.cli("ca", "revoke", serial, "--reason", "keyCompromise")

    reason = assert_rejected(osvm, port, credentials, "revoked")
    assert "keyCompromise" in reason
    record = osvm.cli_json("ca", "show", serial)
    assert record["revoked_at"] is not None
    crl = x509.load_pem_x509_crl((osvm.ca_dir / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None


def test_endpoint_rejects_two_uri_sans(osvm: Osvm, tmp_path: Path) -> None:
    port = start_mutual_tls(osvm)
    issuer, issuer_key = load_intermediate(osvm)
    now = dt.datetime.now(dt.timezone.utc)
    two_identities = sign_leaf(
        tmp_path / "two-uris",
        issuer,
        issuer_key,
        [spiffe_id("indexer"), spiffe_id("rogue")],
        now - dt.timedelta(minutes=1),
        now + dt.timedelta(hours=1),
    )

    reason = assert_rejected(osvm, port, two_identities, "2 URI SANs")

    assert "exactly one" in reason


def test_endpoint_rejects_denied_identity(osvm: Osvm) -> None:
    port = start_mutual_tls(osvm)

    reason = assert_rejected(osvm, port, instance_credentials(osvm, "rogue"), "policy denies")

    assert spiffe_id("rogue") in reason
    assert "default deny" in reason
    metrics = osvm.metrics()
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
        ["ip", "netns", "exec", NETNS_PREFIX + instance_id, COMPONENT_PYTHON, "-c", source, *args],
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


def test_namespace_firewall_enforces_policy(osvm: Osvm) -> None:
    endpoint_port = free_port()
    osvm.up(mutual_tls_deployment(osvm, endpoint_port, network="namespace", listen_host="0.0.0.0"))
    rpc = osvm.wait_healthy("rpc")
    rogue = osvm.wait_healthy("rogue")
    indexer = osvm.wait_healthy("indexer")
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
    status, _ = http_request(f"http://{rpc['address']}:{rpc_port}/health", timeout=20)
    assert status == 200

    drops_before = egress_drops(rogue["id"])
    rogue_to_endpoint = connect_from_namespace(rogue["id"], rogue_gateway, endpoint_port)
    assert rogue_to_endpoint.returncode == 1, rogue_to_endpoint.stdout + rogue_to_endpoint.stderr
    assert "failed" in rogue_to_endpoint.stdout
    assert egress_drops(rogue["id"]) > drops_before

    indexer_to_endpoint = connect_from_namespace(indexer["id"], indexer_gateway, endpoint_port)
    assert indexer_to_endpoint.returncode == 0, indexer_to_endpoint.stdout + indexer_to_endpoint.stderr
    assert indexer_to_endpoint.stdout.strip() == "connected"
    tls_dir = osvm.tls_dir(indexer["id"])
    files = [str(tls_dir / name) for name in ("cert.pem", "key.pem", "ca.pem")]
    indexer_request = run_in_namespace(indexer["id"], MUTUAL_TLS_GET, indexer_gateway, str(endpoint_port), *files)
    assert indexer_request.returncode == 0, indexer_request.stdout + indexer_request.stderr
    assert indexer_request.stdout.strip() == "HTTP/1.1 200 OK"

    rogue_check = osvm.cli("policy", "check", "rogue", "rpc", "http", check=False)
    assert rogue_check.returncode == 1, rogue_check.stdout + rogue_check.stderr
    assert rogue_check.stdout.startswith("DENY")
    assert "default deny" in rogue_check.stdout
    indexer_check = osvm.cli("policy", "check", "indexer", "rpc", "http", check=False)
    assert indexer_check.returncode == 0, indexer_check.stdout + indexer_check.stderr
    assert indexer_check.stdout.startswith("ALLOW")
    assert 'allow[0] from "indexer" to "rpc" ports ["http"]' in indexer_check.stdout


# --- renewal, restart and an offline root ----------------------------------------------------


def test_renewal_reloads_serving_instance(osvm: Osvm) -> None:
    text = f"""
name = "renewal"

[components.tlsapp]
command = ["{COMPONENT_PYTHON}", "{osvm.work_dir}/backend.py"]
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
    osvm.up(osvm.write_deployment_text(text))
    instance = osvm.wait_healthy("tlsapp")
    tls_dir = osvm.tls_dir(instance["id"])
    port = instance["ports"]["http"]
    first_serial = certificate_serial(tls_dir / "cert.pem")
    assert peer_certificate_serial(port, tls_dir / "ca.pem", "tlsapp") == first_serial

    osvm.cli("ca", "renew", "tlsapp")

    def renewal_event() -> dict[str, Any] | None:
        for event in osvm.events():
            if event["kind"] == "certificate.renewed" and event["instance"] == instance["id"]:
                return event
        return None

    event = wait_for(renewal_event, "a certificate.renewed event of the tlsapp instance")
    assert "sent SIGHUP" in event["reason"]
    second_serial = certificate_serial(tls_dir / "cert.pem")
    assert second_serial != first_serial
    assert second_serial in event["reason"]
    assert osvm.instance("tlsapp")["pid"] == instance["pid"]
    wait_for(
        lambda: peer_certificate_serial(port, tls_dir / "ca.pem", "tlsapp") == second_serial,
        f"the instance to serve certificate {second_serial}",
    )
    body = json.loads(https_get(port, tls_dir / "ca.pem", None, server_hostname="tlsapp", path="/").body)
    assert body["serial"] == second_serial


def test_daemon_restart_keeps_ca(osvm: Osvm) -> None:
    port = start_mutual_tls(osvm)
    root_before = (osvm.ca_dir / ROOT_CERT_FILE).read_bytes()
    listed_before = osvm.cli_json("ca", "list")
    credentials = instance_credentials(osvm, "indexer")
    assert https_get(port, osvm.ca_dir / ROOT_CERT_FILE, credentials).status == 200

    osvm.kill_daemon()
    osvm.start_daemon()
    osvm.wait_healthy("rpc")

    listed_after = osvm.cli_json("ca", "list")
    assert listed_after["trust_domain"] == listed_before["trust_domain"] == TRUST_DOMAIN
    assert listed_after["key_type"] == listed_before["key_type"]
    before = {item["serial"]: item for item in listed_before["certificates"]}
    after = {item["serial"]: item for item in listed_after["certificates"]}
    assert {serial: after.get(serial) for serial in before} == before
    # The endpoint issues itself a fresh certificate when it starts, so that is the only new one.
    assert {after[serial]["instance"] for serial in after.keys() - before.keys()} <= {"endpoint:rpc"}
    assert (osvm.ca_dir / ROOT_CERT_FILE).read_bytes() == root_before

    def answered() -> Attempt | None:
        attempt = https_get(port, osvm.ca_dir / ROOT_CERT_FILE, credentials)
        return attempt if attempt.status == 200 else None

    attempt = wait_for(answered, "HTTP 200 over mutual TLS through the endpoint after the restart")
    assert attempt.body == b"ok"


def test_daemon_restart_command_keeps_tls_listener(osvm: Osvm) -> None:
    port = start_mutual_tls(osvm)
    credentials = instance_credentials(osvm, "indexer")
    assert https_get(port, osvm.ca_dir / ROOT_CERT_FILE, credentials).status == 200

    osvm.cli("daemon-restart")

    # Right away: the connection waits in the accept queue if the endpoint has not started yet.
    attempt = https_get(port, osvm.ca_dir / ROOT_CERT_FILE, credentials)
    assert attempt.error == ""
    assert attempt.status == 200
    assert attempt.body == b"ok"
    started = [event for event in osvm.cli_events() if event["kind"] == "daemon.started"]
    assert "1 endpoint listening socket kept" in started[-1]["reason"]


def test_offline_root_key(osvm: Osvm, tmp_path: Path) -> None:
    root_out = tmp_path / "offline-root"
    root_out.mkdir(mode=0o700)

    osvm.cli("ca", "init", "--trust-domain", "example.org", "--root-out", str(root_out))

    assert [path.name for path in root_out.iterdir()] == [ROOT_KEY_FILE]
    root_key = root_out / ROOT_KEY_FILE
    assert stat.S_IMODE(root_key.stat().st_mode) == 0o600
    assert not (osvm.ca_dir / ROOT_KEY_FILE).exists()
    key_text = root_key.read_bytes()
    key_body = b"".join(line for line in key_text.splitlines() if not line.startswith(b"-----"))
    for path in osvm.state_dir.rglob("*"):
        if path.is_file():
            assert key_body[:64] not in path.read_bytes().replace(b"\n", b""), f"the root key is also in {path}"
    root = x509.load_pem_x509_certificate((osvm.ca_dir / ROOT_CERT_FILE).read_bytes())
    key = serialization.load_pem_private_key(key_text, password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == root.public_key().public_bytes(*spki)
    listed = osvm.cli_json("ca", "list")
    assert listed["trust_domain"] == "example.org"
    assert listed["root_key_online"] is False

    osvm.up(osvm.write_deployment_text('name = "offline-root"\n' + sleeper("indexer")))
    leaf = x509.load_pem_x509_certificates(instance_credentials(osvm, "indexer").cert.read_bytes())[0]
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == [spiffe_id("indexer", "example.org")]

    intermediate_before = (osvm.ca_dir / INTERMEDIATE_CERT_FILE).read_bytes()
    without_key = osvm.cli("ca", "rotate", check=False)
    assert without_key.returncode != 0
    assert "root key" in without_key.stderr
    assert "--root-key" in without_key.stderr
    assert (osvm.ca_dir / INTERMEDIATE_CERT_FILE).read_bytes() == intermediate_before

    rotated = osvm.cli_json("ca", "rotate", "--root-key", str(root_key))
    intermediate = x509.load_pem_x509_certificate((osvm.ca_dir / INTERMEDIATE_CERT_FILE).read_bytes())
    assert format(intermediate.serial_number, "x") == rotated["intermediate"]
    assert (osvm.ca_dir / INTERMEDIATE_CERT_FILE).read_bytes() != intermediate_before
    intermediate.verify_directly_issued_by(root)
