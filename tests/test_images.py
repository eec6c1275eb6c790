"""Tests of guest image building: cpio, vmlinux extraction, module dependencies, executable checks, the image cache."""

from __future__ import annotations

import dataclasses
import gzip
import io
import lzma
import os
import re
import secrets
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from osvm.config.models import ImageSpec
from osvm.images import (
    BuiltImage,
    ImageError,
    ImageInUseError,
    ImageUser,
    build_image,
    find_image,
    image_users,
    list_images,
    remove_image,
    remove_image_unless_used,
)
from osvm.images.cpio import CpioWriter
from osvm.images.elf import (
    ELFCLASS32,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFDATA2MSB,
    EM_X86_64,
    ET_DYN,
    ET_EXEC,
    PT_INTERP,
    ElfHeader,
    read_elf_header,
)
from osvm.images.sources import executable_problem
from osvm.runtimes.microvm.runtime import VmInstance
from osvm.store.db import InstanceRecord, Store
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
from test_microvm_support import IMAGE_CACHE, compile_server, link_shared_cache, require_guest_kernel, require_image_tools


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image cache whose kernels, agents and downloads are shared with other test runs."""
    require_image_tools()
    require_guest_kernel()
    cache = tmp_path_factory.mktemp("images")
    link_shared_cache(cache)
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

    builds: list[str] = []
    again = build_image(spec, tmp_path, kernel_cache, on_build=lambda: builds.append(spec.kind))
    assert again.digest == image.digest
    assert again.initrd.stat().st_mtime_ns == initrd_mtime
    assert builds == []

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


def test_new_build_calls_on_build(kernel_cache: Path, tmp_path: Path) -> None:
    binary = compile_server(tmp_path, extra_bytes=secrets.token_bytes(16))
    builds: list[str] = []

    image = build_image(ImageSpec(kind="binary", path=str(binary)), tmp_path, kernel_cache, on_build=lambda: builds.append("built"))

    assert builds == ["built"]
    assert image.initrd.exists()


def test_missing_binary_raises(kernel_cache: Path, tmp_path: Path) -> None:
    absent = tmp_path / "absent"
    with pytest.raises(ImageError, match=f"image.path {absent} does not exist: correct image.path"):
        build_image(ImageSpec(kind="binary", path=str(absent)), tmp_path, kernel_cache)


def test_dynamic_binary_rejected_before_build(tmp_path: Path) -> None:
    binary = compile_program(tmp_path, "dynamic")
    interpreter = readelf_interpreter(binary)
    cache = tmp_path / "cache"

    with pytest.raises(ImageError) as caught:
        build_image(ImageSpec(kind="binary", path=str(binary)), tmp_path, cache)

    assert str(caught.value) == (
        f"image.path {binary} is dynamically linked (interpreter {interpreter}): build it static, or use "
        f"image.kind = \"directory\" with its libraries or image.kind = \"debian\" with its package"
    )
    assert list_images(cache) == []


def test_binary_kind_rejects_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=f"image.path {tmp_path} is a directory, but kind \"binary\" copies one file"):
        build_image(ImageSpec(kind="binary", path=str(tmp_path)), tmp_path, tmp_path / "cache")


def test_directory_kind_rejects_file(tmp_path: Path) -> None:
    file = tmp_path / "run.sh"
    file.write_text("#!/bin/sh\n")
    with pytest.raises(ImageError, match=f"image.path {file} is a file, but kind \"directory\" copies a directory"):
        build_image(ImageSpec(kind="directory", path=str(file)), tmp_path, tmp_path / "cache")


# --- executables of binary images -------------------------------------------------------------


def compile_program(directory: Path, name: str, *flags: str) -> Path:
    """Compile a C program that exits 0 into directory/name with gcc and the given flags."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc (Debian package gcc)")
    binary = directory / name
    result = subprocess.run(
        ["gcc", *flags, "-x", "c", "-o", str(binary), "-"], input="int main(void){return 0;}", capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"gcc {' '.join(flags)} failed here: {result.stderr.strip()}")
    return binary


def readelf_interpreter(binary: Path) -> str:
    """Return the program interpreter that binutils' readelf reports, to check the parser against it."""
    if shutil.which("readelf") is None:
        pytest.skip("needs readelf (Debian package binutils)")
    output = subprocess.run(["readelf", "-lW", str(binary)], capture_output=True, text=True, check=True).stdout
    match = re.search(r"\[Requesting program interpreter: (.+)\]", output)
    assert match is not None, output
    return match.group(1)


