"""The guest kernel and its modules, taken from Debian's packages without installing them.

The kernel package (linux-image-<abi>-amd64) and busybox-static are fetched with
`apt-get download` and unpacked with `dpkg-deb -x` into the image cache, so the host's own kernel
and packages stay untouched. The compressed vmlinuz is turned into the ELF vmlinux that QEMU's
microvm machine boots directly through its PVH entry point, which is faster than booting vmlinuz.
"""

import logging
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("osvm.images")

# The metapackage whose dependency names the current kernel package of the Debian release.
KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# Modules that the guest needs. Debian builds these drivers as modules, so the initramfs loads them.
# virtio_mmio finds microvm's devices through ACPI; button and evdev deliver the ACPI power button.
BASE_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng", "button", "evdev")
# Modules that mount an ext4 root filesystem. ext4 declares crc32c as a soft dependency only.
EXT4_MODULES = ("crc32c_generic", "ext4")

# Compression magics searched for in vmlinuz, as in the kernel's scripts/extract-vmlinux.
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b\x08"
_ELF_MAGIC = b"\x7fELF"


class KernelError(Exception):
    """The kernel or a guest package could not be fetched or unpacked; the message explains the fix."""


@dataclass(frozen=True)
class GuestKernel:
    """An unpacked kernel package: its ELF vmlinux and its module tree."""

    package: str
    version: str
    release: str
    vmlinux: Path
    modules_dir: Path

    def modules_for(self, names: tuple[str, ...]) -> list[Path]:
        """Return the module files needed to load `names`, dependencies first.

        Raises KernelError when a module or one of its dependencies is not in the package.
        """
        index = _index_modules(self.modules_dir)
        ordered: list[str] = []
        visiting: set[str] = set()

        def visit(name: str, needed_by: str | None) -> None:
            if name in ordered:
                return
            if name in visiting:
                raise KernelError(f"module dependency cycle through {name} in kernel {self.release}")
            path = index.get(name)
            if path is None:
                built_in = _builtin_modules(self.modules_dir)
                if name in built_in:
                    return
                requirer = f" (needed by {needed_by})" if needed_by else ""
                raise KernelError(f"kernel module {name}{requirer} is missing from {self.package} {self.version}")
            visiting.add(name)
            for dependency in module_dependencies(path):
                visit(dependency, name)
            visiting.discard(name)
            ordered.append(name)

        for name in names:
            visit(name, None)
        return [index[name] for name in ordered]


