"""Deliver an issued certificate to an instance, and schedule its renewal."""

from __future__ import annotations

import datetime as dt
import os
import random
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from osvm.security.files import replace_file

if TYPE_CHECKING:
    from osvm.security.ca import IssuedCertificate

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CA_FILE = "ca.pem"

# Renewal starts at this fraction of the lifetime, so that a failed renewal has a third of the
# lifetime left for retries before the certificate expires.
RENEWAL_POINT = 2 / 3
# Each renewal moves by up to this fraction of the lifetime either way, so that certificates
# issued together are not all renewed at once.
RENEWAL_JITTER = 0.05


def renewal_delay(
    not_before: dt.datetime,
    not_after: dt.datetime,
    rng: random.Random,
    now: dt.datetime | None = None,
) -> float:
    """Return the seconds from now until renewal: two-thirds into the lifetime, ±5% of it, and never negative.

    All times must be timezone-aware. Raises ValueError if not_after is not after not_before.
    """
    lifetime = (not_after - not_before).total_seconds()
    if lifetime <= 0:
        raise ValueError(f"not_after {not_after.isoformat()} is not after not_before {not_before.isoformat()}")
    now = now if now is not None else dt.datetime.now(dt.timezone.utc)
    offset = lifetime * (RENEWAL_POINT + rng.uniform(-RENEWAL_JITTER, RENEWAL_JITTER))
    renew_at = not_before + dt.timedelta(seconds=offset)
    return max(0.0, (renew_at - now).total_seconds())


def write_instance_files(directory: Path, issued: IssuedCertificate, uid: int, gid: int) -> dict[str, str]:
    """Write an instance's cert.pem (leaf and intermediate), key.pem and ca.pem, owned by uid:gid.

    directory is created if missing, and set to mode 0700 and owner uid:gid. Its parent must exist.
    Each file is replaced atomically, so a reader sees the old file or the new one, never a part.
    Returns the environment variables that point the instance at the files.
    """
    directory = Path(directory).absolute()
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        # The instance user owns the directory, so it could have put a symlink here to make the
        # daemon write elsewhere.
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            raise NotADirectoryError(f"TLS directory {directory} exists but is not a directory: remove it") from None
    os.chown(directory, uid, gid, follow_symlinks=False)
    os.chmod(directory, 0o700, follow_symlinks=False)

    cert_path = directory / CERT_FILE
    key_path = directory / KEY_FILE
    ca_path = directory / CA_FILE
    # NOTE: the three renames are separate, so a reader that opens key.pem and cert.pem between the
    # last two can see a new key with the old certificate. Instances should reload on the signal
    # sent after this returns, not on a file change.
    replace_file(ca_path, issued.ca_pem, 0o644, uid, gid)
    replace_file(key_path, issued.key_pem, 0o600, uid, gid)
    replace_file(cert_path, issued.chain_pem, 0o644, uid, gid)
    return {
        "OSVM_TLS_CERT": str(cert_path),
        "OSVM_TLS_KEY": str(key_path),
        "OSVM_TLS_CA": str(ca_path),
    }
