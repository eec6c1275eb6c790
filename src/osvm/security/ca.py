"""The internal certificate authority: a root, an online intermediate, and short-lived leaves.

The root signs only intermediates. Its key can live outside the CA directory (``root_out``), and
then rotating the intermediate needs that key file. The intermediate signs the leaves of
components, each with exactly one URI SAN, the component's SPIFFE ID (see identity.py).

Layout of the CA directory (mode 0700):

    ca.json                          trust domain and key type
    root.pem                         root certificate, the trust bundle
    root-key.pem                     root key, absent when it is kept offline
    intermediate.pem                 the current intermediate certificate
    intermediates/<serial>.pem       intermediate certificates, the current one and retired ones
    intermediates/<serial>-key.pem   their keys
    index.db                         every issued leaf (index.py)
    crl.pem                          one CRL per intermediate that still has unexpired leaves

A retired intermediate and its key stay in intermediates/ until the last leaf it signed expires,
so that its leaves still verify and its CRL can still be signed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from osvm.security import certs
from osvm.security.certs import KEY_TYPES, PrivateKey
from osvm.security.files import create_file, replace_file
from osvm.security.identity import (
    SpiffeId,
    normalize_dns_names,
    parse_spiffe_id,
    validate_component_name,
    validate_trust_domain,
)
from osvm.security.index import CertificateIndex, CertificateRecord
from osvm.security.instance_certs import renewal_delay, write_instance_files

try:
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
except ImportError:
    PolicyBuilder = None  # type: ignore[assignment, misc]
# Without a client verifier in this cryptography release, verify_peer relies on its own checks alone.
_HAS_CLIENT_VERIFIER = PolicyBuilder is not None and hasattr(PolicyBuilder, "build_client_verifier")

__all__ = [
    "CAError",
    "CAExistsError",
    "CALoadError",
    "CertificateAuthority",
    "CertificateDetails",
    "CertificateNotFound",
    "CertificateRecord",
    "IssuedCertificate",
    "PeerIdentity",
    "PeerRejected",
    "RootKeyRequired",
    "renewal_delay",
    "write_instance_files",
]

logger = logging.getLogger("osvm.security.ca")

MIN_LEAF_LIFETIME = 300.0
MAX_LEAF_LIFETIME = 30 * 86400.0
# A CRL's next_update is this far after its last_update. crl_pem() signs a new CRL once less than
# half of this is left, so consumers that fetch it every half hour never hold a stale one.
CRL_LIFETIME = dt.timedelta(hours=1)

# Leaves whose signatures and path verify_peer has checked, kept so a reconnecting peer skips those
# checks. 4096 entries of a few hundred bytes each.
VERIFIED_CACHE_SIZE = 4096

CONFIG_FILE = "ca.json"
ROOT_CERT_FILE = "root.pem"
ROOT_KEY_FILE = "root-key.pem"
INTERMEDIATE_CERT_FILE = "intermediate.pem"
INTERMEDIATES_DIR = "intermediates"
INDEX_FILE = "index.db"
CRL_FILE = "crl.pem"

# Files whose presence means that a directory already contains a CA, complete or half-created.
_CA_FILES = (CONFIG_FILE, ROOT_CERT_FILE, ROOT_KEY_FILE, INTERMEDIATE_CERT_FILE, INTERMEDIATES_DIR, INDEX_FILE)

# Revocation reasons that map to a CRL reason code, keyed by their RFC 5280 name in lowercase.
# certificateHold and removeFromCRL are left out because a revocation here is permanent.
_CRL_REASONS = {
    flag.value.lower(): flag
    for flag in x509.ReasonFlags
    if flag not in (x509.ReasonFlags.unspecified, x509.ReasonFlags.certificate_hold, x509.ReasonFlags.remove_from_crl)
}


class CAError(Exception):
    """An operation of the CA failed; the message names the file or value and the fix."""


class CAExistsError(CAError):
    """init found an existing CA or root key file where it would write one."""


class CALoadError(CAError):
    """A file of the CA directory is missing or invalid."""


class RootKeyRequired(CAError):
    """An operation needs the root key, which is kept outside the CA directory."""


class CertificateNotFound(CAError):
    """The index has no certificate with the requested serial."""


class PeerRejected(Exception):
    """A peer certificate that verify_peer rejected, with a one-line reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class IssuedCertificate:
    """A leaf certificate with its fresh private key, as PEM."""

    component: str
    instance_id: str | None
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    identity: SpiffeId
    # The leaf alone.
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    # The leaf followed by the intermediate that signed it, as TLS peers expect to receive it.
    chain_pem: bytes
    # The root certificate, the trust anchor for peers.
    ca_pem: bytes


