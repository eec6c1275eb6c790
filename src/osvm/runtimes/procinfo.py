"""Facts about host processes read from /proc."""

import os
from pathlib import Path


def start_time(pid: int) -> int | None:
    """Return the start time of a process in clock ticks since boot, or None if it does not exist.

    A pid plus its start time names one process for good, because a reused pid has a later start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces and parentheses, so split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    # Field 22 of stat is starttime; fields[0] here is field 3 (state).
    return int(fields[19])


def is_alive(pid: int, expected_start_time: int | None = None) -> bool:
    """Return True when the process exists, is not a zombie and, if given, has the expected start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return False
    return expected_start_time is None or int(fields[19]) == expected_start_time


def rss_bytes(pid: int) -> int | None:
    """Return the resident set size of a process in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children(pid: int) -> list[int]:
    """Return the pids whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found
