"""Build, cache, list and remove microVM guest images.

An image is the guest kernel (an ELF vmlinux shared by all images of that kernel package) plus a
gzip'd cpio initramfs whose /init is the osvm guest agent, and for format "ext4" an ext4 root
filesystem image as well. Images live in <cache_dir>/<digest>/, where the digest is the sha256 of
everything that goes in: the spec, the content of the copied files, the agent, the kernel package
and busybox. A build whose digest is already cached returns the cached image at once.

Layout of the cache directory (by default <state_dir>/images):

    <digest>/manifest.json, initrd.img, rootfs.ext4   one image
    kernels/<package>/vmlinux, modules/               unpacked kernel packages
    agents/<digest>/osvm-agent                        compiled agents
    downloads/*.deb, tools/busybox                    fetched Debian packages
"""

import fcntl
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from osvm.config.models import ImageSpec
from osvm.guest import agent_digest, build_agent
from osvm.images.cpio import CpioWriter
from osvm.images.debian import debootstrap
from osvm.images.kernel import (
    BASE_MODULES,
    EXT4_MODULES,
    GuestKernel,
    fetch_busybox,
    fetch_kernel,
    module_name,
    read_module,
)
from osvm.images.sources import resolve_source, source_problem

logger = logging.getLogger("osvm.images")

# Changing how images are laid out must change every digest, so bump this with such changes.
BUILDER_VERSION = 1
MANIFEST = "manifest.json"
INITRD = "initrd.img"
ROOTFS = "rootfs.ext4"
# The ext4 root filesystem is the guest's first virtio-blk disk.
ROOT_DEVICE = "/dev/vda"
# Free space added to an ext4 root filesystem beyond its content. The file is sparse, so unused
# space costs no disk.
EXT4_FREE_SPACE = 512 * 1024 * 1024
_DIGEST_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_STANDARD_DIRS = ("bin", "dev", "etc", "proc", "sys", "run", "tmp", "data", "app", "root", "newroot")


class ImageError(Exception):
    """An image could not be built, found or removed; the message explains the fix."""


@dataclass(frozen=True)
class BuiltImage:
    """A cached image: the files QEMU boots and what they were built from."""

    digest: str
    directory: Path
    kernel: Path
    initrd: Path
    # The ext4 root filesystem for format "ext4", None for format "initramfs".
    rootfs: Path | None
    format: str
    kind: str
    kernel_package: str
    kernel_release: str
    size: int
    created: float

    @property
    def short_digest(self) -> str:
        return self.digest[:12]


def build_image(
    spec: ImageSpec,
    base_dir: Path,
    cache_dir: Path,
    kernel_package: str | None = None,
    on_build: Callable[[], None] | None = None,
) -> BuiltImage:
    """Return the image for spec from the cache, building it first when it is not there.

    `base_dir` resolves a relative spec.path (the deployment file's directory). `kernel_package`
    picks a kernel package such as linux-image-6.1.0-57-amd64 instead of the newest cached one.
    `on_build` is called once the cache has no image of this digest, just before the build
    starts, so a caller can tell a build from a cache hit. Raises ImageError (or KernelError,
    AgentBuildError) naming the failing step.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = _source_path(spec, Path(base_dir))
    kernel = fetch_kernel(cache_dir, kernel_package)
    agent = build_agent(cache_dir)
    busybox = fetch_busybox(cache_dir) if spec.kind != "debian" else None
    digest = image_digest(spec, source, kernel, busybox)

    with _build_lock(cache_dir, digest):
        existing = find_image(cache_dir, digest)
        if existing is not None:
            logger.info("image %s is cached in %s", existing.short_digest, existing.directory)
            return existing
        if on_build is not None:
            on_build()
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".build-{digest[:12]}-", dir=cache_dir))
        try:
            _build_into(staging, spec, source, kernel, agent, busybox)
            image = _write_manifest(staging, cache_dir, digest, spec, kernel)
            target = cache_dir / digest
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info(
            "built image %s (%s, %s) in %.1f s", digest[:12], spec.kind, spec.format, time.monotonic() - started
        )
        return find_image(cache_dir, digest) or image


def image_digest(spec: ImageSpec, source: Path | None, kernel: GuestKernel, busybox: Path | None) -> str:
    """Return the sha256 over the builder version, the spec, the input files, agent, kernel and busybox.

    The source path itself is not part of the digest, only what is there, so moving a binary
    keeps its image.
    """
    digest = hashlib.sha256()
    header = {
        "builder": BUILDER_VERSION,
        "kind": spec.kind,
        "format": spec.format,
        "packages": sorted(spec.packages),
        "agent": agent_digest(),
        "kernel": [kernel.package, kernel.version],
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    if busybox is not None:
        digest.update(b"busybox\0" + _file_digest(busybox).encode())
    if spec.kind == "binary" and source is not None:
        digest.update(b"binary\0" + source.name.encode() + b"\0" + _file_digest(source).encode())
    elif spec.kind == "directory" and source is not None:
        _digest_tree(digest, source)
    elif spec.kind == "debian":
        from osvm.images.debian import debian_source

        digest.update(json.dumps(debian_source(), sort_keys=True).encode())
    return digest.hexdigest()


def find_image(cache_dir: Path, digest: str) -> BuiltImage | None:
    """Return the cached image with this digest (or unique digest prefix), or None."""
    cache_dir = Path(cache_dir)
    if not re.fullmatch(r"[0-9a-f]{4,64}", digest):
        return None
    matches = [image for image in list_images(cache_dir) if image.digest.startswith(digest)]
    return matches[0] if len(matches) == 1 else None


def list_images(cache_dir: Path) -> list[BuiltImage]:
    """Return the cached images, newest first. Directories without a readable manifest are skipped."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    images = []
    for entry in cache_dir.iterdir():
        if not _DIGEST_PATTERN.match(entry.name):
            continue
        image = _read_manifest(cache_dir, entry)
        if image is not None:
            images.append(image)
    return sorted(images, key=lambda image: image.created, reverse=True)