@dataclass(frozen=True)
class CertificateDetails:
    """An index record with the certificate itself."""

    record: CertificateRecord
    cert_pem: bytes


@dataclass(frozen=True)
class PeerIdentity:
    """The component behind a verified peer certificate."""

    component: str
    identity: SpiffeId
    serial: str
    not_after: dt.datetime


def _utcnow() -> dt.datetime:
    # X.509 validity dates have whole seconds.
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _format_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _normalize_serial(serial: str) -> str:
    """Return serial as the index spells it (lowercase hex, no leading zeros), accepting colons and 0x."""
    text = serial.strip().lower().replace(":", "").removeprefix("0x")
    try:
        value = int(text, 16)
    except ValueError:
        raise ValueError(f"invalid serial {serial!r}: expected hexadecimal digits, as `osvm ca list` prints them") from None
    return certs.serial_hex(value)


def _crl_reason(reason: str | None) -> x509.ReasonFlags | None:
    """Return the CRL reason code for an RFC 5280 reason name, such as "keyCompromise", or None for free text."""
    if reason is None:
        return None
    return _CRL_REASONS.get(reason.replace("_", "").replace("-", "").replace(" ", "").lower())


def _private_key_matches(key: PrivateKey, certificate: x509.Certificate) -> bool:
    return certs.public_keys_equal(key.public_key(), certificate.public_key())


