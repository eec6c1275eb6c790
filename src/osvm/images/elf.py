"""Read the type, machine and interpreter of an ELF executable from its header and program headers.

Only what the image build needs to tell a static executable from a dynamically linked one is
parsed. Both classes (32 and 64 bit) and both byte orders are read.
"""

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ELFDATA2MSB = 2
ET_REL = 1
ET_EXEC = 2
ET_DYN = 3
ET_CORE = 4
EM_386 = 3
EM_X86_64 = 62
PT_INTERP = 3
# e_phnum has this value when the real count is in sh_info of section header 0.
PN_XNUM = 0xFFFF

# struct formats of the ELF header fields after e_ident, per class.
_HEADER_FORMATS = {ELFCLASS32: "HHIIIIIHHHHHH", ELFCLASS64: "HHIQQQIHHHHHH"}
# struct formats of the first six fields of a program header, up to p_filesz, per class.
_PROGRAM_HEADER_FORMATS = {ELFCLASS32: "IIIIII", ELFCLASS64: "IIQQQQ"}
# Offset of sh_info in a section header, per class.
_SECTION_INFO_OFFSET = {ELFCLASS32: 28, ELFCLASS64: 44}
_IDENT_SIZE = 16
# An interpreter path longer than this is a corrupt header, not a real dynamic linker.
_MAX_INTERPRETER = 4096


class ElfError(ValueError):
    """The file starts with the ELF magic but its headers are truncated or invalid."""


@dataclass(frozen=True)
class ElfHeader:
    """The fields of an ELF file that decide whether the guest can run it."""

    elf_class: int
    type: int
    machine: int
    # The PT_INTERP path (the dynamic linker), or None for a static executable.
    interpreter: str | None


def read_elf_header(path: Path) -> ElfHeader | None:
    """Parse the ELF header and program headers of path.

    Returns None when the file does not start with the ELF magic. Raises ElfError for a truncated
    or invalid ELF file, and OSError when the file cannot be read.
    """
    with open(path, "rb") as handle:
        ident = handle.read(_IDENT_SIZE)
        if not ident.startswith(ELF_MAGIC):
            return None
        if len(ident) < _IDENT_SIZE:
            raise ElfError("the ELF identification is truncated")
        elf_class, data = ident[4], ident[5]
        if elf_class not in _HEADER_FORMATS:
            raise ElfError(f"invalid ELF class {elf_class}")
        if data not in (ELFDATA2LSB, ELFDATA2MSB):
            raise ElfError(f"invalid ELF data encoding {data}")
        order = "<" if data == ELFDATA2LSB else ">"

        header_format = order + _HEADER_FORMATS[elf_class]
        header = _read_exact(handle, struct.calcsize(header_format), "the ELF header")
        (elf_type, machine, _version, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
         shentsize, _shnum, _shstrndx) = struct.unpack(header_format, header)  # fmt: skip

        if phnum == PN_XNUM:
            handle.seek(shoff + _SECTION_INFO_OFFSET[elf_class])
            phnum = struct.unpack(order + "I", _read_exact(handle, 4, "section header 0"))[0]
        interpreter = _read_interpreter(handle, order, elf_class, phoff, phentsize, phnum)
    return ElfHeader(elf_class=elf_class, type=elf_type, machine=machine, interpreter=interpreter)


def _read_interpreter(handle: BinaryIO, order: str, elf_class: int, phoff: int, phentsize: int, phnum: int) -> str | None:
    program_format = order + _PROGRAM_HEADER_FORMATS[elf_class]
    needed = struct.calcsize(program_format)
    if phnum and phentsize < needed:
        raise ElfError(f"program header size {phentsize} is below the {needed} bytes of its fields")
    for index in range(phnum):
        handle.seek(phoff + index * phentsize)
        fields = struct.unpack(program_format, _read_exact(handle, needed, f"program header {index}"))
        if fields[0] != PT_INTERP:
            continue
        # ELF64 puts p_flags second, so p_offset and p_filesz move by one field.
        offset, size = (fields[1], fields[4]) if elf_class == ELFCLASS32 else (fields[2], fields[5])
        if size > _MAX_INTERPRETER:
            raise ElfError(f"the PT_INTERP segment is {size} bytes long, too long for a path")
        handle.seek(offset)
        raw = _read_exact(handle, size, "the PT_INTERP segment")
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return None


def _read_exact(handle: BinaryIO, size: int, part: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise ElfError(f"{part} is truncated")
    return data
