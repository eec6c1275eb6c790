"""The CA's index of issued certificates: a SQLite file that survives restarts of the daemon.

Times are stored as integer Unix seconds, the precision of X.509 validity dates. Serials are
lowercase hexadecimal without leading zeros.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    component TEXT NOT NULL,
    instance_id TEXT,
    issuer_serial TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    revoked_at INTEGER,
    reason TEXT,
    cert_pem TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_by_component ON certificates (component);
CREATE INDEX IF NOT EXISTS certificates_by_issuer ON certificates (issuer_serial, not_after);
"""

_COLUMNS = "serial, component, instance_id, issuer_serial, not_before, not_after, revoked_at, reason"


@dataclass(frozen=True)
class CertificateRecord:
    """One issued leaf certificate as the index stores it."""

    serial: str
    component: str
    instance_id: str | None
    # Serial of the intermediate that signed the certificate.
    issuer_serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None
    reason: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now: dt.datetime) -> bool:
        return now > self.not_after


def _from_timestamp(seconds: int | None) -> dt.datetime | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def _to_timestamp(moment: dt.datetime) -> int:
    return int(moment.timestamp())


def _record(row: tuple) -> CertificateRecord:
    serial, component, instance_id, issuer_serial, not_before, not_after, revoked_at, reason = row
    return CertificateRecord(
        serial=serial,
        component=component,
        instance_id=instance_id,
        issuer_serial=issuer_serial,
        not_before=_from_timestamp(not_before),
        not_after=_from_timestamp(not_after),
        revoked_at=_from_timestamp(revoked_at),
        reason=reason,
    )


class CertificateIndex:
    """The index file, behind one connection that a lock shares between threads.

    Other processes may open the same file: SQLite's file locks keep their writes apart.
    """

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: Path) -> CertificateIndex:
        """Create a new index file with mode 0600, raising FileExistsError if it exists."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        index = cls(path, cls._connect(path))
        with index._lock, index._db:
            index._db.executescript(_SCHEMA)
            index._db.execute("INSERT INTO meta (key, value) VALUES ('crl_number', '0')")
        return index

    @classmethod
    def open(cls, path: Path) -> CertificateIndex:
        """Open an existing index, raising FileNotFoundError or sqlite3.DatabaseError if it is missing or corrupt."""
        if not path.is_file():
            raise FileNotFoundError(path)
        connection = cls._connect(path)
        try:
            connection.execute(f"SELECT {_COLUMNS} FROM certificates LIMIT 1").fetchall()
            connection.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone()
        except sqlite3.DatabaseError:
            connection.close()
            raise
        return cls(path, connection)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        # Each write transaction takes the write lock at BEGIN, so the read-then-update of the CRL
        # number cannot interleave with another process.
        connection = sqlite3.connect(path, timeout=10.0, check_same_thread=False, isolation_level="IMMEDIATE")
        # WAL makes a commit one fsync; synchronous=FULL keeps each committed issue across a power loss.
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
        return connection

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(
        self,
        serial: str,
        component: str,
        instance_id: str | None,
        issuer_serial: str,
        not_before: dt.datetime,
        not_after: dt.datetime,
        cert_pem: bytes,
    ) -> None:
        with self._lock, self._db:
            self._db.execute(
                f"INSERT INTO certificates ({_COLUMNS}, cert_pem) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?)",
                (
                    serial,
                    component,
                    instance_id,
                    issuer_serial,
                    _to_timestamp(not_before),
                    _to_timestamp(not_after),
                    cert_pem.decode("ascii"),
                ),
            )

    def get(self, serial: str) -> tuple[CertificateRecord, bytes] | None:
        """Return the record and PEM certificate of serial, or None if the index has no such serial."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS}, cert_pem FROM certificates WHERE serial = ?", (serial,)).fetchone()
        if row is None:
            return None
        return _record(row[:-1]), row[-1].encode("ascii")

    def revocation(self, serial: str) -> tuple[dt.datetime, str | None] | None:
        """Return (revoked_at, reason) if serial is revoked, else None."""
        with self._lock:
            row = self._db.execute(
                "SELECT revoked_at, reason FROM certificates WHERE serial = ? AND revoked_at IS NOT NULL", (serial,)
            ).fetchone()
        if row is None:
            return None
        return _from_timestamp(row[0]), row[1]

    def records(self, component: str | None = None) -> list[CertificateRecord]:
        """Return the records, oldest first, of every certificate or of one component's."""
        query = f"SELECT {_COLUMNS} FROM certificates"
        parameters: tuple = ()
        if component is not None:
            query += " WHERE component = ?"
            parameters = (component,)
        query += " ORDER BY not_before, serial"
        with self._lock:
            rows = self._db.execute(query, parameters).fetchall()
        return [_record(row) for row in rows]

    def revoke(self, serials: list[str], revoked_at: dt.datetime, reason: str) -> list[str]:
        """Mark the serials revoked unless they already are; return the serials that changed."""
        changed: list[str] = []
        with self._lock, self._db:
            for serial in serials:
                cursor = self._db.execute(
                    "UPDATE certificates SET revoked_at = ?, reason = ? WHERE serial = ? AND revoked_at IS NULL",
                    (_to_timestamp(revoked_at), reason, serial),
                )
                if cursor.rowcount:
                    changed.append(serial)
        return changed

    def revoked_unexpired(self, issuer_serial: str, now: dt.datetime) -> list[CertificateRecord]:
        """Return the revoked certificates of one intermediate that have not expired at now."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM certificates WHERE issuer_serial = ? AND revoked_at IS NOT NULL "
                "AND not_after >= ? ORDER BY revoked_at, serial",
                (issuer_serial, _to_timestamp(now)),
            ).fetchall()
        return [_record(row) for row in rows]

    def latest_not_after(self, issuer_serial: str) -> dt.datetime | None:
        """Return the latest not_after among the certificates of one intermediate, or None if it issued none."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(not_after) FROM certificates WHERE issuer_serial = ?", (issuer_serial,)
            ).fetchone()
        return _from_timestamp(row[0])

    def next_crl_number(self) -> int:
        """Increment and return the CRL number. Consumers take the CRL with the higher number as the newer one."""
        with self._lock, self._db:
            self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'crl_number'")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone()
        return int(row[0])