def _read(path: Path, description: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CALoadError(
            f"{description} {path} is missing: restore it from a backup, or create a CA with `osvm ca init`"
        ) from None
    except OSError as error:
        raise CALoadError(f"failed to read {description} {path}: {error.strerror}") from None


def _load_certificate(path: Path, description: str) -> x509.Certificate:
    data = _read(path, description)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as error:
        raise CALoadError(f"{description} {path} is not a valid PEM certificate: {error}") from None


def _load_key(path: Path, description: str) -> PrivateKey:
    data = _read(path, description)
    try:
        return certs.key_from_pem(data)
    except (ValueError, TypeError) as error:
        raise CALoadError(f"{description} {path} is not a valid unencrypted PEM key: {error}") from None


def _parse_presented(data: bytes | x509.Certificate) -> list[x509.Certificate]:
    """Parse a certificate, DER bytes, or PEM bytes with one or more certificates."""
    if isinstance(data, x509.Certificate):
        return [data]
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificates(data)
    return [x509.load_der_x509_certificate(data)]


def _is_ca_certificate(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca and usage.key_cert_sign


def _is_directly_issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class CertificateAuthority:
    """A CA directory opened by init() or load(). Methods may be called from several threads."""

    def __init__(
        self,
        directory: Path,
        trust_domain: str,
        key_type: str,
        root: x509.Certificate,
        intermediate: x509.Certificate,
        intermediate_key: PrivateKey,
        intermediates: dict[str, x509.Certificate],
        index: CertificateIndex,
    ) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        self.key_type = key_type
        self._root = root
        self._root_pem = root.public_bytes(serialization.Encoding.PEM)
        self._intermediate = intermediate
        self._intermediate_key = intermediate_key
        # Every intermediate signed by the root and not yet removed, current and retired, by serial.
        self._intermediates = intermediates
        self._index = index
        self._lock = threading.RLock()
        # Verified leaves by their DER bytes: (leaf, issuer, identity), least recently used first.
        self._verified: OrderedDict[bytes, tuple[x509.Certificate, x509.Certificate, SpiffeId]] = OrderedDict()

    # Creating and opening

    @classmethod
    def init(
        cls,
        directory: Path,
        trust_domain: str = "osvm.local",
        key_type: str = "ecdsa-p256",
        root_out: Path | None = None,
    ) -> CertificateAuthority:
        """Create a CA in directory: a self-signed root and an intermediate signed by it.

        The root key goes to root_out if given, and then never into directory, so the root can be kept
        offline. Raises CAExistsError if directory already contains a CA or root_out exists, and
        ValueError for an invalid trust domain or key type.
        """
        validate_trust_domain(trust_domain)
        if key_type not in KEY_TYPES:
            raise ValueError(f"invalid key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")
        directory = Path(directory).absolute()
        existing = [name for name in _CA_FILES if (directory / name).exists()]
        if existing:
            raise CAExistsError(
                f"a CA already exists in {directory} (found {', '.join(existing)}): rotate its intermediate "
                f"with `osvm ca rotate`, or remove {directory} to create a new CA"
            )
        if root_out is not None:
            root_out = Path(root_out).absolute()
            if root_out.is_relative_to(directory):
                raise ValueError(
                    f"root key path {root_out} is inside the CA directory {directory}: "
                    "choose a path outside it, such as on removable media"
                )
            if root_out.exists():
                raise CAExistsError(f"root key file {root_out} already exists: choose another path or remove it")
            if not root_out.parent.is_dir():
                raise ValueError(f"directory {root_out.parent} of root key path {root_out} is missing: create it first")

        directory_existed = directory.exists()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir leaves an existing directory's mode alone, and its mode is subject to the umask.
        directory.chmod(0o700)
        root_key_path = root_out if root_out is not None else directory / ROOT_KEY_FILE
        created: list[Path] = []
        try:
            authority = cls._create(directory, trust_domain, key_type, root_key_path, created)
        except BaseException:
            # Leave no half-created CA behind, since init rejects a directory that contains one.
            for path in reversed(created):
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink(missing_ok=True)
            if not directory_existed:
                directory.rmdir()
            raise
        logger.info(
            "created CA in %s: trust domain %s, key type %s, root %s, intermediate %s, root key in %s",
            directory,
            trust_domain,
            key_type,
            certs.serial_hex(authority.root_certificate.serial_number),
            certs.serial_hex(authority.intermediate_certificate.serial_number),
            root_key_path,
        )
        return authority

    @classmethod
    def _create(
        cls, directory: Path, trust_domain: str, key_type: str, root_key_path: Path, created: list[Path]
    ) -> CertificateAuthority:
        """Write the files of a new CA, appending each path to created once it exists.

        The index files are listed before they exist, because SQLite creates the -wal and -shm files.
        """
        (directory / INTERMEDIATES_DIR).mkdir(mode=0o700)
        created.append(directory / INTERMEDIATES_DIR)

        now = _utcnow()
        root_key = certs.generate_key(key_type)
        root = certs.build_root(root_key, trust_domain, now)
        create_file(root_key_path, certs.key_to_pem(root_key), 0o600)
        created.append(root_key_path)
        create_file(directory / ROOT_CERT_FILE, root.public_bytes(serialization.Encoding.PEM), 0o644)
        created.append(directory / ROOT_CERT_FILE)

        intermediate_key = certs.generate_key(key_type)
        intermediate = certs.build_intermediate(intermediate_key, root, root_key, trust_domain, now)
        intermediate_serial = certs.serial_hex(intermediate.serial_number)
        cls._write_intermediate(directory, intermediate, intermediate_key, created)
        create_file(directory / INTERMEDIATE_CERT_FILE, intermediate.public_bytes(serialization.Encoding.PEM), 0o644)
        created.append(directory / INTERMEDIATE_CERT_FILE)

        index_path = directory / INDEX_FILE
        created.extend([index_path, Path(f"{index_path}-wal"), Path(f"{index_path}-shm")])
        index = CertificateIndex.create(index_path)
        authority = cls(
            directory,
            trust_domain,
            key_type,
            root,
            intermediate,
            intermediate_key,
            {intermediate_serial: intermediate},
            index,
        )
        try:
            authority._write_crl(now)
            created.append(directory / CRL_FILE)
            config = {"trust_domain": trust_domain, "key_type": key_type, "created_at": _format_time(now)}
            # ca.json comes last: load() rejects a directory without it as an incomplete CA.
            create_file(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode(), 0o644)
        except BaseException:
            authority.close()
            raise
        return authority

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Open the CA in directory, raising CALoadError that names the file when one is missing or invalid."""
        directory = Path(directory).absolute()
        if not directory.is_dir():
            raise CALoadError(f"CA directory {directory} is missing: create a CA with `osvm ca init`")

        config_path = directory / CONFIG_FILE
        try:
            config = json.loads(_read(config_path, "CA configuration"))
            trust_domain = validate_trust_domain(config["trust_domain"])
            key_type = config["key_type"]
            if key_type not in KEY_TYPES:
                raise ValueError(f"invalid key type {key_type!r}")
        except (ValueError, KeyError, TypeError) as error:
            raise CALoadError(f"CA configuration {config_path} is invalid: {error}") from None

        root = _load_certificate(directory / ROOT_CERT_FILE, "root certificate")
        intermediate_path = directory / INTERMEDIATE_CERT_FILE
        intermediate = _load_certificate(intermediate_path, "intermediate certificate")
        intermediate_serial = certs.serial_hex(intermediate.serial_number)
        if not _is_directly_issued_by(intermediate, root):
            raise CALoadError(
                f"intermediate certificate {intermediate_path} is not signed by root certificate "
                f"{directory / ROOT_CERT_FILE}: restore both from the same backup"
            )
        key_path = cls._intermediate_key_path(directory, intermediate_serial)
        intermediate_key = _load_key(key_path, "intermediate key")
        if not _private_key_matches(intermediate_key, intermediate):
            raise CALoadError(f"intermediate key {key_path} does not match certificate {intermediate_path}")

        intermediates = {intermediate_serial: intermediate}
        for path in sorted((directory / INTERMEDIATES_DIR).glob("*.pem")):
            if path.name.endswith("-key.pem") or path.stem == intermediate_serial:
                continue
            try:
                retired = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError) as error:
                logger.warning("skipped retired intermediate %s: cannot load it: %s", path, error)
                continue
            if not _is_directly_issued_by(retired, root):
                logger.warning("skipped retired intermediate %s: it is not signed by the root", path)
                continue
            intermediates[certs.serial_hex(retired.serial_number)] = retired

        index_path = directory / INDEX_FILE
        try:
            index = CertificateIndex.open(index_path)
        except FileNotFoundError:
            raise CALoadError(f"certificate index {index_path} is missing: restore it from a backup") from None
        except sqlite3.DatabaseError as error:
            raise CALoadError(f"certificate index {index_path} is not a valid CA index: {error}") from None

        return cls(directory, trust_domain, key_type, root, intermediate, intermediate_key, intermediates, index)

    def close(self) -> None:
        self._index.close()

    def __enter__(self) -> CertificateAuthority:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _intermediate_key_path(directory: Path, serial: str) -> Path:
        return directory / INTERMEDIATES_DIR / f"{serial}-key.pem"

    @staticmethod
    def _intermediate_cert_path(directory: Path, serial: str) -> Path:
        return directory / INTERMEDIATES_DIR / f"{serial}.pem"

    @classmethod
    def _write_intermediate(
        cls, directory: Path, certificate: x509.Certificate, key: PrivateKey, created: list[Path]
    ) -> None:
        """Create the key and certificate files of a new intermediate, appending each path to created."""
        serial = certs.serial_hex(certificate.serial_number)
        key_path = cls._intermediate_key_path(directory, serial)
        create_file(key_path, certs.key_to_pem(key), 0o600)
        created.append(key_path)
        cert_path = cls._intermediate_cert_path(directory, serial)
        create_file(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        created.append(cert_path)

    # Certificates

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._root

    @property
    def intermediate_certificate(self) -> x509.Certificate:
        with self._lock:
            return self._intermediate

    @property
    def root_key_online(self) -> bool:
        """Whether the root key is in the CA directory, so that rotate() needs no root key path."""
        return (self.directory / ROOT_KEY_FILE).exists()

    def trust_bundle(self) -> bytes:
        """Return the root certificate as PEM: the one trust anchor peers need.

        Leaves carry their intermediate in their chain, so a retired intermediate need not be in the
        bundle for its leaves to verify.
        """
        return self._root_pem

    def issue(
        self,
        component: str,
        dns_names: list[str],
        lifetime: float = 86400.0,
        instance_id: str | None = None,
    ) -> IssuedCertificate:
        """Issue a leaf with a fresh key for component, valid for lifetime seconds, and record it in the index.

        Raises ValueError for an invalid name or a lifetime outside 5 minutes to 30 days, and CAError
        if the intermediate would expire before the leaf.
        """
        validate_component_name(component)
        names = normalize_dns_names(dns_names)
        if not MIN_LEAF_LIFETIME <= lifetime <= MAX_LEAF_LIFETIME:
            raise ValueError(
                f"certificate lifetime {lifetime:.10g} s is out of range: use {MIN_LEAF_LIFETIME:.0f} s (5 minutes) "
                f"to {MAX_LEAF_LIFETIME:.0f} s (30 days)"
            )
        if instance_id is not None and (not isinstance(instance_id, str) or not instance_id):
            raise ValueError(f"invalid instance id {instance_id!r}: expected a non-empty string or None")

        identity = SpiffeId(self.trust_domain, component)
        now = _utcnow()
        not_before = now - certs.CLOCK_SKEW
        not_after = now + dt.timedelta(seconds=lifetime)
        with self._lock:
            issuer, issuer_key = self._intermediate, self._intermediate_key
        if not_after > issuer.not_valid_after_utc:
            raise CAError(
                f"the intermediate CA certificate expires at {_format_time(issuer.not_valid_after_utc)}, before "
                f"the requested not_after {_format_time(not_after)}: rotate it with `osvm ca rotate`"
            )

        key = certs.generate_key(self.key_type)
        certificate = certs.build_leaf(
            key.public_key(), component, identity.uri, names, not_before, not_after, issuer, issuer_key
        )
        serial = certs.serial_hex(certificate.serial_number)
        cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
        issuer_serial = certs.serial_hex(issuer.serial_number)
        self._index.add(
            serial,
            component,
            instance_id,
            issuer_serial,
            certificate.not_valid_before_utc,
            certificate.not_valid_after_utc,
            cert_pem,
        )
        logger.info(
            "issued certificate serial=%s component=%s instance=%s not_after=%s intermediate=%s",
            serial,
            component,
            instance_id or "-",
            _format_time(certificate.not_valid_after_utc),
            issuer_serial,
        )
        return IssuedCertificate(
            component=component,
            instance_id=instance_id,
            serial=serial,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            identity=identity,
            cert_pem=cert_pem,
            key_pem=certs.key_to_pem(key),
            chain_pem=cert_pem + issuer.public_bytes(serialization.Encoding.PEM),
            ca_pem=self._root_pem,
        )

    def list(self, component: str | None = None) -> list[CertificateRecord]:
        """Return the index records, oldest first, of every issued certificate or of one component's."""
        return self._index.records(component)

    def show(self, serial: str) -> CertificateDetails:
        """Return the record and PEM of one certificate, raising CertificateNotFound for an unknown serial."""
        normalized = _normalize_serial(serial)
        found = self._index.get(normalized)
        if found is None:
            raise CertificateNotFound(
                f"no certificate with serial {normalized} in {self._index.path}: list serials with `osvm ca list`"
            )
        record, cert_pem = found
        return CertificateDetails(record=record, cert_pem=cert_pem)

    # Revocation

    def revoke(self, serial: str, reason: str = "unspecified") -> CertificateRecord:
        """Revoke one certificate, write a new crl.pem, and return its updated record.

        reason is stored as given. An RFC 5280 reason name, such as "keyCompromise" or "superseded",
        also becomes the CRL entry's reason code. Revoking a revoked certificate changes nothing.
        """
        normalized = self.show(serial).record.serial
        reason = reason.strip() or "unspecified"
        now = _utcnow()
        with self._lock:
            changed = self._index.revoke([normalized], now, reason)
            if changed:
                self._write_crl(now)
        record = self.show(normalized).record
        if changed:
            logger.info("revoked certificate serial=%s component=%s reason=%s", normalized, record.component, reason)
        else:
            logger.info(
                "certificate serial=%s was already revoked at %s, so the first revocation stays",
                normalized,
                _format_time(record.revoked_at),
            )
        return record

    def revoke_component(self, name: str, reason: str = "cessationOfOperation") -> list[str]:
        """Revoke every unrevoked, unexpired certificate of component name and return the serials revoked."""
        validate_component_name(name)
        reason = reason.strip() or "unspecified"
        now = _utcnow()
        with self._lock:
            serials = [
                record.serial
                for record in self._index.records(name)
                if not record.revoked and not record.is_expired(now)
            ]
            changed = self._index.revoke(serials, now, reason)
            if changed:
                self._write_crl(now)
        logger.info("revoked %d certificates of component %s: reason=%s serials=%s", len(changed), name, reason, changed)
        return changed

    def crl_pem(self) -> bytes:
        """Return crl.pem, after signing new CRLs if it is missing, stale or from a previous intermediate.

        The file has one PEM CRL per intermediate that still has unexpired leaves, the current
        intermediate's first. Each CRL lists that intermediate's revoked, unexpired serials.
        """
        now = _utcnow()
        path = self.directory / CRL_FILE
        with self._lock:
            try:
                data = path.read_bytes()
                current = x509.load_pem_x509_crl(data)
            except (OSError, ValueError):
                return self._write_crl(now)
            fresh = current.next_update_utc is not None and current.next_update_utc - now > CRL_LIFETIME / 2
            if fresh and current.issuer == self._intermediate.subject:
                return data
            return self._write_crl(now)

    def _write_crl(self, now: dt.datetime) -> bytes:
        """Sign a CRL for each intermediate that still has unexpired leaves and replace crl.pem with them.

        Retired intermediates whose last leaf has expired are removed first, key included.
        """
        self._remove_expired_intermediates(now)
        current_serial = certs.serial_hex(self._intermediate.serial_number)
        signers: list[tuple[str, x509.Certificate, PrivateKey]] = [
            (current_serial, self._intermediate, self._intermediate_key)
        ]
        for serial, certificate in sorted(self._intermediates.items()):
            if serial == current_serial:
                continue
            key_path = self._intermediate_key_path(self.directory, serial)
            try:
                key = certs.key_from_pem(key_path.read_bytes())
            except (OSError, ValueError, TypeError) as error:
                logger.error(
                    "failed to sign the CRL of retired intermediate %s, so %s lacks revocations of its leaves: "
                    "loading key %s failed: %s",
                    serial,
                    self.directory / CRL_FILE,
                    key_path,
                    error,
                )
                continue
            signers.append((serial, certificate, key))

        blocks = []
        for serial, certificate, key in signers:
            revoked = [
                (int(record.serial, 16), record.revoked_at, _crl_reason(record.reason))
                for record in self._index.revoked_unexpired(serial, now)
            ]
            crl = certs.build_crl(certificate, key, revoked, self._index.next_crl_number(), now, now + CRL_LIFETIME)
            blocks.append(crl.public_bytes(serialization.Encoding.PEM))
        data = b"".join(blocks)
        replace_file(self.directory / CRL_FILE, data, 0o644)
        return data

    def _remove_expired_intermediates(self, now: dt.datetime) -> None:
        current_serial = certs.serial_hex(self._intermediate.serial_number)
        for serial in [serial for serial in self._intermediates if serial != current_serial]:
            latest = self._index.latest_not_after(serial)
            if latest is not None and latest >= now:
                continue
            for path in (
                self._intermediate_key_path(self.directory, serial),
                self._intermediate_cert_path(self.directory, serial),
            ):
                path.unlink(missing_ok=True)
            del self._intermediates[serial]
            logger.info(
                "removed retired intermediate %s and its key: its last leaf expired at %s",
                serial,
                _format_time(latest) if latest else "(it issued none)",
            )

    # Rotation

    def rotate(self, root_key: Path | None = None) -> str:
        """Replace the intermediate with a new one signed by the root, and return the new serial.

        The root key comes from root_key if given, else from the CA directory. Raises RootKeyRequired
        when the root key is kept offline and root_key is not given. The old intermediate is retired:
        its leaves stay valid until they expire.
        """
        root_private_key = self._load_root_key(root_key)
        now = _utcnow()
        with self._lock:
            key = certs.generate_key(self.key_type)
            certificate = certs.build_intermediate(key, self._root, root_private_key, self.trust_domain, now)
            serial = certs.serial_hex(certificate.serial_number)
            self._write_intermediate(self.directory, certificate, key, [])
            # Replacing intermediate.pem switches to the new intermediate in one rename. A crash
            # before it leaves only unused files in intermediates/, which the next load() takes
            # for a retired intermediate without leaves and the next CRL write removes.
            replace_file(
                self.directory / INTERMEDIATE_CERT_FILE, certificate.public_bytes(serialization.Encoding.PEM), 0o644
            )
            old_serial = certs.serial_hex(self._intermediate.serial_number)
            self._intermediate = certificate
            self._intermediate_key = key
            self._intermediates[serial] = certificate
            self._write_crl(now)
        logger.info("rotated intermediate: new %s, retired %s until its last leaf expires", serial, old_serial)
        return serial

    def _load_root_key(self, root_key: Path | None) -> PrivateKey:
        if root_key is None:
            online = self.directory / ROOT_KEY_FILE
            if not online.exists():
                raise RootKeyRequired(
                    f"rotating the intermediate needs the root key, which is kept offline (it is not in "
                    f"{self.directory}): pass the key file written by `osvm ca init --root-out` with "
                    "`osvm ca rotate --root-key PATH`"
                )
            root_key = online
        path = Path(root_key)
        try:
            key = certs.key_from_pem(path.read_bytes())
        except FileNotFoundError:
            raise CAError(f"root key {path} is missing: pass the path of the key written by `osvm ca init`") from None
        except OSError as error:
            raise CAError(f"cannot read root key {path}: {error.strerror}") from None
        except (ValueError, TypeError) as error:
            raise CAError(f"root key {path} is not a valid unencrypted PEM key: {error}") from None
        if not _private_key_matches(key, self._root):
            raise CAError(
                f"root key {path} does not match root certificate {self.directory / ROOT_CERT_FILE}: "
                "pass the key written by `osvm ca init` for this CA"
            )
        return key

    # Peer verification

    def verify_peer(
        self,
        certificate: bytes | x509.Certificate | None,
        chain: bytes | Sequence[bytes | x509.Certificate] | None = None,
        now: dt.datetime | None = None,
    ) -> PeerIdentity:
        """Verify a peer's client certificate and return the component it identifies.

        certificate is DER, PEM or parsed. chain is what the peer sent besides it, as PEM bytes or a
        sequence of certificates. The CA's own intermediates are tried as well, because Python's ssl
        module exposes only the peer's leaf. now must be timezone-aware and defaults to the current
        time. Raises PeerRejected with a readable reason.
        """
        now = now if now is not None else dt.datetime.now(dt.timezone.utc)
        if certificate is None or (isinstance(certificate, bytes) and not certificate.strip()):
            raise PeerRejected("no client certificate")
        # Only a DER leaf without a separate chain is cached, which is what endpoints pass.
        cache_key = certificate if isinstance(certificate, bytes) and chain is None and certificate[:1] == b"\x30" else None
        with self._lock:
            cached = self._verified.get(cache_key) if cache_key is not None else None
            if cached is not None:
                self._verified.move_to_end(cache_key)
        if cached is not None:
            leaf, issuer, identity = cached
            self._check_times_and_revocation(leaf, issuer, now)
            return PeerIdentity(
                component=identity.component, identity=identity, serial=certs.serial_hex(leaf.serial_number),
                not_after=leaf.not_valid_after_utc,
            )

        try:
            presented = _parse_presented(certificate)
            if not presented:
                raise ValueError("no certificate found in the PEM data")
            leaf = presented[0]
            candidates = self._parse_chain(chain)
        except ValueError as error:
            raise PeerRejected(f"invalid client certificate: {error}") from None

        issuer = self._find_issuer(leaf, candidates)
        if issuer is None:
            raise PeerRejected(f"not issued by this CA: issuer is {leaf.issuer.rfc4514_string()}")

        serial = self._check_times_and_revocation(leaf, issuer, now)
        self._check_leaf_extensions(leaf)
        identity = self._identity_of(leaf)
        self._validate_path(leaf, issuer, now)
        if cache_key is not None:
            with self._lock:
                self._verified[cache_key] = (leaf, issuer, identity)
                if len(self._verified) > VERIFIED_CACHE_SIZE:
                    self._verified.popitem(last=False)
        return PeerIdentity(component=identity.component, identity=identity, serial=serial, not_after=leaf.not_valid_after_utc)

    def _check_times_and_revocation(self, leaf: x509.Certificate, issuer: x509.Certificate, now: dt.datetime) -> str:
        """Raise PeerRejected when leaf, issuer or the root is outside its validity at now, or leaf is revoked.

        Returns the leaf's serial in hex.
        """
        if now > leaf.not_valid_after_utc:
            raise PeerRejected(f"certificate expired at {_format_time(leaf.not_valid_after_utc)}")
        if now < leaf.not_valid_before_utc:
            raise PeerRejected(f"certificate is not valid before {_format_time(leaf.not_valid_before_utc)}")
        for ca_certificate, role in ((issuer, "intermediate"), (self._root, "root")):
            if not ca_certificate.not_valid_before_utc <= now <= ca_certificate.not_valid_after_utc:
                raise PeerRejected(
                    f"the {role} CA certificate is outside its validity period "
                    f"{_format_time(ca_certificate.not_valid_before_utc)} to "
                    f"{_format_time(ca_certificate.not_valid_after_utc)}"
                )

        serial = certs.serial_hex(leaf.serial_number)
        revocation = self._index.revocation(serial)
        if revocation is not None:
            revoked_at, reason = revocation
            raise PeerRejected(f"certificate revoked at {_format_time(revoked_at)} ({reason})")
        return serial

    @staticmethod
    def _parse_chain(chain: bytes | Sequence[bytes | x509.Certificate] | None) -> list[x509.Certificate]:
        if chain is None:
            return []
        if isinstance(chain, (bytes, x509.Certificate)):
            return _parse_presented(chain)
        parsed: list[x509.Certificate] = []
        for item in chain:
            parsed.extend(_parse_presented(item))
        return parsed

    def _find_issuer(self, leaf: x509.Certificate, presented: list[x509.Certificate]) -> x509.Certificate | None:
        """Return the intermediate, signed by this CA's root, that signed leaf, or None."""
        with self._lock:
            known = list(self._intermediates.values())
        for candidate in [*presented, *known]:
            if candidate.subject != leaf.issuer or not _is_ca_certificate(candidate):
                continue
            if _is_directly_issued_by(leaf, candidate) and _is_directly_issued_by(candidate, self._root):
                return candidate
        return None

    @staticmethod
    def _check_leaf_extensions(leaf: x509.Certificate) -> None:
        try:
            constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is not None and constraints.ca:
            raise PeerRejected("certificate is a CA certificate, not a leaf")
        try:
            usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise PeerRejected("certificate has no extended key usage; clientAuth is required") from None
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise PeerRejected("certificate's extended key usage lacks clientAuth")

    def _identity_of(self, leaf: x509.Certificate) -> SpiffeId:
        try:
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = names.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if len(uris) != 1:
            raise PeerRejected(
                f"certificate has {len(uris)} URI SANs; exactly one spiffe:// identity is required"
            )
        try:
            return parse_spiffe_id(uris[0], self.trust_domain)
        except ValueError as error:
            raise PeerRejected(str(error)) from None

    def _validate_path(self, leaf: x509.Certificate, issuer: x509.Certificate, now: dt.datetime) -> None:
        """Run RFC 5280 path validation with cryptography's verifier, for ECDSA chains.

        The checks above cover signatures, validity, CA flags and EKU. The verifier adds the rest of
        RFC 5280, such as path length and critical extensions it does not know. cryptography 48
        forbids Ed25519 keys in that verifier, so Ed25519 chains rely on the checks above alone.
        """
        if not _HAS_CLIENT_VERIFIER:
            return
        chain = (leaf, issuer, self._root)
        if not all(isinstance(item.public_key(), ec.EllipticCurvePublicKey) for item in chain):
            return
        verifier = PolicyBuilder().store(Store([self._root])).time(now).build_client_verifier()
        try:
            verifier.verify(leaf, [issuer])
        except VerificationError as error:
            raise PeerRejected(f"certificate failed path validation: {error}") from None
