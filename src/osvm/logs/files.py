"""Per-instance output files: rotation, a time index for --since, and reading.

An instance writes its stdout and stderr straight to `output.log` (opened with O_APPEND), so it keeps
writing while the daemon restarts. The daemon rotates the file by copy-and-truncate and keeps a small
index of (time, size) samples beside it, which maps `--since` to a byte offset.
"""

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable

logger = logging.getLogger("osvm.logs")

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP = 3
# How often sizes are sampled; --since is exact to about this many seconds.
SAMPLE_INTERVAL = 1.0
FOLLOW_INTERVAL = 0.25
INDEX_SUFFIX = ".idx"


class LogRotator:
    """Sample the size of each live instance's output file, index it, and rotate it when too large."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP):
        self.max_bytes = max_bytes
        self.keep = keep
        self._sizes: dict[Path, int] = {}

    async def run(self, live_log_paths: Callable[[], Iterable[Path]]) -> None:
        while True:
            for path in list(live_log_paths()):
                try:
                    self.sample(path)
                except OSError as error:
                    logger.warning("cannot sample or rotate %s: %s", path, error)
            await asyncio.sleep(SAMPLE_INTERVAL)

    def sample(self, path: Path, now: float | None = None) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        if self._sizes.get(path) == size:
            return
        self._sizes[path] = size
        with open(str(path) + INDEX_SUFFIX, "a") as index:
            index.write(f"{now or time.time():.3f} {size}\n")
        if size > self.max_bytes:
            self.rotate(path)

    def rotate(self, path: Path) -> None:
        """Shift output.log.N to N+1, copy output.log to .1, then truncate it in place."""
        for number in range(self.keep - 1, 0, -1):
            older = Path(f"{path}.{number}")
            if older.exists():
                older.replace(f"{path}.{number + 1}")
                _move_if_exists(Path(f"{older}{INDEX_SUFFIX}"), Path(f"{path}.{number + 1}{INDEX_SUFFIX}"))
        # NOTE: lines the instance writes between the copy and the truncate are lost; the window is
        # one copy of at most max_bytes.
        shutil.copyfile(path, f"{path}.1")
        _move_if_exists(Path(f"{path}{INDEX_SUFFIX}"), Path(f"{path}.1{INDEX_SUFFIX}"))
        with open(path, "r+b") as output:
            output.truncate(0)
        self._sizes[path] = 0
        with open(str(path) + INDEX_SUFFIX, "a") as index:
            index.write(f"{time.time():.3f} 0\n")
        logger.info("rotated %s", path)


def log_files(path: Path, keep: int = DEFAULT_KEEP) -> list[Path]:
    """Return the rotated files then the live one, oldest first."""
    files = [Path(f"{path}.{number}") for number in range(keep + 1, 0, -1)]
    files = [file for file in files if file.exists()]
    if path.exists():
        files.append(path)
    return files


def read_logs(path: Path, since: float | None = None, tail: int | None = None) -> tuple[bytes, int]:
    """Return the output written since `since` (a Unix time), or the last `tail` lines, and the live file's size."""
    chunks: list[bytes] = []
    for file in log_files(path):
        offset = _offset_since(file, since) if since is not None else 0
        if offset is None:
            continue
        with open(file, "rb") as handle:
            handle.seek(offset)
            chunks.append(handle.read())
    data = b"".join(chunks)
    if tail is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail:]) if tail > 0 else b""
    size = path.stat().st_size if path.exists() else 0
    return data, size


async def follow_log(path: Path, offset: int) -> AsyncIterator[bytes]:
    """Yield what is appended to `path` after `offset`, until cancelled; a truncation restarts at 0."""
    while True:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < offset:
            offset = 0
        if size > offset:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(size - offset)
            offset += len(data)
            yield data
        await asyncio.sleep(FOLLOW_INTERVAL)


def _offset_since(file: Path, since: float) -> int | None:
    """Map a time to an offset in `file` with its index; None when the whole file is older."""
    samples = _read_index(Path(f"{file}{INDEX_SUFFIX}"))
    if not samples:
        mtime = file.stat().st_mtime
        return 0 if mtime >= since else None
    start = 0
    for moment, size in samples:
        if moment < since:
            start = size
        else:
            break
    size = file.stat().st_size
    if start >= size:
        return None
    return _next_line_start(file, start)


def _read_index(path: Path) -> list[tuple[float, int]]:
    samples = []
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                samples.append((float(parts[0]), int(parts[1])))
    except FileNotFoundError:
        return []
    return samples


def _next_line_start(file: Path, offset: int) -> int:
    if offset == 0:
        return 0
    with open(file, "rb") as handle:
        handle.seek(offset - 1)
        if handle.read(1) == b"\n":
            return offset
        rest = handle.readline()
        return offset + len(rest)


def _move_if_exists(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except FileNotFoundError:
        pass
