"""Tests of the internal CA: files and modes, leaf extensions, verify_peer, CRLs, rotation,
instance files, renewal timing, and real TLS handshakes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import pwd
import random
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from osvm.security import ca as ca_module
from osvm.security import certs, files
from osvm.security.ca import (
    CAError,
    CAExistsError,
    CALoadError,
    CertificateAuthority,
    CertificateNotFound,
    PeerRejected,
    RootKeyRequired,
    renewal_delay,
    write_instance_files,
)

KEY_TYPES = ["ecdsa-p256", "ed25519"]
KEY_CLASSES = {"ecdsa-p256": ec.EllipticCurvePrivateKey, "ed25519": ed25519.Ed25519PrivateKey}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def load_cert(data: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data)


def intermediate_key_of(authority: CertificateAuthority) -> certs.PrivateKey:
    serial = certs.serial_hex(authority.intermediate_certificate.serial_number)
    path = authority.directory / "intermediates" / f"{serial}-key.pem"
    return certs.key_from_pem(path.read_bytes())


def forge_leaf(
    authority: CertificateAuthority,
    uris: list[str],
    usages: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    """Sign a leaf with the CA's own intermediate key but with SANs and EKUs that issue() never writes."""
    issuer = authority.intermediate_certificate
    issuer_key = intermediate_key_of(authority)
    key = ec.generate_private_key(ec.SECP256R1())
    now = utcnow()
    usages = usages if usages is not None else [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri) for uri in uris]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    return builder.sign(issuer_key, certs.signature_hash(issuer_key))


