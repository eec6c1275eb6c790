"""Tests of guest image building: cpio, vmlinux extraction, module dependencies, the image cache."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import secrets
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from osvm.config.models import ImageSpec
from osvm.images import ImageError, build_image, find_image, list_images, remove_image
from osvm.images.cpio import CpioWriter
from osvm.images.debian import DebianError, _deb822_entries, _one_line_entries, debian_source
from osvm.images.kernel import (
    BASE_MODULES,
    EXT4_MODULES,
    KernelError,
    extract_vmlinux,
    fetch_kernel,
    module_dependencies,
    module_name,
)
from test_microvm_support import IMAGE_CACHE, compile_server, require_image_tools


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image cache whose kernels, agents and downloads are shared with other test runs."""
    require_image_tools()
    try:
        fetch_kernel(IMAGE_CACHE)
    except KernelError as error:
        pytest.skip(f"the guest kernel package cannot be fetched: {error}")
    cache = tmp_path_factory.mktemp("images")
    for shared in ("kernels", "downloads", "tools", "agents"):
        if (IMAGE_CACHE / shared).exists():
            os.symlink(IMAGE_CACHE / shared, cache / shared)
    return cache


# --- cpio ----------------------------------------------------------------------------------------


def test_cpio_archive_extracts_with_cpio(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("needs the cpio program (Debian package cpio)")
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "bin" / "tool").chmod(0o755)
    (tree / "bin" / "link").symlink_to("tool")
    (tree / "odd").write_bytes(b"x" * 5)
    buffer = io.BytesIO()
    writer = CpioWriter(buffer)
    writer.add_directory("etc")
    writer.add_file("etc/hostname", b"guest\n")
    writer.add_tree(tree)
    writer.finish()

    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(["cpio", "-idm", "--quiet"], input=buffer.getvalue(), cwd=out, capture_output=True)
    assert result.returncode == 0, result.stderr
    assert (out / "etc" / "hostname").read_bytes() == b"guest\n"
    assert (out / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "bin" / "tool").stat().st_mode) == 0o755
    assert os.readlink(out / "bin" / "link") == "tool"
    assert (out / "odd").read_bytes() == b"x" * 5


