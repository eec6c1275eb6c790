"""Checks of an image's source on the host: that image.path has the type its kind copies, and that
the program of a "binary" image can run in the guest.

The image build and `osvm validate` run the same checks, so a file that validates does not fail
the build on its source.
"""

from pathlib import Path

from osvm.config.load import ConfigIssue
from osvm.config.models import Deployment, ImageSpec, format_path
from osvm.images.elf import EM_386, EM_X86_64, ET_CORE, ET_DYN, ET_EXEC, ET_REL, ElfError, read_elf_header

# Machines whose static executables the guest runs. i386 runs under the IA-32 emulation of Debian's
# amd64 kernel, whose vmlinux has the ia32 compat system calls.
_GUEST_MACHINES = {EM_X86_64: "x86-64", EM_386: "i386"}
_ELF_TYPE_NAMES = {ET_REL: "relocatable object", ET_CORE: "core dump"}
# Interpreters that a #! script in a "binary" image may name, because _make_base_tree in build.py
# links the busybox shell at these paths in every such image.
SCRIPT_SHELLS = ("/bin/sh", "/bin/ash")
_ENV_PROGRAM = "/usr/bin/env"
# The kernel reads at most this many bytes of a #! line (BINPRM_BUF_SIZE in <linux/binfmts.h>).
_SHEBANG_LIMIT = 256


def resolve_source(spec: ImageSpec, base_dir: Path) -> Path:
    """Return spec.path made absolute against base_dir (the deployment file's directory), not resolving symlinks."""
    assert spec.path is not None
    source = Path(spec.path)
    return source if source.is_absolute() else base_dir / source


def source_problem(kind: str, source: Path) -> str | None:
    """Return why `source` cannot be the image.path of an image of `kind`, or None when it can.

    The message starts with the path and ends with the fix.
    """
    if not source.exists():
        return (
            f"{source} does not exist: correct image.path (a relative path is resolved against the "
            f"deployment file's directory)"
        )
    if kind == "binary":
        if source.is_dir():
            return (
                f"{source} is a directory, but kind \"binary\" copies one file: set image.path to the "
                f"static binary, or set image.kind = \"directory\""
            )
        if not source.is_file():
            return f"{source} is not a regular file: set image.path to the static binary to copy"
        return executable_problem(source)
    if kind == "directory" and not source.is_dir():
        return (
            f"{source} is a file, but kind \"directory\" copies a directory: set image.path to a "
            f"directory, or set image.kind = \"binary\" for one static binary"
        )
    return None


def executable_problem(path: Path) -> str | None:
    """Return why the guest of a "binary" image cannot run the file at path, or None when it can.

    The guest runs a static ELF executable for x86-64 or i386, static-pie included, and a #!
    script for the busybox shell. It has no dynamic linker and no other interpreter.
    """
    try:
        header = read_elf_header(path)
    except ElfError as error:
        return f"{path} is not a valid ELF file ({error}): set image.path to a static executable"
    except OSError as error:
        return f"{path} cannot be read ({error.strerror}): check its permissions"
    if header is None:
        return _script_problem(path)
    if header.type not in (ET_EXEC, ET_DYN):
        name = _ELF_TYPE_NAMES.get(header.type, f"type {header.type}")
        return f"{path} is an ELF {name} file, not an executable: set image.path to the linked program"
    if header.machine not in _GUEST_MACHINES:
        return (
            f"{path} is an executable for ELF machine {header.machine}, but the guest runs x86-64: "
            f"build it for x86-64"
        )
    if header.interpreter is not None:
        return (
            f"{path} is dynamically linked (interpreter {header.interpreter}): build it static, or use "
            f"image.kind = \"directory\" with its libraries or image.kind = \"debian\" with its package"
        )
    # NOTE: a shared library has no PT_INTERP either, so it passes as a static-pie executable.
    return None


def _script_problem(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            start = handle.read(_SHEBANG_LIMIT)
    except OSError as error:
        return f"{path} cannot be read ({error.strerror}): check its permissions"
    if not start.startswith(b"#!"):
        return (
            f"{path} is neither an ELF executable nor a #! script (it starts with {start[:8]!r}): set "
            f"image.path to a static executable"
        )
    words = start[2:].split(b"\n", 1)[0].decode("utf-8", "replace").split()
    interpreter = " ".join(words[:2]) if words[:1] == [_ENV_PROGRAM] else " ".join(words[:1])
    shells = SCRIPT_SHELLS + tuple(f"{_ENV_PROGRAM} {Path(shell).name}" for shell in SCRIPT_SHELLS)
    if interpreter in shells:
        return None
    return (
        f"{path} is a script for {interpreter or 'no interpreter'} (its #! line), which an image of kind "
        f"\"binary\" does not contain: start the script with #!/bin/sh for the busybox shell, or use "
        f"image.kind = \"debian\" with the package of its interpreter"
    )


def image_source_issues(deployment: Deployment, base_dir: Path) -> list[ConfigIssue]:
    """Check the image.path of every component against the host's files, as the image build does.

    base_dir is the deployment file's directory. Each issue names the dotted key, such as
    components.web.image.path.
    """
    issues = []
    for name, component in deployment.components.items():
        spec = component.image
        if spec is None or spec.path is None:
            continue
        problem = source_problem(spec.kind, resolve_source(spec, base_dir))
        if problem is not None:
            issues.append(ConfigIssue(format_path(("components", name, "image", "path")), problem))
    return issues