def instance_owner() -> tuple[int, int]:
    """Return the uid and gid that instance files are given: ours unless root, else osvm's or nobody's."""
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    for name in ("osvm", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    pytest.skip("running as root, but neither the osvm nor the nobody user exists")


@pytest.fixture(params=KEY_TYPES)
def key_type(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def authority(tmp_path: Path, key_type: str) -> CertificateAuthority:
    with CertificateAuthority.init(tmp_path / "ca", key_type=key_type) as created:
        yield created


@pytest.fixture
def offline_authority(tmp_path: Path) -> CertificateAuthority:
    with CertificateAuthority.init(tmp_path / "ca", root_out=tmp_path / "offline" / "root-key.pem") as created:
        yield created


@pytest.fixture(autouse=True)
def offline_dir(tmp_path: Path) -> None:
    (tmp_path / "offline").mkdir(mode=0o700)


# init and load


def test_init_file_modes(tmp_path: Path, key_type: str) -> None:
    directory = tmp_path / "state" / "ca"
    with CertificateAuthority.init(directory, key_type=key_type):
        pass

    assert mode_of(directory) == 0o700
    assert mode_of(directory / "intermediates") == 0o700
    assert mode_of(directory / "root-key.pem") == 0o600
    assert mode_of(directory / "root.pem") == 0o644
    assert mode_of(directory / "intermediate.pem") == 0o644
    assert mode_of(directory / "crl.pem") == 0o644
    assert mode_of(directory / "index.db") == 0o600
    key_files = list((directory / "intermediates").glob("*-key.pem"))
    assert len(key_files) == 1
    assert mode_of(key_files[0]) == 0o600
    config = json.loads((directory / "ca.json").read_text())
    assert config["trust_domain"] == "osvm.local"
    assert config["key_type"] == key_type


def test_init_modes_ignore_umask(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        with CertificateAuthority.init(tmp_path / "ca"):
            pass
    finally:
        os.umask(previous)
    assert mode_of(tmp_path / "ca" / "root.pem") == 0o644


def test_init_existing_directory_gets_mode_0700(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    directory.mkdir(mode=0o755)
    with CertificateAuthority.init(directory):
        pass
    assert mode_of(directory) == 0o700


def test_init_root_out_keeps_root_key_outside(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    root_out = tmp_path / "offline" / "root-key.pem"
    with CertificateAuthority.init(directory, root_out=root_out) as authority:
        assert not authority.root_key_online

    assert mode_of(root_out) == 0o600
    assert not (directory / "root-key.pem").exists()
    root_key = certs.key_from_pem(root_out.read_bytes())
    root = load_cert((directory / "root.pem").read_bytes())
    assert certs.public_keys_equal(root_key.public_key(), root.public_key())
    key_files = [path.name for path in directory.rglob("*key*")]
    assert len(key_files) == 1
    assert key_files[0].endswith("-key.pem")
    assert (directory / "intermediates").is_dir()


def test_init_rejects_existing_ca(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    with CertificateAuthority.init(directory):
        pass
    root_before = (directory / "root.pem").read_bytes()

    with pytest.raises(CAExistsError) as raised:
        CertificateAuthority.init(directory)

    message = str(raised.value)
    assert str(directory) in message
    assert "osvm ca rotate" in message
    assert "remove" in message
    assert (directory / "root.pem").read_bytes() == root_before


def test_init_rejects_existing_root_out(tmp_path: Path) -> None:
    root_out = tmp_path / "offline" / "root-key.pem"
    root_out.write_bytes(b"keep me")

    with pytest.raises(CAExistsError, match="already exists"):
        CertificateAuthority.init(tmp_path / "ca", root_out=root_out)

    assert root_out.read_bytes() == b"keep me"
    assert not (tmp_path / "ca").exists()


def test_init_rejects_root_out_inside_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inside the CA directory"):
        CertificateAuthority.init(tmp_path / "ca", root_out=tmp_path / "ca" / "root.key")


def test_init_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "ca"

    def failing_build(*args: object) -> None:
        raise RuntimeError("signing failed")

    monkeypatch.setattr(certs, "build_intermediate", failing_build)
    with pytest.raises(RuntimeError, match="signing failed"):
        CertificateAuthority.init(directory, root_out=tmp_path / "offline" / "root-key.pem")
    monkeypatch.undo()

    assert not directory.exists()
    assert not (tmp_path / "offline" / "root-key.pem").exists()
    with CertificateAuthority.init(directory, root_out=tmp_path / "offline" / "root-key.pem"):
        pass


def test_init_rejects_missing_root_out_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is missing: create it first"):
        CertificateAuthority.init(tmp_path / "ca", root_out=tmp_path / "usb" / "root-key.pem")
    assert not (tmp_path / "ca").exists()

@pytest.mark.parametrize(
    "trust_domain",
    ["", "OSVM.local", "osvm..local", "-osvm.local", "osvm.local.", "osvm_local", "spiffe://osvm.local", "a" * 64],
)
def test_init_rejects_invalid_trust_domain(tmp_path: Path, trust_domain: str) -> None:
    with pytest.raises(ValueError, match="invalid trust domain"):
        CertificateAuthority.init(tmp_path / "ca", trust_domain=trust_domain)
    assert not (tmp_path / "ca").exists()


def test_init_rejects_unknown_key_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ecdsa-p256, ed25519"):
        CertificateAuthority.init(tmp_path / "ca", key_type="rsa-2048")


def test_root_and_intermediate_extensions(authority: CertificateAuthority) -> None:
    root = authority.root_certificate
    intermediate = authority.intermediate_certificate

    root_constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert root_constraints.critical
    assert root_constraints.value.ca
    assert root_constraints.value.path_length == 1
    root_usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert root_usage.critical
    assert root_usage.value.key_cert_sign
    assert root_usage.value.crl_sign
    assert not root_usage.value.digital_signature
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    root_years = (root.not_valid_after_utc - root.not_valid_before_utc).days / 365
    assert 9.9 < root_years < 10.1

    intermediate_constraints = intermediate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert intermediate_constraints.critical
    assert intermediate_constraints.value.ca
    assert intermediate_constraints.value.path_length == 0
    intermediate_usage = intermediate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert intermediate_usage.key_cert_sign
    assert intermediate_usage.crl_sign
    intermediate.verify_directly_issued_by(root)
    intermediate_years = (intermediate.not_valid_after_utc - intermediate.not_valid_before_utc).days / 365
    assert 4.9 < intermediate_years < 5.1
    intermediate_aki = intermediate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert intermediate_aki.key_identifier == root_ski.digest


def test_load_after_restart_keeps_index_and_root(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    with CertificateAuthority.init(directory, trust_domain="chain.example", key_type="ed25519") as first:
        issued = first.issue("rpc", ["rpc.internal"], instance_id="rpc-1")
        revoked = first.issue("indexer", [])
        first.revoke(revoked.serial, "keyCompromise")
        root_pem = first.trust_bundle()

    with CertificateAuthority.load(directory) as second:
        assert second.trust_domain == "chain.example"
        assert second.key_type == "ed25519"
        assert second.trust_bundle() == root_pem
        records = {record.serial: record for record in second.list()}
        assert set(records) == {issued.serial, revoked.serial}
        assert records[issued.serial].component == "rpc"
        assert records[issued.serial].instance_id == "rpc-1"
        assert records[issued.serial].not_after == issued.not_after
        assert records[revoked.serial].revoked_at is not None
        assert records[revoked.serial].reason == "keyCompromise"
        assert second.verify_peer(issued.cert_pem).component == "rpc"
        later = second.issue("rpc", [])
        assert load_cert(later.ca_pem) == load_cert(root_pem)


def test_load_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CALoadError, match="osvm ca init") as raised:
        CertificateAuthority.load(tmp_path / "nothing")
    assert str(tmp_path / "nothing") in str(raised.value)


@pytest.mark.parametrize("name", ["ca.json", "root.pem", "intermediate.pem", "index.db"])
def test_load_missing_file_is_named(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "ca"
    with CertificateAuthority.init(directory):
        pass
    (directory / name).unlink()

    with pytest.raises(CALoadError, match="is missing") as raised:
        CertificateAuthority.load(directory)

    assert str(directory / name) in str(raised.value)


@pytest.mark.parametrize("name", ["ca.json", "root.pem", "intermediate.pem", "index.db"])
def test_load_corrupt_file_is_named(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "ca"
    with CertificateAuthority.init(directory):
        pass
    for leftover in directory.glob("index.db-*"):
        leftover.unlink()
    (directory / name).write_bytes(b"garbage that is long enough to not be a SQLite header or PEM" * 20)

    with pytest.raises(CALoadError) as raised:
        CertificateAuthority.load(directory)

    assert str(directory / name) in str(raised.value)


def test_load_missing_intermediate_key_is_named(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    with CertificateAuthority.init(directory) as authority:
        serial = certs.serial_hex(authority.intermediate_certificate.serial_number)
    key_path = directory / "intermediates" / f"{serial}-key.pem"
    key_path.unlink()

    with pytest.raises(CALoadError, match="intermediate key") as raised:
        CertificateAuthority.load(directory)

    assert str(key_path) in str(raised.value)


# issue


def test_issue_leaf_extensions(authority: CertificateAuthority, key_type: str) -> None:
    before = utcnow()
    issued = authority.issue("rpc", ["rpc.internal", "RPC.osvm.test"], lifetime=3600, instance_id="rpc-7")
    leaf = load_cert(issued.cert_pem)
    intermediate = authority.intermediate_certificate

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://osvm.local/component/rpc"]
    assert san.value.get_values_for_type(x509.DNSName) == ["rpc.internal", "rpc.osvm.test"]
    assert len(list(san.value)) == 3

    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    assert constraints.value.path_length is None

    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_encipherment
    assert not usage.value.key_agreement
    assert not usage.value.key_cert_sign
    assert not usage.value.crl_sign
    assert not usage.value.content_commitment
    assert not usage.value.data_encipherment

    extended = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert not extended.critical
    assert list(extended.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]

    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    intermediate_ski = intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == intermediate_ski.digest
    assert len(leaf.extensions) == 6

    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "rpc"
    assert leaf.issuer == intermediate.subject
    leaf.verify_directly_issued_by(intermediate)

    skew = (before - leaf.not_valid_before_utc).total_seconds()
    assert 55 <= skew <= 65
    lifetime = (leaf.not_valid_after_utc - before).total_seconds()
    assert 3595 <= lifetime <= 3605

    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert isinstance(key, KEY_CLASSES[key_type])
    assert certs.public_keys_equal(key.public_key(), leaf.public_key())

    assert issued.serial == format(leaf.serial_number, "x")
    assert issued.not_before == leaf.not_valid_before_utc
    assert issued.not_after == leaf.not_valid_after_utc
    assert issued.identity.uri == "spiffe://osvm.local/component/rpc"
    assert issued.instance_id == "rpc-7"
    chain = x509.load_pem_x509_certificates(issued.chain_pem)
    assert chain == [leaf, intermediate]
    assert load_cert(issued.ca_pem) == authority.root_certificate
    assert "PRIVATE KEY" not in repr(issued)


def test_issue_without_dns_names_has_only_uri(authority: CertificateAuthority) -> None:
    leaf = load_cert(authority.issue("worker", []).cert_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(list(san)) == 1
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://osvm.local/component/worker"]


def test_issue_uses_fresh_key_each_time(authority: CertificateAuthority) -> None:
    first = authority.issue("rpc", [])
    second = authority.issue("rpc", [])
    assert first.key_pem != second.key_pem
    assert first.serial != second.serial


@pytest.mark.parametrize("lifetime", [299.0, 0.0, -1.0, 30 * 86400 + 1.0])
def test_issue_rejects_lifetime_out_of_range(authority: CertificateAuthority, lifetime: float) -> None:
    with pytest.raises(ValueError, match=r"out of range: use 300 s \(5 minutes\) to 2592000 s \(30 days\)"):
        authority.issue("rpc", [], lifetime=lifetime)
    assert authority.list() == []


@pytest.mark.parametrize("lifetime", [300.0, 30 * 86400.0])
def test_issue_accepts_lifetime_bounds(authority: CertificateAuthority, lifetime: float) -> None:
    leaf = load_cert(authority.issue("rpc", [], lifetime=lifetime).cert_pem)
    length = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    assert length == lifetime + 60


@pytest.mark.parametrize(
    ("component", "dns_names", "message"),
    [
        ("RPC", [], "invalid component name"),
        ("rpc/../x", [], "invalid component name"),
        ("", [], "invalid component name"),
        ("rpc", ["127.0.0.1"], "IP addresses"),
        ("rpc", ["*.osvm.test"], "without wildcards"),
        ("rpc", ["bad_name.test"], "invalid DNS name"),
        ("rpc", [""], "invalid DNS name"),
    ],
)
def test_issue_rejects_invalid_names(
    authority: CertificateAuthority, component: str, dns_names: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        authority.issue(component, dns_names)


def test_issue_logs_serial_without_key(authority: CertificateAuthority, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="osvm.security.ca"):
        issued = authority.issue("rpc", ["rpc.internal"])
    messages = [record.getMessage() for record in caplog.records if record.name == "osvm.security.ca"]
    assert any(issued.serial in message and "component=rpc" in message for message in messages)
    assert not any("PRIVATE KEY" in message for message in messages)


# list and show


def test_list_filters_by_component(authority: CertificateAuthority) -> None:
    rpc = authority.issue("rpc", [])
    authority.issue("indexer", [])
    assert len(authority.list()) == 2
    assert [record.serial for record in authority.list("rpc")] == [rpc.serial]


def test_show_returns_record_and_pem(authority: CertificateAuthority) -> None:
    issued = authority.issue("rpc", [], instance_id="rpc-1")
    colon_serial = ":".join(f"{byte:02X}" for byte in bytes.fromhex(issued.serial.zfill(40)))

    for spelling in (issued.serial, issued.serial.upper(), colon_serial):
        details = authority.show(spelling)
        assert details.record.serial == issued.serial
        assert details.record.instance_id == "rpc-1"
        assert details.cert_pem == issued.cert_pem


def test_show_unknown_serial(authority: CertificateAuthority) -> None:
    with pytest.raises(CertificateNotFound, match="osvm ca list"):
        authority.show("abc123")
    with pytest.raises(ValueError, match="hexadecimal"):
        authority.show("not-hex")


# verify_peer


def test_verify_peer_accepts_good_leaf(authority: CertificateAuthority) -> None:
    issued = authority.issue("rpc", ["rpc.internal"])
    der = load_cert(issued.cert_pem).public_bytes(serialization.Encoding.DER)

    for presented, chain in ((issued.cert_pem, issued.chain_pem), (der, None), (load_cert(issued.cert_pem), [])):
        peer = authority.verify_peer(presented, chain)
        assert peer.component == "rpc"
        assert peer.identity.uri == "spiffe://osvm.local/component/rpc"
        assert peer.serial == issued.serial
        assert peer.not_after == issued.not_after


@pytest.mark.parametrize("presented", [None, b"", b"  \n"])
def test_verify_peer_rejects_missing_certificate(authority: CertificateAuthority, presented: bytes | None) -> None:
    with pytest.raises(PeerRejected) as raised:
        authority.verify_peer(presented, None)
    assert raised.value.reason == "no client certificate"


def test_verify_peer_rejects_garbage(authority: CertificateAuthority) -> None:
    with pytest.raises(PeerRejected, match="invalid client certificate"):
        authority.verify_peer(b"\x30\x03garbage", None)


def test_verify_peer_rejects_expired(authority: CertificateAuthority) -> None:
    issued = authority.issue("rpc", [], lifetime=300)
    later = issued.not_after + dt.timedelta(seconds=1)

    with pytest.raises(PeerRejected) as raised:
        authority.verify_peer(issued.cert_pem, issued.chain_pem, now=later)

    expected = issued.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert raised.value.reason == f"certificate expired at {expected}"


def test_verify_peer_rejects_not_yet_valid(authority: CertificateAuthority) -> None:
    issued = authority.issue("rpc", [])
    earlier = issued.not_before - dt.timedelta(seconds=1)
    with pytest.raises(PeerRejected, match="not valid before"):
        authority.verify_peer(issued.cert_pem, issued.chain_pem, now=earlier)


def test_verify_peer_rejects_other_ca(tmp_path: Path, authority: CertificateAuthority, key_type: str) -> None:
    # Same trust domain and key type: only the keys differ.
    with CertificateAuthority.init(tmp_path / "other", key_type=key_type) as other:
        foreign = other.issue("rpc", [])

    with pytest.raises(PeerRejected) as raised:
        authority.verify_peer(foreign.cert_pem, foreign.chain_pem)

    assert raised.value.reason.startswith("not issued by this CA")


def test_verify_peer_rejects_revoked(authority: CertificateAuthority) -> None:
    issued = authority.issue("rpc", [])
    assert authority.verify_peer(issued.cert_pem).component == "rpc"

    record = authority.revoke(issued.serial, "keyCompromise")

    with pytest.raises(PeerRejected) as raised:
        authority.verify_peer(issued.cert_pem, issued.chain_pem)
    revoked_at = record.revoked_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert raised.value.reason == f"certificate revoked at {revoked_at} (keyCompromise)"


def test_verify_peer_cached_leaf_rechecked(authority: CertificateAuthority) -> None:
    # A DER leaf without a chain, as endpoints pass it, is verified once and then served from the
    # cache, where expiry and revocation are still checked on every call.
    issued = authority.issue("rpc", [], lifetime=300)
    der = load_cert(issued.cert_pem).public_bytes(serialization.Encoding.DER)
    first = authority.verify_peer(der)
    second = authority.verify_peer(der)
    assert second == first

    later = issued.not_after + dt.timedelta(seconds=1)
    with pytest.raises(PeerRejected, match="certificate expired at"):
        authority.verify_peer(der, now=later)

    authority.revoke(issued.serial, "keyCompromise")
    with pytest.raises(PeerRejected, match="certificate revoked at"):
        authority.verify_peer(der)


def test_verify_peer_sees_other_process_revocation(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    with CertificateAuthority.init(directory) as daemon_side:
        issued = daemon_side.issue("rpc", [])
        with CertificateAuthority.load(directory) as cli_side:
            cli_side.revoke(issued.serial)
        with pytest.raises(PeerRejected, match="certificate revoked at"):
            daemon_side.verify_peer(issued.cert_pem)


def test_verify_peer_rejects_two_uri_sans(authority: CertificateAuthority) -> None:
    forged = forge_leaf(
        authority, ["spiffe://osvm.local/component/rpc", "spiffe://osvm.local/component/admin"]
    )
    with pytest.raises(PeerRejected) as raised:
        authority.verify_peer(forged, None)
    assert raised.value.reason == "certificate has 2 URI SANs; exactly one spiffe:// identity is required"


def test_verify_peer_rejects_wrong_trust_domain(authority: CertificateAuthority) -> None:
    forged = forge_leaf(authority, ["spiffe://other.example/component/rpc"])
    with pytest.raises(PeerRejected) as raised:
        authority.verify_peer(forged, None)
    assert raised.value.reason == (
        "identity spiffe://other.example/component/rpc is outside trust domain osvm.local"
    )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("spiffe://osvm.local/admin/rpc", "expected /component/<name>"),
        ("spiffe://osvm.local/component/", "expected /component/<name>"),
        ("https://osvm.local/component/rpc", "is not a spiffe:// identity"),
    ],
)
def test_verify_peer_rejects_bad_identity(authority: CertificateAuthority, uri: str, message: str) -> None:
    with pytest.raises(PeerRejected, match=message):
        authority.verify_peer(forge_leaf(authority, [uri]), None)


def test_verify_peer_requires_client_auth(authority: CertificateAuthority) -> None:
    forged = forge_leaf(authority, ["spiffe://osvm.local/component/rpc"], usages=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(PeerRejected, match="lacks clientAuth"):
        authority.verify_peer(forged, None)


# Revocation and CRL


def test_crl_signed_by_intermediate(authority: CertificateAuthority) -> None:
    valid = authority.issue("rpc", [])
    compromised = authority.issue("rpc", [])
    replaced = authority.issue("indexer", [])
    authority.revoke(compromised.serial, "keyCompromise")
    authority.revoke(replaced.serial, "instance replaced")

    data = authority.crl_pem()
    crl = x509.load_pem_x509_crl(data)
    intermediate = authority.intermediate_certificate

    assert data == (authority.directory / "crl.pem").read_bytes()
    assert crl.issuer == intermediate.subject
    assert crl.is_signature_valid(intermediate.public_key())
    assert not crl.is_signature_valid(authority.root_certificate.public_key())
    serials = {format(entry.serial_number, "x") for entry in crl}
    assert serials == {compromised.serial, replaced.serial}
    assert valid.serial not in serials
    entry = crl.get_revoked_certificate_by_serial_number(int(compromised.serial, 16))
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    free_text = crl.get_revoked_certificate_by_serial_number(int(replaced.serial, 16))
    assert len(free_text.extensions) == 0
    validity = (crl.next_update_utc - crl.last_update_utc).total_seconds()
    assert validity == 3600 + 60
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    intermediate_ski = intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == intermediate_ski.digest


def test_crl_written_on_every_revoke(authority: CertificateAuthority) -> None:
    path = authority.directory / "crl.pem"
    assert len(list(x509.load_pem_x509_crl(path.read_bytes()))) == 0
    numbers = []
    for _ in range(2):
        issued = authority.issue("rpc", [])
        authority.revoke(issued.serial)
        crl = x509.load_pem_x509_crl(path.read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(int(issued.serial, 16)) is not None
        numbers.append(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    assert numbers[1] > numbers[0]


def test_crl_pem_reuses_fresh_file(authority: CertificateAuthority) -> None:
    first = authority.crl_pem()
    assert authority.crl_pem() == first


def test_crl_leaves_out_expired_serials(authority: CertificateAuthority, monkeypatch: pytest.MonkeyPatch) -> None:
    short = authority.issue("rpc", [], lifetime=300)
    long = authority.issue("rpc", [], lifetime=86400)
    authority.revoke(short.serial)
    authority.revoke(long.serial)

    later = short.not_after + dt.timedelta(minutes=5)
    monkeypatch.setattr(ca_module, "_utcnow", lambda: later)
    (authority.directory / "crl.pem").unlink()
    crl = x509.load_pem_x509_crl(authority.crl_pem())

    assert {format(entry.serial_number, "x") for entry in crl} == {long.serial}


def test_revoke_twice_keeps_first_revocation(authority: CertificateAuthority) -> None:
    issued = authority.issue("rpc", [])
    first = authority.revoke(issued.serial, "superseded")
    second = authority.revoke(issued.serial, "keyCompromise")
    assert second.revoked_at == first.revoked_at
    assert second.reason == "superseded"


def test_revoke_unknown_serial(authority: CertificateAuthority) -> None:
    with pytest.raises(CertificateNotFound):
        authority.revoke("deadbeef")


def test_revoke_component(authority: CertificateAuthority) -> None:
    first = authority.issue("rpc", [])
    second = authority.issue("rpc", [])
    already = authority.issue("rpc", [])
    other = authority.issue("indexer", [])
    authority.revoke(already.serial, "superseded")

    revoked = authority.revoke_component("rpc")

    assert sorted(revoked) == sorted([first.serial, second.serial])
    crl = x509.load_pem_x509_crl(authority.crl_pem())
    assert {format(entry.serial_number, "x") for entry in crl} == {first.serial, second.serial, already.serial}
    assert authority.verify_peer(other.cert_pem).component == "indexer"
    assert authority.revoke_component("rpc") == []


def test_crl_accepted_by_openssl(authority: CertificateAuthority) -> None:
    authority.revoke(authority.issue("rpc", []).serial)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # cadata takes only certificates; a file may also contain CRLs.
    context.load_verify_locations(cafile=authority.directory / "crl.pem")
    assert context.cert_store_stats()["crl"] == 1


# rotate


def test_rotate_with_root_key_online(authority: CertificateAuthority) -> None:
    old_intermediate = authority.intermediate_certificate
    before = authority.issue("rpc", [])
    bundle = authority.trust_bundle()

    new_serial = authority.rotate()

    new_intermediate = authority.intermediate_certificate
    assert new_serial == format(new_intermediate.serial_number, "x")
    assert new_intermediate != old_intermediate
    assert new_intermediate.subject != old_intermediate.subject
    new_intermediate.verify_directly_issued_by(authority.root_certificate)
    assert authority.trust_bundle() == bundle
    assert (authority.directory / "intermediate.pem").read_bytes() == new_intermediate.public_bytes(
        serialization.Encoding.PEM
    )

    after = authority.issue("rpc", [])
    assert x509.load_pem_x509_certificates(after.chain_pem)[1] == new_intermediate
    load_cert(after.cert_pem).verify_directly_issued_by(new_intermediate)
    assert authority.verify_peer(after.cert_pem, after.chain_pem).component == "rpc"
    # Leaves of the retired intermediate stay valid, with or without their chain.
    assert authority.verify_peer(before.cert_pem, before.chain_pem).component == "rpc"
    assert authority.verify_peer(before.cert_pem, None).component == "rpc"


def test_rotate_keeps_crl_of_retired_intermediate(authority: CertificateAuthority) -> None:
    old_intermediate = authority.intermediate_certificate
    before = authority.issue("rpc", [])
    authority.rotate()
    authority.revoke(before.serial, "keyCompromise")

    data = authority.crl_pem()

    assert data.count(b"-----BEGIN X509 CRL-----") == 2
    blocks = [block + b"-----END X509 CRL-----\n" for block in data.split(b"-----END X509 CRL-----\n")[:-1]]
    current, retired = (x509.load_pem_x509_crl(block) for block in blocks)
    assert current.issuer == authority.intermediate_certificate.subject
    assert len(list(current)) == 0
    assert retired.issuer == old_intermediate.subject
    assert retired.is_signature_valid(old_intermediate.public_key())
    assert retired.get_revoked_certificate_by_serial_number(int(before.serial, 16)) is not None
    with pytest.raises(PeerRejected, match="revoked"):
        authority.verify_peer(before.cert_pem)


def test_rotate_prunes_expired_intermediate(
    authority: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_serial = format(authority.intermediate_certificate.serial_number, "x")
    before = authority.issue("rpc", [], lifetime=300)
    authority.rotate()
    retired_key = authority.directory / "intermediates" / f"{old_serial}-key.pem"
    assert retired_key.exists()

    later = before.not_after + dt.timedelta(minutes=1)
    monkeypatch.setattr(ca_module, "_utcnow", lambda: later)
    (authority.directory / "crl.pem").unlink()
    data = authority.crl_pem()

    assert data.count(b"-----BEGIN X509 CRL-----") == 1
    assert not retired_key.exists()
    assert not (authority.directory / "intermediates" / f"{old_serial}.pem").exists()


def test_rotate_survives_restart(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    with CertificateAuthority.init(directory) as authority:
        before = authority.issue("rpc", [])
        new_serial = authority.rotate()

    with CertificateAuthority.load(directory) as reloaded:
        assert format(reloaded.intermediate_certificate.serial_number, "x") == new_serial
        assert reloaded.verify_peer(before.cert_pem).component == "rpc"
        after = reloaded.issue("rpc", [])
        load_cert(after.cert_pem).verify_directly_issued_by(reloaded.intermediate_certificate)


def test_rotate_without_root_key_needs_path(offline_authority: CertificateAuthority) -> None:
    old = offline_authority.intermediate_certificate
    with pytest.raises(RootKeyRequired, match="--root-key PATH"):
        offline_authority.rotate()
    assert offline_authority.intermediate_certificate == old


def test_rotate_with_offline_root_key(tmp_path: Path, offline_authority: CertificateAuthority) -> None:
    new_serial = offline_authority.rotate(root_key=tmp_path / "offline" / "root-key.pem")
    assert format(offline_authority.intermediate_certificate.serial_number, "x") == new_serial
    assert not (offline_authority.directory / "root-key.pem").exists()
    issued = offline_authority.issue("rpc", [])
    assert offline_authority.verify_peer(issued.cert_pem, issued.chain_pem).component == "rpc"


def test_rotate_rejects_wrong_root_key(tmp_path: Path, offline_authority: CertificateAuthority) -> None:
    wrong = tmp_path / "offline" / "wrong-key.pem"
    wrong.write_bytes(certs.key_to_pem(certs.generate_key("ecdsa-p256")))
    with pytest.raises(CAError, match="does not match root certificate"):
        offline_authority.rotate(root_key=wrong)
    with pytest.raises(CAError, match="is missing"):
        offline_authority.rotate(root_key=tmp_path / "offline" / "absent.pem")


# write_instance_files


def test_write_instance_files_modes_and_owner(tmp_path: Path, authority: CertificateAuthority) -> None:
    uid, gid = instance_owner()
    issued = authority.issue("rpc", ["rpc.internal"])
    directory = tmp_path / "instance" / "tls"
    directory.parent.mkdir()

    env = write_instance_files(directory, issued, uid, gid)

    assert env == {
        "OSVM_TLS_CERT": str(directory / "cert.pem"),
        "OSVM_TLS_KEY": str(directory / "key.pem"),
        "OSVM_TLS_CA": str(directory / "ca.pem"),
    }
    assert mode_of(directory) == 0o700
    assert mode_of(directory / "key.pem") == 0o600
    assert mode_of(directory / "cert.pem") == 0o644
    assert mode_of(directory / "ca.pem") == 0o644
    for path in (directory, directory / "key.pem", directory / "cert.pem", directory / "ca.pem"):
        info = os.lstat(path)
        assert (info.st_uid, info.st_gid) == (uid, gid)
    assert (directory / "cert.pem").read_bytes() == issued.chain_pem
    assert (directory / "key.pem").read_bytes() == issued.key_pem
    assert (directory / "ca.pem").read_bytes() == issued.ca_pem


def test_write_instance_files_replaces_atomically(tmp_path: Path, authority: CertificateAuthority) -> None:
    uid, gid = instance_owner()
    directory = tmp_path / "tls"
    first = authority.issue("rpc", [])
    second = authority.issue("rpc", [])
    write_instance_files(directory, first, uid, gid)
    old_inode = os.stat(directory / "key.pem").st_ino

    with open(directory / "key.pem", "rb") as old_reader:
        write_instance_files(directory, second, uid, gid)
        # A reader that opened the old file keeps reading it whole: the new file is a new inode.
        assert old_reader.read() == first.key_pem

    assert os.stat(directory / "key.pem").st_ino != old_inode
    assert (directory / "key.pem").read_bytes() == second.key_pem
    assert (directory / "cert.pem").read_bytes() == second.chain_pem
    assert sorted(path.name for path in directory.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]


def test_write_instance_files_failure_keeps_old_files(
    tmp_path: Path, authority: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid, gid = instance_owner()
    directory = tmp_path / "tls"
    first = authority.issue("rpc", [])
    write_instance_files(directory, first, uid, gid)

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_instance_files(directory, authority.issue("rpc", []), uid, gid)
    monkeypatch.undo()

    assert (directory / "ca.pem").read_bytes() == first.ca_pem
    assert (directory / "key.pem").read_bytes() == first.key_pem
    assert (directory / "cert.pem").read_bytes() == first.chain_pem
    assert sorted(path.name for path in directory.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]


def test_write_instance_files_rejects_symlinked_directory(tmp_path: Path, authority: CertificateAuthority) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "tls"
    link.symlink_to(target)
    with pytest.raises(NotADirectoryError, match="not a directory"):
        write_instance_files(link, authority.issue("rpc", []), os.getuid(), os.getgid())
    assert list(target.iterdir()) == []


# renewal_delay


def test_renewal_delay_at_two_thirds() -> None:
    not_before = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    not_after = not_before + dt.timedelta(hours=24)
    rng = random.Random(7)

    delays = [renewal_delay(not_before, not_after, rng, now=not_before) for _ in range(1000)]

    lifetime = 86400.0
    assert min(delays) >= lifetime * (2 / 3 - 0.05)
    assert max(delays) <= lifetime * (2 / 3 + 0.05)
    assert abs(sum(delays) / len(delays) - lifetime * 2 / 3) < lifetime * 0.01
    # Jitter spreads the delays over most of the ±5% band.
    assert max(delays) - min(delays) > lifetime * 0.09


def test_renewal_delay_counts_from_now() -> None:
    not_before = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    not_after = not_before + dt.timedelta(seconds=3000)
    now = not_before + dt.timedelta(seconds=1000)

    delay = renewal_delay(not_before, not_after, random.Random(1), now=now)

    assert 2000 - 150 - 1000 <= delay <= 2000 + 150 - 1000


def test_renewal_delay_never_negative() -> None:
    not_before = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    not_after = not_before + dt.timedelta(hours=1)
    assert renewal_delay(not_before, not_after, random.Random(1), now=not_after) == 0.0


def test_renewal_delay_rejects_empty_lifetime() -> None:
    moment = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    with pytest.raises(ValueError, match="is not after"):
        renewal_delay(moment, moment, random.Random(1))


def test_renewal_delay_of_issued_certificate(authority: CertificateAuthority) -> None:
    issued = authority.issue("rpc", [], lifetime=3600)
    delay = renewal_delay(issued.not_before, issued.not_after, random.Random(3))
    lifetime = 3660.0
    expected = lifetime * 2 / 3 - 60
    assert expected - lifetime * 0.05 - 5 <= delay <= expected + lifetime * 0.05


# TLS handshakes on 127.0.0.1


@dataclass
class HandshakeResult:
    # The line the server sent back: the client's component from verify_peer, or None.
    answer: str | None = None
    # Components that the server's handler verified after a successful handshake.
    seen: list[str] = field(default_factory=list)
    # The server's handshake errors, as OpenSSL's verify messages or reasons.
    server_errors: list[str] = field(default_factory=list)


async def handshake(
    authority: CertificateAuthority,
    server_files: dict[str, str],
    client_files: dict[str, str],
    check_crl: bool = False,
) -> HandshakeResult:
    """Connect a TLS client to a TLS server on 127.0.0.1 that requires client certificates.

    The server runs the handshake itself with start_tls, because asyncio reports a failed server
    handshake nowhere but in debug logs.
    """
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(server_files["OSVM_TLS_CERT"], server_files["OSVM_TLS_KEY"])
    server_context.load_verify_locations(cafile=server_files["OSVM_TLS_CA"])
    server_context.verify_mode = ssl.CERT_REQUIRED
    if check_crl:
        authority.crl_pem()
        server_context.load_verify_locations(cafile=authority.directory / "crl.pem")
        server_context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF

    result = HandshakeResult()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(server_context)
        except ssl.SSLCertVerificationError as error:
            result.server_errors.append(error.verify_message)
            writer.close()
            return
        except (ssl.SSLError, ConnectionError) as error:
            result.server_errors.append(str(error))
            writer.close()
            return
        peer_der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        try:
            component = authority.verify_peer(peer_der).component
        except PeerRejected as error:
            component = f"rejected: {error.reason}"
        result.seen.append(component)
        await reader.readline()
        writer.write(component.encode() + b"\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(cafile=client_files["OSVM_TLS_CA"])
    client_context.load_cert_chain(client_files["OSVM_TLS_CERT"], client_files["OSVM_TLS_KEY"])

    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context, server_hostname="rpc.osvm.test"
            )
            try:
                writer.write(b"hello\n")
                await writer.drain()
                line = await reader.readline()
                result.answer = line.decode().strip() or None
            finally:
                writer.close()
    except (ssl.SSLError, ConnectionError):
        # With TLS 1.3 the client finishes its side of the handshake before the server checks the
        # client certificate, so a rejection reaches the client as an alert or as end of file.
        result.answer = None
    finally:
        server.close()
        await server.wait_closed()
    return result


@pytest.fixture
def tls_files(tmp_path: Path, authority: CertificateAuthority):
    def write(name: str, issued) -> dict[str, str]:
        return write_instance_files(tmp_path / name, issued, os.getuid(), os.getgid())

    return write


async def test_tls_handshake_with_issued_leaves(authority: CertificateAuthority, tls_files) -> None:
    server = tls_files("server", authority.issue("rpc", ["rpc.osvm.test"]))
    client = tls_files("client", authority.issue("indexer", []))

    result = await handshake(authority, server, client)

    assert result.server_errors == []
    assert result.seen == ["indexer"]
    assert result.answer == "indexer"


async def test_tls_handshake_rejects_other_ca(
    tmp_path: Path, authority: CertificateAuthority, key_type: str, tls_files
) -> None:
    server = tls_files("server", authority.issue("rpc", ["rpc.osvm.test"]))
    with CertificateAuthority.init(tmp_path / "other", key_type=key_type) as other:
        foreign = other.issue("indexer", [])
    client = tls_files("client", foreign)
    # The foreign client trusts our root, so only the server's check of the client can fail.
    client["OSVM_TLS_CA"] = server["OSVM_TLS_CA"]

    result = await handshake(authority, server, client)

    assert result.server_errors == ["unable to get local issuer certificate"]
    assert result.seen == []
    assert result.answer is None


async def test_tls_handshake_with_crl_rejects_revoked(authority: CertificateAuthority, tls_files) -> None:
    server = tls_files("server", authority.issue("rpc", ["rpc.osvm.test"]))
    good = tls_files("good", authority.issue("indexer", []))
    revoked_leaf = authority.issue("indexer", [])
    revoked = tls_files("revoked", revoked_leaf)
    authority.revoke(revoked_leaf.serial, "keyCompromise")

    good_result = await handshake(authority, server, good, check_crl=True)
    revoked_result = await handshake(authority, server, revoked, check_crl=True)

    assert good_result.server_errors == []
    assert good_result.answer == "indexer"
    assert revoked_result.server_errors == ["certificate revoked"]
    assert revoked_result.seen == []
    assert revoked_result.answer is None


async def test_tls_verify_peer_rejects_revoked(authority: CertificateAuthority, tls_files) -> None:
    server = tls_files("server", authority.issue("rpc", ["rpc.osvm.test"]))
    revoked_leaf = authority.issue("indexer", [])
    client = tls_files("client", revoked_leaf)
    authority.revoke(revoked_leaf.serial, "superseded")

    # Without a CRL in the server context OpenSSL accepts the chain, and verify_peer rejects it.
    result = await handshake(authority, server, client)

    assert result.server_errors == []
    assert len(result.seen) == 1
    assert result.seen[0].startswith("rejected: certificate revoked at ")
    assert result.answer == result.seen[0]


async def test_tls_handshake_after_rotation(authority: CertificateAuthority, tls_files) -> None:
    old_client = tls_files("old-client", authority.issue("indexer", []))
    authority.rotate()
    server = tls_files("server", authority.issue("rpc", ["rpc.osvm.test"]))
    new_client = tls_files("new-client", authority.issue("worker", []))

    old_result = await handshake(authority, server, old_client, check_crl=True)
    new_result = await handshake(authority, server, new_client, check_crl=True)

    assert old_result.server_errors == []
    assert old_result.answer == "indexer"
    assert new_result.server_errors == []
    assert new_result.answer == "worker"