def get_image(cache_dir: Path, digest: str) -> BuiltImage:
    """Return the cached image with this digest or unique digest prefix.

    Raises ImageError when no image, or more than one, matches.
    """
    image = find_image(Path(cache_dir), digest)
    if image is not None:
        return image
    matches = [image.short_digest for image in list_images(Path(cache_dir)) if image.digest.startswith(digest)]
    if len(matches) > 1:
        raise ImageError(f"{digest!r} matches {len(matches)} cached images ({', '.join(matches)}): give more digits")
    raise ImageError(f"no cached image matches {digest!r}: list the images to see their digests")


def remove_image(cache_dir: Path, digest: str) -> BuiltImage:
    """Remove a cached image by digest or unique digest prefix and return what was removed.

    The shared kernel stays. Raises ImageError when no single image matches.
    """
    image = get_image(Path(cache_dir), digest)
    shutil.rmtree(image.directory)
    logger.info("removed image %s", image.short_digest)
    return image


# --- building ------------------------------------------------------------------------------------


def _build_into(
    staging: Path, spec: ImageSpec, source: Path | None, kernel: GuestKernel, agent: Path, busybox: Path | None
) -> None:
    tree = staging / "tree"
    tree.mkdir()
    if spec.kind == "debian":
        debootstrap(spec.packages, tree)
    else:
        _make_base_tree(tree, busybox)
        _copy_app(spec, source, tree)
    for name in _STANDARD_DIRS:
        (tree / name).mkdir(exist_ok=True)

    modules = list(BASE_MODULES) + (list(EXT4_MODULES) if spec.format == "ext4" else [])
    module_files = kernel.modules_for(tuple(modules))
    if spec.format == "initramfs":
        _write_initramfs(staging / INITRD, agent, module_files, tree, root_device=None)
    else:
        _write_initramfs(staging / INITRD, agent, module_files, None, root_device=ROOT_DEVICE)
        _write_ext4(staging / ROOTFS, tree)
    shutil.rmtree(tree)