def fetch_kernel(cache_dir: Path, package: str | None = None) -> GuestKernel:
    """Return the guest kernel, downloading and unpacking it into cache_dir/kernels on first use.

    `package` names a kernel package such as linux-image-6.1.0-57-amd64; by default it is the one
    that linux-image-amd64 depends on. A kernel already in the cache is used without asking apt,
    so builds work offline once the cache is filled.
    Raises KernelError when apt cannot find or download the package.
    """
    kernels_dir = cache_dir / "kernels"
    if package is None:
        cached = _cached_kernels(kernels_dir)
        package = cached[-1] if cached else resolve_kernel_package()
    target = kernels_dir / package
    vmlinux = target / "vmlinux"
    if not vmlinux.exists():
        unpack_dir = unpack_package(package, cache_dir)
        release = _release_of(unpack_dir)
        vmlinuz = unpack_dir / "boot" / f"vmlinuz-{release}"
        staged = Path(tempfile.mkdtemp(prefix=".staging-", dir=kernels_dir))
        try:
            (staged / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
            (staged / "release").write_text(release + "\n")
            (staged / "version").write_text(_deb_version(unpack_dir) + "\n")
            shutil.move(str(unpack_dir / "lib" / "modules" / release), staged / "modules")
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(unpack_dir, ignore_errors=True)
        logger.info("unpacked guest kernel %s into %s", package, target)
    return GuestKernel(
        package=package,
        version=(target / "version").read_text().strip(),
        release=(target / "release").read_text().strip(),
        vmlinux=vmlinux,
        modules_dir=target / "modules",
    )


def fetch_busybox(cache_dir: Path) -> Path:
    """Return the path of a static busybox from Debian's busybox-static, fetched on first use."""
    target = cache_dir / "tools" / "busybox"
    if target.exists():
        return target
    unpack_dir = unpack_package(BUSYBOX_PACKAGE, cache_dir)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_suffix(".partial")
        shutil.copy2(unpack_dir / "bin" / "busybox", staged)
        staged.rename(target)
    finally:
        shutil.rmtree(unpack_dir, ignore_errors=True)
    return target


def resolve_kernel_package() -> str:
    """Return the kernel package that linux-image-amd64 depends on, read from apt's package lists.

    Raises KernelError when apt does not know linux-image-amd64, usually because `apt-get update`
    has not run yet.
    """
    result = _run(["apt-cache", "depends", KERNEL_METAPACKAGE], "look up the guest kernel package")
    for line in result.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise KernelError(
        f"apt-cache depends {KERNEL_METAPACKAGE} lists no kernel package: run `apt-get update`, "
        f"or name a kernel package such as linux-image-6.1.0-57-amd64"
    )


def unpack_package(package: str, cache_dir: Path) -> Path:
    """Download a Debian package with apt-get download and unpack it into a new temporary directory.

    The .deb stays in cache_dir/downloads. The caller removes the returned directory.
    """
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    debs = _debs_of(downloads, package)
    if not debs:
        _run(["apt-get", "download", package], f"download {package}", cwd=downloads)
        debs = _debs_of(downloads, package)
        if not debs:
            raise KernelError(f"apt-get download {package} finished but left no .deb in {downloads}")
    unpack_dir = Path(tempfile.mkdtemp(prefix=f".unpack-{package}-", dir=cache_dir))
    try:
        _run(["dpkg-deb", "-x", str(debs[-1]), str(unpack_dir)], f"unpack {debs[-1].name}")
    except KernelError:
        shutil.rmtree(unpack_dir, ignore_errors=True)
        raise
    (unpack_dir / ".deb-name").write_text(debs[-1].name)
    return unpack_dir


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """Return the ELF kernel image inside a compressed vmlinuz (bzImage).

    Like the kernel's scripts/extract-vmlinux, this tries every offset where a compression magic
    occurs and keeps the first that decompresses to an ELF file. xz and gzip use the standard
    library; zstd needs the `zstd` program (Debian package zstd).
    Raises KernelError when no offset yields an ELF image.
    """
    if vmlinuz.startswith(_ELF_MAGIC):
        return vmlinuz
    for magic, decompress in ((_XZ_MAGIC, _unxz), (_ZSTD_MAGIC, _unzstd), (_GZIP_MAGIC, _gunzip)):
        offset = vmlinuz.find(magic)
        while offset != -1:
            try:
                image = decompress(vmlinuz[offset:])
            except (lzma.LZMAError, zlib.error, EOFError, KernelError):
                image = b""
            if image.startswith(_ELF_MAGIC):
                return image
            offset = vmlinuz.find(magic, offset + 1)
    raise KernelError("no xz, zstd or gzip stream in the kernel image decompresses to an ELF vmlinux")


def module_dependencies(path: Path) -> list[str]:
    """Return the `depends=` names from a module's .modinfo section."""
    for entry in read_modinfo(path):
        if entry.startswith("depends="):
            return [name.replace("-", "_") for name in entry[len("depends="):].split(",") if name]
    return []


def read_modinfo(path: Path) -> list[str]:
    """Return the key=value strings of a kernel module's .modinfo ELF section.

    Compressed modules (.ko.xz, .ko.gz, .ko.zst) are decompressed first.
    """
    data = read_module(path)
    section = _elf_section(data, ".modinfo")
    return [entry.decode(errors="replace") for entry in section.split(b"\0") if entry]


def read_module(path: Path) -> bytes:
    """Return the bytes of a kernel module file, decompressed when its name ends in .xz, .gz or .zst."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if path.name.endswith(".zst"):
        return _unzstd(data)
    return data


def module_name(path: Path) -> str:
    """Return the kernel's name for a module file: its base name without suffixes, with _ for -."""
    return path.name.split(".ko")[0].replace("-", "_")


# --- private helpers ---------------------------------------------------------------------------


def _elf_section(data: bytes, wanted: str) -> bytes:
    """Return the contents of a named section of a 64-bit little-endian ELF file, or b"" if absent."""
    if not data.startswith(_ELF_MAGIC) or data[4] != 2 or data[5] != 1:
        raise KernelError("kernel module is not a 64-bit little-endian ELF file")
    section_offset = int.from_bytes(data[0x28:0x30], "little")
    entry_size = int.from_bytes(data[0x3A:0x3C], "little")
    count = int.from_bytes(data[0x3C:0x3E], "little")
    names_index = int.from_bytes(data[0x3E:0x40], "little")

    def header(index: int) -> tuple[int, int, int]:
        base = section_offset + index * entry_size
        name = int.from_bytes(data[base:base + 4], "little")
        offset = int.from_bytes(data[base + 0x18:base + 0x20], "little")
        size = int.from_bytes(data[base + 0x20:base + 0x28], "little")
        return name, offset, size

    _, names_offset, _ = header(names_index)
    for index in range(count):
        name, offset, size = header(index)
        end = data.index(b"\0", names_offset + name)
        if data[names_offset + name:end].decode() == wanted:
            return data[offset:offset + size]
    return b""


def _index_modules(modules_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in sorted((modules_dir / "kernel").rglob("*.ko*")):
        index.setdefault(module_name(path), path)
    return index


def _builtin_modules(modules_dir: Path) -> set[str]:
    builtin = modules_dir / "modules.builtin"
    if not builtin.exists():
        return set()
    return {module_name(Path(line.strip())) for line in builtin.read_text().splitlines() if line.strip()}


def _cached_kernels(kernels_dir: Path) -> list[str]:
    if not kernels_dir.is_dir():
        kernels_dir.mkdir(parents=True, exist_ok=True)
        return []
    names = [entry.name for entry in kernels_dir.iterdir() if (entry / "vmlinux").exists()]
    return sorted(names, key=_natural_key)


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _release_of(unpack_dir: Path) -> str:
    releases = sorted(path.name for path in (unpack_dir / "lib" / "modules").iterdir())
    if len(releases) != 1:
        raise KernelError(f"expected one kernel release under lib/modules of the package, found {releases}")
    return releases[0]


def _deb_version(unpack_dir: Path) -> str:
    # apt-get download names files package_version_arch.deb, with ':' in the version escaped as %3a.
    name = (unpack_dir / ".deb-name").read_text()
    return name.split("_")[1].replace("%3a", ":")


def _debs_of(downloads: Path, package: str) -> list[Path]:
    return sorted(downloads.glob(f"{package}_*.deb"), key=lambda path: _natural_key(path.name))


def _unxz(data: bytes) -> bytes:
    # A decompressor object stops at the end of the first stream and ignores the bytes after it.
    return lzma.LZMADecompressor().decompress(data)


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _unzstd(data: bytes) -> bytes:
    if shutil.which("zstd") is None:
        raise KernelError("the kernel or a module is zstd-compressed: install the Debian package zstd")
    result = subprocess.run(["zstd", "-d", "-c", "-q"], input=data, capture_output=True)
    if result.returncode != 0 and not result.stdout:
        raise KernelError(f"zstd -d failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def _run(argv: list[str], action: str, cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise KernelError(f"cannot {action}: {argv[0]} is not on PATH (it comes with Debian's apt and dpkg)")
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise KernelError(
            f"cannot {action}: `{' '.join(argv)}` exited with status {result.returncode}: "
            f"{detail[-1] if detail else 'no output'}. Run `apt-get update` if the package is unknown"
        )
    return result.stdout
