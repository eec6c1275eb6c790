"""X.509 building blocks of the internal CA: keys, the root, intermediates, leaves and CRLs.

Every certificate here carries SKI and AKI. CA certificates mark BasicConstraints and KeyUsage
critical.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ecdsa-p256", "ed25519"]
KEY_TYPES: tuple[str, ...] = ("ecdsa-p256", "ed25519")
PrivateKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]

ROOT_LIFETIME = dt.timedelta(days=3650)
INTERMEDIATE_LIFETIME = dt.timedelta(days=1826)
# Every not_before is set this far in the past, so that peers whose clock runs behind accept a
# certificate issued a moment ago.
CLOCK_SKEW = dt.timedelta(seconds=60)

_ORGANIZATION = "osvm"


def generate_key(key_type: str) -> PrivateKey:
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"invalid key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


def key_type_of(key: object) -> str:
    """Return the KEY_TYPES name of a private or public key, or raise ValueError for other keys."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and isinstance(key.curve, ec.SECP256R1):
        return "ecdsa-p256"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    raise ValueError(f"unsupported key {type(key).__name__}: the CA uses only {', '.join(KEY_TYPES)} keys")


def signature_hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    """Return the hash for signing with key: SHA-256 for ECDSA, None for Ed25519, which hashes internally."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    return hashes.SHA256()


def key_to_pem(key: PrivateKey) -> bytes:
    """Serialize key as unencrypted PKCS #8 PEM. Callers write it only to files of mode 0600."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def key_from_pem(data: bytes) -> PrivateKey:
    """Load a PEM private key, raising ValueError if it is invalid or not a CA key type."""
    key = serialization.load_pem_private_key(data, password=None)
    key_type_of(key)
    return key  # type: ignore[return-value]


def public_keys_equal(left: object, right: object) -> bool:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return left.public_bytes(*spki) == right.public_bytes(*spki)  # type: ignore[attr-defined]


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def _name(trust_domain: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def build_root(key: PrivateKey, trust_domain: str, now: dt.datetime) -> x509.Certificate:
    """Build the self-signed root: CA with path length 1, valid for ROOT_LIFETIME."""
    name = _name(trust_domain, "osvm root CA")
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
    )
    return builder.sign(key, signature_hash(key))


def build_intermediate(
    key: PrivateKey, root: x509.Certificate, root_key: PrivateKey, trust_domain: str, now: dt.datetime
) -> x509.Certificate:
    """Build an intermediate signed by the root: CA with path length 0, valid for
    INTERMEDIATE_LIFETIME but never past the root's not_after."""
    serial = x509.random_serial_number()
    # The serial in the name keeps the subjects of rotated intermediates apart.
    name = _name(trust_domain, f"osvm intermediate CA {serial_hex(serial)[:8]}")
    not_after = min(now + INTERMEDIATE_LIFETIME, root.not_valid_after_utc)
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(root), critical=False)
    )
    return builder.sign(root_key, signature_hash(root_key))


def build_leaf(
    public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
    component: str,
    identity_uri: str,
    dns_names: list[str],
    not_before: dt.datetime,
    not_after: dt.datetime,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
) -> x509.Certificate:
    """Build a component's leaf: one URI SAN (its SPIFFE ID) plus DNS SANs, for TLS servers and clients."""
    san = [x509.UniformResourceIdentifier(identity_uri), *(x509.DNSName(name) for name in dns_names)]
    # digitalSignature alone: ECDSA and Ed25519 keys sign the TLS handshake and never encrypt a key.
    key_usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, component)]))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(issuer), critical=False)
    )
    return builder.sign(issuer_key, signature_hash(issuer_key))


def build_crl(
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    revoked: list[tuple[int, dt.datetime, x509.ReasonFlags | None]],
    crl_number: int,
    now: dt.datetime,
    next_update: dt.datetime,
) -> x509.CertificateRevocationList:
    """Build a CRL of issuer listing revoked, given as (serial, revoked_at, reason code or None)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(_authority_key_identifier(issuer), critical=False)
    )
    for serial, revoked_at, reason in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at)
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(issuer_key, signature_hash(issuer_key))


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