def _make_base_tree(tree: Path, busybox: Path | None) -> None:
    """Lay out a minimal root: busybox with its applet links, and the files that libc tools expect."""
    for name in _STANDARD_DIRS + ("usr/bin", "usr/sbin", "sbin"):
        (tree / name).mkdir(parents=True, exist_ok=True)
    (tree / "tmp").chmod(0o1777)
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (tree / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (tree / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n")
    (tree / "etc" / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    if busybox is None:
        return
    shutil.copy2(busybox, tree / "bin" / "busybox")
    (tree / "bin" / "busybox").chmod(0o755)
    result = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ImageError(f"`busybox --list-full` failed: {result.stderr.strip()}")
    for applet in result.stdout.split():
        link = tree / applet
        if link.exists() or link.is_symlink() or applet in ("bin/busybox", "linuxrc", "sbin/init", "init"):
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def _copy_app(spec: ImageSpec, source: Path | None, tree: Path) -> None:
    assert source is not None
    app = tree / "app"
    if spec.kind == "binary":
        app.mkdir(exist_ok=True)
        target = app / source.name
        shutil.copyfile(source, target)
        target.chmod(0o755)
        return
    if app.exists():
        shutil.rmtree(app)
    shutil.copytree(source, app, symlinks=True)


def _write_initramfs(
    path: Path, agent: Path, module_files: list[Path], tree: Path | None, root_device: str | None
) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as compressed:
        writer = CpioWriter(compressed)  # type: ignore[arg-type]
        for name in ("dev", "proc", "sys", "run", "newroot", "osvm", "osvm/modules"):
            writer.add_directory(name)
        writer.add_device("dev/console", stat.S_IFCHR, 5, 1, 0o600)
        writer.add_device("dev/null", stat.S_IFCHR, 1, 3, 0o666)
        writer.add_file_from("init", agent, 0o755)
        listed = []
        for module in module_files:
            name = f"osvm/modules/{module_name(module)}.ko"
            writer.add_file(name, read_module(module), 0o644)
            listed.append("/" + name)
        writer.add_file("osvm/modules.list", ("\n".join(listed) + "\n").encode())
        if root_device is not None:
            writer.add_file("osvm/root", (root_device + "\n").encode())
        if tree is not None:
            writer.add_tree(tree)
        writer.finish()


def _write_ext4(path: Path, tree: Path) -> None:
    if shutil.which("mke2fs") is None:
        raise ImageError("format \"ext4\" needs mke2fs: install the Debian package e2fsprogs")
    content = sum(entry.lstat().st_size for entry in tree.rglob("*"))
    size_mib = (int(content * 1.2) + EXT4_FREE_SPACE) // (1024 * 1024) + 1
    result = subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "osvm-root", "-d", str(tree), str(path), f"{size_mib}M"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise ImageError(f"mke2fs failed to create {path.name}: {(result.stderr or result.stdout).strip()}")


# --- manifests and helpers ---------------------------------------------------------------------


def _write_manifest(staging: Path, cache_dir: Path, digest: str, spec: ImageSpec, kernel: GuestKernel) -> BuiltImage:
    rootfs = staging / ROOTFS if spec.format == "ext4" else None
    size = (staging / INITRD).stat().st_size + (rootfs.stat().st_blocks * 512 if rootfs else 0)
    manifest = {
        "digest": digest,
        "builder": BUILDER_VERSION,
        "spec": spec.model_dump(mode="json"),
        "kernel_package": kernel.package,
        "kernel_version": kernel.version,
        "kernel_release": kernel.release,
        "kernel": str(kernel.vmlinux.relative_to(cache_dir)),
        "initrd": INITRD,
        "rootfs": ROOTFS if rootfs else None,
        "size": size,
        "created": time.time(),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    image = _read_manifest(cache_dir, staging)
    assert image is not None
    return image


def _read_manifest(cache_dir: Path, directory: Path) -> BuiltImage | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        return BuiltImage(
            digest=manifest["digest"],
            directory=directory,
            kernel=cache_dir / manifest["kernel"],
            initrd=directory / manifest["initrd"],
            rootfs=directory / manifest["rootfs"] if manifest.get("rootfs") else None,
            format=manifest["spec"]["format"],
            kind=manifest["spec"]["kind"],
            kernel_package=manifest["kernel_package"],
            kernel_release=manifest["kernel_release"],
            size=int(manifest["size"]),
            created=float(manifest["created"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("skipping image directory %s: unreadable %s: %s", directory, MANIFEST, error)
        return None


def _source_path(spec: ImageSpec, base_dir: Path) -> Path | None:
    if spec.kind == "debian":
        return None
    source = resolve_source(spec, base_dir)
    problem = source_problem(spec.kind, source)
    if problem is not None:
        raise ImageError(f"image.path {problem}")
    return source.resolve()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_tree(digest: "hashlib._Hash", root: Path) -> None:
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for name in sorted(files + [entry for entry in subdirectories if os.path.islink(os.path.join(directory, entry))]):
            path = Path(directory) / name
            info = path.lstat()
            relative = str(path.relative_to(root))
            digest.update(f"{relative}\0{stat.S_IMODE(info.st_mode):o}\0".encode())
            if stat.S_ISLNK(info.st_mode):
                digest.update(b"link\0" + os.readlink(path).encode())
            elif stat.S_ISREG(info.st_mode):
                digest.update(b"file\0" + _file_digest(path).encode())


@contextmanager
def _build_lock(cache_dir: Path, digest: str) -> Iterator[None]:
    """Hold an exclusive lock so that two builds of the same digest do not race."""
    lock_path = cache_dir / f".lock-{digest[:16]}"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
