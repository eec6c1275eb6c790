"""Root filesystems of kind "debian", made with debootstrap from the host's own apt mirror.

The mirror and suite come from the host's apt sources (/etc/apt/sources.list and the .list and
deb822 .sources files under /etc/apt/sources.list.d), so images use the mirror the host already
uses and no host name is written into osvm.
"""

import logging
import re
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger("osvm.images")

APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
# debootstrap on a 2-core machine with a nearby mirror takes about 1 to 3 minutes; this bounds a stuck one.
DEBOOTSTRAP_TIMEOUT = 1800


class DebianError(Exception):
    """debootstrap could not run or failed; the message explains the fix."""


def debian_source(sources: Path = APT_SOURCES, sources_dir: Path = APT_SOURCES_DIR) -> dict[str, str]:
    """Return {"mirror": URL, "suite": name} of the first Debian entry in the host's apt sources.

    Entries whose suite ends in -updates, -security or -backports are skipped, since debootstrap
    needs a release suite. Raises DebianError when no entry is found.
    """
    for mirror, suite in _apt_entries(sources, sources_dir):
        if "debian" not in mirror or re.search(r"-(updates|security|backports)$", suite):
            continue
        return {"mirror": mirror, "suite": suite}
    raise DebianError(
        f"no Debian release entry in {sources} or {sources_dir}: add a line such as "
        f"`deb URL bookworm main` to use image kind \"debian\""
    )


def debootstrap(packages: list[str], target: Path) -> None:
    """Install a minimal Debian (variant minbase) plus packages into target, which must be empty.

    Needs root and the debootstrap program. Raises DebianError with the end of debootstrap's log
    when it fails.
    """
    if shutil.which("debootstrap") is None:
        raise DebianError("image kind \"debian\" needs debootstrap: install the Debian package debootstrap")
    source = debian_source()
    argv = ["debootstrap", "--variant=minbase"]
    if packages:
        argv.append("--include=" + ",".join(packages))
    argv += [source["suite"], str(target), source["mirror"]]
    logger.info("running %s", " ".join(argv))
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise DebianError(f"debootstrap did not finish within {DEBOOTSTRAP_TIMEOUT} s") from None
    if result.returncode != 0:
        log = target / "debootstrap" / "debootstrap.log"
        detail = log.read_text(errors="replace") if log.exists() else result.stderr
        tail = "\n".join(detail.strip().splitlines()[-10:])
        raise DebianError(f"debootstrap exited with status {result.returncode}:\n{tail}")
    # apt's package lists and downloaded .debs are not needed in the guest.
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        directory = target / leftover
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.is_file():
                    entry.unlink()


def _apt_entries(sources: Path, sources_dir: Path) -> list[tuple[str, str]]:
    entries: list[tuple[str, str]] = []
    files = [sources] + (sorted(sources_dir.glob("*.list")) + sorted(sources_dir.glob("*.sources")) if sources_dir.is_dir() else [])
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            entries += _deb822_entries(text)
        else:
            entries += _one_line_entries(text)
    return entries


def _one_line_entries(text: str) -> list[tuple[str, str]]:
    entries = []
    for line in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] == "deb":
            entries.append((line[1], line[2]))
    return entries


def _deb822_entries(text: str) -> list[tuple[str, str]]:
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                entries.append((uri, suite))
    return entries