def synthetic_elf(
    elf_class: int = ELFCLASS64,
    data: int = ELFDATA2LSB,
    elf_type: int = ET_EXEC,
    machine: int = EM_X86_64,
    interpreter: bytes | None = None,
    extended_count: bool = False,
) -> bytes:
    """Return a minimal ELF file: the header, one PT_LOAD, an optional PT_INTERP and its path.

    With extended_count, e_phnum is PN_XNUM and the real count is in sh_info of section header 0.
    """
    order = "<" if data == ELFDATA2LSB else ">"
    wide = elf_class == ELFCLASS64
    header_size, program_size, section_size = (64, 56, 64) if wide else (52, 32, 40)
    programs = [(1, 0, 0)] + ([(PT_INTERP, 0, len(interpreter))] if interpreter is not None else [])
    phoff = header_size
    shoff = phoff + program_size * len(programs)
    interpreter_offset = shoff + section_size
    phnum = 0xFFFF if extended_count else len(programs)
    ident = b"\x7fELF" + bytes([elf_class, data, 1]) + bytes(9)
    header_format = order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH")
    header = ident + struct.pack(
        header_format, elf_type, machine, 1, 0, phoff, shoff, 0, header_size, program_size, phnum, section_size, 1, 0
    )
    table = b""
    for kind, _, size in programs:
        offset = interpreter_offset if kind == PT_INTERP else 0
        if wide:
            table += struct.pack(order + "IIQQQQQQ", kind, 4, offset, 0, 0, size, size, 1)
        else:
            table += struct.pack(order + "IIIIIIII", kind, offset, 0, 0, size, size, 4, 1)
    info_offset = 44 if wide else 28
    section = bytearray(section_size)
    struct.pack_into(order + "I", section, info_offset, len(programs) if extended_count else 0)
    return header + table + bytes(section) + (interpreter or b"")


@pytest.mark.parametrize(
    ("flags", "elf_type"), [(("-static",), ET_EXEC), (("-static-pie", "-fPIE"), ET_DYN)], ids=["static", "static-pie"]
)
def test_static_executable_accepted(tmp_path: Path, flags: tuple[str, ...], elf_type: int) -> None:
    binary = compile_program(tmp_path, "program", *flags)
    header = read_elf_header(binary)
    assert header is not None
    assert header.type == elf_type
    assert header.interpreter is None
    assert executable_problem(binary) is None


def test_interpreter_matches_readelf(tmp_path: Path) -> None:
    binary = compile_program(tmp_path, "dynamic")
    header = read_elf_header(binary)
    assert header is not None
    assert header.interpreter == readelf_interpreter(binary)


def test_elf32_big_endian_interpreter_read(tmp_path: Path) -> None:
    path = tmp_path / "ppc"
    path.write_bytes(synthetic_elf(ELFCLASS32, ELFDATA2MSB, machine=20, interpreter=b"/lib/ld.so.1\0"))
    header = read_elf_header(path)
    assert header == ElfHeader(elf_class=ELFCLASS32, type=ET_EXEC, machine=20, interpreter="/lib/ld.so.1")


