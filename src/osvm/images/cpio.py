"""A writer of cpio archives in the "newc" format that the Linux kernel unpacks as an initramfs.

Every entry is owned by root with mtime 0, so the same tree always gives the same archive. The
format is described in the kernel's Documentation/driver-api/early-userspace/buffer-format.rst.
"""

import os
import stat
from pathlib import Path
from typing import BinaryIO

_TRAILER = "TRAILER!!!"
_COPY_CHUNK = 1 << 20


class CpioWriter:
    """Appends entries to a binary stream; call finish() once to write the trailer."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.next_inode = 1
        self.names: set[str] = set()

    def add_directory(self, name: str, mode: int = 0o755) -> None:
        self._header(name, stat.S_IFDIR | mode, 0, nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._header(name, stat.S_IFREG | mode, len(data))
        self.stream.write(data)
        self._pad(len(data))

    def add_file_from(self, name: str, source: Path, mode: int | None = None) -> None:
        size = source.stat().st_size
        if mode is None:
            mode = stat.S_IMODE(source.stat().st_mode)
        self._header(name, stat.S_IFREG | mode, size)
        written = 0
        with open(source, "rb") as handle:
            while chunk := handle.read(_COPY_CHUNK):
                self.stream.write(chunk)
                written += len(chunk)
        if written != size:
            raise OSError(f"{source} changed size while it was archived ({size} -> {written} bytes)")
        self._pad(size)

    def add_symlink(self, name: str, target: str) -> None:
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data))
        self.stream.write(data)
        self._pad(len(data))

    def add_device(self, name: str, kind: int, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a device node; kind is stat.S_IFCHR or stat.S_IFBLK."""
        self._header(name, kind | mode, 0, rdev=(major, minor))

    def add_tree(self, source: Path, prefix: str = "") -> None:
        """Add a directory tree with its modes, symlinks and regular files; other file types are skipped.

        Entries already added under the same name are left as they are, so callers can add their
        own files first.
        """
        for directory, subdirectories, files in os.walk(source):
            subdirectories.sort()
            relative = os.path.relpath(directory, source)
            base = prefix if relative == "." else _join(prefix, relative)
            if base and base not in self.names:
                self.add_directory(base, stat.S_IMODE(os.lstat(directory).st_mode))
            for entry in sorted(files) + [name for name in subdirectories if os.path.islink(os.path.join(directory, name))]:
                path = Path(directory) / entry
                name = _join(base, entry)
                if name in self.names:
                    continue
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    self.add_symlink(name, os.readlink(path))
                elif stat.S_ISREG(info.st_mode):
                    self.add_file_from(name, path, stat.S_IMODE(info.st_mode))

    def finish(self) -> None:
        self._header(_TRAILER, 0, 0, nlink=1)
        self.stream.flush()

    def _header(self, name: str, mode: int, size: int, nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name != _TRAILER:
            self.names.add(name)
        encoded = name.encode() + b"\0"
        fields = (
            self.next_inode, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )
        self.next_inode += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self.stream.write(header + encoded)
        self._pad(len(header) + len(encoded))

    def _pad(self, length: int) -> None:
        self.stream.write(b"\0" * (-length % 4))


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if base else name
