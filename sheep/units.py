"""Human sizes: parse what people type ("4M", "10G", "512k") and print them back."""

from __future__ import annotations

import re
from fractions import Fraction

SECTOR = 512  # block devices (NBD, iSCSI, QEMU) size disks in whole sectors

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^\s*(\d{1,30}(?:\.\d{1,30})?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes for '4096', '4k', '4K', '4KiB', '1.5G'; ValueError on anything else."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r} (examples: 4096, 512K, 10G)")
    value = Fraction(match.group(1)) * _UNITS[match.group(2).lower()]  # exact: no float
    if value.denominator != 1:
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" and n % 1 else f"{n:g} {unit}"
        n = n / 1024
    return f"{n} PiB"


def round_up(size: int) -> int:
    """`size` rounded up to whole sectors."""
    return -(-size // SECTOR) * SECTOR