def test_extended_program_header_count_read(tmp_path: Path) -> None:
    path = tmp_path / "many"
    path.write_bytes(synthetic_elf(interpreter=b"/lib64/ld-linux-x86-64.so.2\0", extended_count=True))
    header = read_elf_header(path)
    assert header is not None
    assert header.interpreter == "/lib64/ld-linux-x86-64.so.2"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (synthetic_elf(machine=183), "is an executable for ELF machine 183, but the guest runs x86-64: build it for x86-64"),
        (synthetic_elf(elf_type=1), "is an ELF relocatable object file, not an executable"),
        (synthetic_elf()[:40], "is not a valid ELF file (the ELF header is truncated)"),
        (synthetic_elf(interpreter=b"/lib/ld.so\0")[:245], "is not a valid ELF file (the PT_INTERP segment is truncated)"),
        (b"PK\x03\x04 a zip archive", "is neither an ELF executable nor a #! script (it starts with b'PK\\x03\\x04 a z')"),
        (b"", "is neither an ELF executable nor a #! script"),
        (b"#!/usr/bin/python3\nprint(1)\n", "is a script for /usr/bin/python3 (its #! line)"),
        (b"#!/usr/bin/env python3\n", "is a script for /usr/bin/env python3 (its #! line)"),
        (b"#!/bin/bash -e\n", "is a script for /bin/bash (its #! line)"),
        (b"#!\n", "is a script for no interpreter (its #! line)"),
    ],
    ids=["foreign machine", "object file", "truncated header", "truncated interpreter", "zip archive", "empty file",
         "python script", "env python script", "bash script", "empty #! line"],
)
def test_unrunnable_file_rejected(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "program"
    path.write_bytes(content)
    problem = executable_problem(path)
    assert problem is not None
    assert problem.startswith(f"{path} ")
    assert fragment in problem


@pytest.mark.parametrize("first_line", ["#!/bin/sh", "#!/bin/sh -e", "#! /bin/ash", "#!/usr/bin/env sh"])
def test_busybox_shell_script_accepted(tmp_path: Path, first_line: str) -> None:
    path = tmp_path / "run.sh"
    path.write_text(f"{first_line}\necho ok\n")
    assert executable_problem(path) is None


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


# --- removal of images in use ------------------------------------------------------------------


def record_vm_instance(state_dir: Path, image: BuiltImage, instance_id: str, state: str | None) -> None:
    """Write what the daemon keeps for a microVM instance of component "web": its microvm.json and,
    unless state is None, its row in the store."""
    instance_dir = state_dir / "instances" / instance_id
    instance_dir.mkdir(parents=True)
    VmInstance(
        accelerator="tcg", accelerator_reason="test", image=image.digest, kernel=str(image.kernel),
        initrd=str(image.initrd), overlay=None, vcpus=1, memory=256 << 20,
    ).save(instance_dir)  # fmt: skip
    if state is None:
        return
    store = Store(state_dir / "state.db")
    try:
        store.add_instance(InstanceRecord(id=instance_id, component="web", revision=1, runtime="microvm", state=state))
    finally:
        store.close()


@pytest.fixture
def unique_image(kernel_cache: Path, tmp_path: Path) -> BuiltImage:
    binary = compile_server(tmp_path, extra_bytes=secrets.token_bytes(16))
    return build_image(ImageSpec(kind="binary", path=str(binary)), tmp_path, kernel_cache)


def test_image_of_live_instance_kept(kernel_cache: Path, tmp_path: Path, unique_image: BuiltImage) -> None:
    state_dir = tmp_path / "state"
    record_vm_instance(state_dir, unique_image, "web-1-aaaaaa", "running")
    record_vm_instance(state_dir, unique_image, "web-2-bbbbbb", "backoff")

    with pytest.raises(ImageInUseError) as caught:
        remove_image_unless_used(kernel_cache, state_dir, unique_image.digest[:12])

    assert caught.value.users == [
        ImageUser(component="web", instance="web-1-aaaaaa", state="running"),
        ImageUser(component="web", instance="web-2-bbbbbb", state="backoff"),
    ]
    message = str(caught.value)
    assert f"image {unique_image.short_digest} is in use by web (instance web-1-aaaaaa, running), " in message
    assert "web (instance web-2-bbbbbb, backoff)" in message
    assert "`osvm stop web`" in message
    assert f"`osvm image rm --force {unique_image.short_digest}`" in message
    assert unique_image.initrd.exists()


def test_image_of_stopped_instance_removed(kernel_cache: Path, tmp_path: Path, unique_image: BuiltImage) -> None:
    state_dir = tmp_path / "state"
    record_vm_instance(state_dir, unique_image, "web-1-aaaaaa", "stopped")
    record_vm_instance(state_dir, unique_image, "web-2-bbbbbb", "failed")

    removed, users = remove_image_unless_used(kernel_cache, state_dir, unique_image.digest)

    assert removed.digest == unique_image.digest
    assert users == []
    assert not unique_image.directory.exists()


def test_instance_without_store_row_counts(kernel_cache: Path, tmp_path: Path, unique_image: BuiltImage) -> None:
    state_dir = tmp_path / "state"
    record_vm_instance(state_dir, unique_image, "web-1-aaaaaa", None)

    assert image_users(state_dir, unique_image.digest) == [
        ImageUser(component="unknown", instance="web-1-aaaaaa", state="unknown")
    ]
    with pytest.raises(ImageInUseError):
        remove_image_unless_used(kernel_cache, state_dir, unique_image.digest)
    assert unique_image.directory.exists()


def test_other_image_does_not_count(kernel_cache: Path, tmp_path: Path, unique_image: BuiltImage) -> None:
    state_dir = tmp_path / "state"
    other = dataclasses.replace(unique_image, digest="f" * 64)
    record_vm_instance(state_dir, other, "web-1-aaaaaa", "running")

    assert image_users(state_dir, unique_image.digest) == []


def test_forced_removal_returns_users(kernel_cache: Path, tmp_path: Path, unique_image: BuiltImage) -> None:
    state_dir = tmp_path / "state"
    record_vm_instance(state_dir, unique_image, "web-1-aaaaaa", "running")

    removed, users = remove_image_unless_used(kernel_cache, state_dir, unique_image.digest, force=True)

    assert removed.digest == unique_image.digest
    assert users == [ImageUser(component="web", instance="web-1-aaaaaa", state="running")]
    assert not unique_image.directory.exists()
