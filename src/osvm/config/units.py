"""Durations and byte sizes as written in deployment files."""

import math
import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")

# Binary units (KiB, Ki) are powers of 1024. Decimal units (K, KB) are powers of 1000 as in SI and
# Kubernetes. This differs from systemd's MemoryMax= and the --memory option of Docker and Podman,
# which read "2G" as 2 GiB.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: object) -> float:
    """Parse "250ms", "10s", "5m", "1h" or a number of seconds into seconds.

    Raises ValueError with the accepted forms when the value is not a duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: write a string such as \"10s\" or \"500ms\"")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(
                f"invalid duration {value!r}: write a number with a unit ms, s, m or h, such as \"10s\" or \"500ms\""
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: write a string such as \"10s\" or \"500ms\"")
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: write a finite number of seconds or a string such as \"10s\"")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: it must not be negative")
    return seconds


def parse_size(value: object) -> int:
    """Parse "512MiB", "2GiB", "100M" or a number of bytes into bytes.

    Raises ValueError with the accepted forms when the value is not a size.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}: write a string such as \"512MiB\" or \"2GiB\"")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(
                f"invalid size {value!r}: write a number with a unit such as \"512MiB\", \"2GiB\" or \"100M\""
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"invalid size {value!r}: write a string such as \"512MiB\" or \"2GiB\"")
    if size <= 0:
        raise ValueError(f"invalid size {value!r}: it must be greater than zero")
    return size


def format_duration(seconds: float) -> str:
    """Format seconds the way a deployment file writes them."""
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """Format bytes with the largest binary unit that divides them."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)]
ByteSize = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size, return_type=str)]