def test_cpio_lists_device_node(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("needs the cpio program (Debian package cpio)")
    buffer = io.BytesIO()
    writer = CpioWriter(buffer)
    writer.add_device("dev/console", stat.S_IFCHR, 5, 1)
    writer.finish()
    listing = subprocess.run(["cpio", "-tv", "--quiet"], input=buffer.getvalue(), capture_output=True).stdout.decode()
    assert listing.startswith("crw-------")
    assert "5,   1" in listing or "5, 1" in listing
    assert "dev/console" in listing


def test_cpio_same_tree_same_bytes(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("one")
    archives = []
    for _ in range(2):
        buffer = io.BytesIO()
        writer = CpioWriter(buffer)
        writer.add_tree(tmp_path)
        writer.finish()
        archives.append(buffer.getvalue())
    assert archives[0] == archives[1]


# --- vmlinux and modules -----------------------------------------------------------------------


def test_extract_vmlinux_from_xz() -> None:
    elf = b"\x7fELF" + secrets.token_bytes(1000)
    image = b"MZ boot sector" + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"trailing"
    assert extract_vmlinux(image) == elf


def test_extract_vmlinux_from_gzip() -> None:
    elf = b"\x7fELF" + b"kernel" * 100
    image = b"setup code" + gzip.compress(elf) + b"\0" * 16
    assert extract_vmlinux(image) == elf


def test_extract_vmlinux_skips_false_magic() -> None:
    elf = b"\x7fELF" + b"k" * 64
    # A stray xz magic that is not a valid stream comes before the real one.
    image = b"\xfd7zXZ\x00garbage" + lzma.compress(elf, format=lzma.FORMAT_XZ)
    assert extract_vmlinux(image) == elf


def test_extract_vmlinux_without_stream_raises() -> None:
    with pytest.raises(KernelError, match="no xz, zstd or gzip stream"):
        extract_vmlinux(b"not a kernel at all")


def test_kernel_is_elf(kernel_cache: Path) -> None:
    kernel = fetch_kernel(kernel_cache)
    with open(kernel.vmlinux, "rb") as handle:
        assert handle.read(4) == b"\x7fELF"


def test_module_dependencies_from_modinfo(kernel_cache: Path) -> None:
    kernel = fetch_kernel(kernel_cache)
    virtio_net = next(path for path in kernel.modules_for(("virtio_net",)) if module_name(path) == "virtio_net")
    assert set(module_dependencies(virtio_net)) >= {"net_failover", "virtio", "virtio_ring"}


def test_modules_ordered_dependencies_first(kernel_cache: Path) -> None:
    kernel = fetch_kernel(kernel_cache)
    names = [module_name(path) for path in kernel.modules_for(BASE_MODULES + EXT4_MODULES)]
    for module in BASE_MODULES + EXT4_MODULES:
        assert module in names
    assert names.index("virtio_ring") < names.index("virtio") < names.index("virtio_mmio")
    assert names.index("jbd2") < names.index("ext4")
    assert len(names) == len(set(names))


def test_missing_module_raises(kernel_cache: Path) -> None:
    kernel = fetch_kernel(kernel_cache)
    with pytest.raises(KernelError, match="no_such_module"):
        kernel.modules_for(("no_such_module",))


# --- apt sources -------------------------------------------------------------------------------


def test_deb822_sources_parsed() -> None:
    text = (
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb-src\nURIs: http://mirror.example/debian\nSuites: bookworm\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: trixie\n"
    )
    assert _deb822_entries(text) == [
        ("http://mirror.example/debian", "bookworm"),
        ("http://mirror.example/debian", "bookworm-updates"),
    ]


def test_one_line_sources_parsed() -> None:
    text = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\ndeb-src http://x bookworm main\n"
    assert _one_line_entries(text) == [("http://mirror.example/debian", "bookworm")]


def test_debian_source_skips_update_suites(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text("deb http://mirror.example/debian-security bookworm-security main\n"
                       "deb http://mirror.example/debian bookworm main\n")
    assert debian_source(sources, tmp_path / "none") == {"mirror": "http://mirror.example/debian", "suite": "bookworm"}


def test_debian_source_missing_raises(tmp_path: Path) -> None:
    with pytest.raises(DebianError, match="no Debian release entry"):
        debian_source(tmp_path / "none", tmp_path / "none.d")


# --- building and caching ----------------------------------------------------------------------


def test_binary_image_built_then_cached(kernel_cache: Path, tmp_path: Path) -> None:
    binary = compile_server(tmp_path, extra_bytes=secrets.token_bytes(16))
    spec = ImageSpec(kind="binary", path=str(binary))

    image = build_image(spec, tmp_path, kernel_cache)
    assert image.directory == kernel_cache / image.digest
    assert image.kernel.exists()
    assert image.initrd.exists()
    assert image.rootfs is None
    initrd_mtime = image.initrd.stat().st_mtime_ns

    started = time.monotonic()
    again = build_image(spec, tmp_path, kernel_cache)
    assert again.digest == image.digest
    assert again.initrd.stat().st_mtime_ns == initrd_mtime
    assert time.monotonic() - started < 5.0

    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=gzip.decompress(image.initrd.read_bytes()), capture_output=True
    ).stdout.decode().split()
    for name in ("init", "app/server", "bin/busybox", "bin/sh", "osvm/modules.list", "osvm/modules/virtio_mmio.ko"):
        assert name in listing


def test_relative_path_resolved_against_base_dir(kernel_cache: Path, tmp_path: Path) -> None:
    compile_server(tmp_path)
    image = build_image(ImageSpec(kind="binary", path="server"), tmp_path, kernel_cache)
    assert find_image(kernel_cache, image.digest) == image


def test_changed_binary_changes_digest(kernel_cache: Path, tmp_path: Path) -> None:
    binary = compile_server(tmp_path)
    first = build_image(ImageSpec(kind="binary", path=str(binary)), tmp_path, kernel_cache)
    with open(binary, "ab") as handle:
        handle.write(b"changed")
    second = build_image(ImageSpec(kind="binary", path=str(binary)), tmp_path, kernel_cache)
    assert first.digest != second.digest


def test_directory_image_copies_tree(kernel_cache: Path, tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "bin").mkdir(parents=True)
    (app / "bin" / "run.sh").write_text("#!/bin/sh\necho ok\n")
    (app / "bin" / "run.sh").chmod(0o755)
    (app / "config.toml").write_text("x = 1\n")
    image = build_image(ImageSpec(kind="directory", path=str(app)), tmp_path, kernel_cache)
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=gzip.decompress(image.initrd.read_bytes()), capture_output=True
    ).stdout.decode().split()
    assert "app/bin/run.sh" in listing
    assert "app/config.toml" in listing


def test_ext4_image_contains_app(kernel_cache: Path, tmp_path: Path) -> None:
    if shutil.which("debugfs") is None:
        pytest.skip("needs debugfs (Debian package e2fsprogs)")
    binary = compile_server(tmp_path)
    image = build_image(ImageSpec(kind="binary", path=str(binary), format="ext4"), tmp_path, kernel_cache)
    assert image.rootfs is not None
    listing = subprocess.run(["debugfs", "-R", "ls -l /app", str(image.rootfs)], capture_output=True, text=True).stdout
    assert "server" in listing
    initrd = subprocess.run(
        ["cpio", "-t", "--quiet"], input=gzip.decompress(image.initrd.read_bytes()), capture_output=True
    ).stdout.decode().split()
    assert "osvm/root" in initrd
    assert "osvm/modules/ext4.ko" in initrd
    assert "app/server" not in initrd


def test_list_and_remove_image(kernel_cache: Path, tmp_path: Path) -> None:
    binary = compile_server(tmp_path, extra_bytes=secrets.token_bytes(16))
    image = build_image(ImageSpec(kind="binary", path=str(binary)), tmp_path, kernel_cache)
    assert image.digest in [listed.digest for listed in list_images(kernel_cache)]

    removed = remove_image(kernel_cache, image.digest[:16])
    assert removed.digest == image.digest
    assert not image.directory.exists()
    assert image.kernel.exists()
    assert image.digest not in [listed.digest for listed in list_images(kernel_cache)]


def test_remove_unknown_image_raises(kernel_cache: Path) -> None:
    with pytest.raises(ImageError, match="no cached image matches"):
        remove_image(kernel_cache, "0" * 64)


def test_missing_binary_raises(kernel_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is not a file"):
        build_image(ImageSpec(kind="binary", path=str(tmp_path / "absent")), tmp_path, kernel_cache)


@pytest.mark.skipif(os.environ.get("OSVM_SLOW_TESTS") != "1", reason="debootstrap takes minutes: set OSVM_SLOW_TESTS=1")
def test_debian_image_with_debootstrap(kernel_cache: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("image kind debian needs root and debootstrap (Debian package debootstrap)")
    try:
        debian_source()
    except DebianError as error:
        pytest.skip(str(error))
    image = build_image(ImageSpec(kind="debian", packages=["netcat-openbsd"], format="ext4"), tmp_path, kernel_cache)
    assert image.rootfs is not None
    listing = subprocess.run(["debugfs", "-R", "ls -l /usr/bin", str(image.rootfs)], capture_output=True, text=True).stdout
    assert "nc.openbsd" in listing
