"""What may name a VDI or a snapshot, and the iSCSI target name each gets: the one place
for name rules, so that every way in (dog, the API, a VM spec) refuses the same names with
the same one-line reason.

A name or tag is NFC-normalised UTF-8 of at most 255 bytes, without '@' (it separates a
snapshot's tag), '/' or '\\', and without control, format (bidi overrides, zero-width
characters), space, separator, surrogate or private-use characters: what is shown must be
what is stored, and two names that look alike must not both exist through normalisation.
Its iSCSI target name (below) must fit the 223 bytes RFC 7143 allows.

Target names, one IQN per export (RFC 7143 §4.2.7, RFC 3722):

    VDI NAME            iqn.2026-11.io.sheep:NAME
    snapshot NAME@TAG   iqn.2026-11.io.sheep:NAME:TAG       (read-only)

An iSCSI name may only hold lower-case letters, digits, '-', '.' and ':' (others are
either folded to lower case by stringprep or forbidden, '@' among them), and initiators
compare names case-insensitively. So a name or tag made only of [a-z0-9.-] and not
starting with '.' is used as it is (the usual case: `disk1`, `vm-3.root`), and any other
is spelled '.' followed by the hex of its UTF-8 bytes (`MyDisk` -> `.4d794469736b`):
unambiguous, reversible, and a valid IQN. ':' never appears in an encoded part, so it is
free to separate a snapshot's tag. Two exports never share a target name, whatever the
case.

An initiator may send a name in any case, and it names the same target. Sent as
`...:Disk`, it means `...:disk`, which may well be another VDI than `Disk` (whose target is
`...:.4469736b`): such a spelling is served only while no export is literally named as it
was sent (`spelled_export`), so a misspelt case never reaches the wrong disk.
"""

from __future__ import annotations

import re
import unicodedata

from sheep.errors import InvalidParams

MAX_NAME_BYTES = 255
MAX_IQN_BYTES = 223  # RFC 7143 §6.1
PREFIX = "iqn.2026-11.io.sheep:"
_PLAIN = re.compile(r"[a-z0-9-][a-z0-9.-]*\Z")
_FORBIDDEN = set("@/\\")
# control, format (bidi, zero-width), surrogate, private use, unassigned; separators
_BAD_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}


def validate_name(name: str, what: str = "VDI name") -> str:
    """`name` if it may name a VDI (or, with `what`, a snapshot tag); else InvalidParams
    saying why, in one line."""
    if not name:
        raise InvalidParams(f"{what} is empty")
    try:
        raw = name.encode()
    except UnicodeEncodeError:
        raise InvalidParams(f"{what} {name!r} is not valid UTF-8") from None
    if len(raw) > MAX_NAME_BYTES:
        raise InvalidParams(f"{what} is {len(raw)} bytes long, over the {MAX_NAME_BYTES} "
                            f"allowed")
    for char in name:
        if char in _FORBIDDEN:
            raise InvalidParams(f"{what} {name!r} contains {char!r} (no '@', '/', '\\')")
        if unicodedata.category(char) in _BAD_CATEGORIES:
            raise InvalidParams(f"{what} {name!r} contains U+{ord(char):04X} "
                                f"({unicodedata.name(char, 'unnamed')}): no spaces, "
                                f"control or invisible characters")
    if unicodedata.normalize("NFC", name) != name:
        raise InvalidParams(f"{what} {name!r} is not in Unicode normal form C: it would "
                            f"look like another name (type it as "
                            f"{unicodedata.normalize('NFC', name)!r})")
    return name


def validate_label(name: str, tag: str | None = None) -> None:
    """NAME (or NAME@TAG) may be an export: each part a valid name, and its iSCSI target
    name within the 223 bytes iSCSI allows."""
    validate_name(name)
    if tag is not None:
        validate_name(tag, "snapshot tag")
    iqn = target_name(name if tag is None else f"{name}@{tag}")
    if len(iqn) > MAX_IQN_BYTES:
        what = "VDI name" if tag is None else "VDI name and snapshot tag"
        raise InvalidParams(
            f"{what} too long for iSCSI: the target name would be {len(iqn)} bytes, over "
            f"the {MAX_IQN_BYTES} iSCSI allows (names of a-z 0-9 . - count once, others "
            f"twice)")


# -- iSCSI target names -----------------------------------------------------------------


def _encode(part: str) -> str:
    return part if _PLAIN.match(part) else "." + part.encode().hex()


def _decode(part: str) -> str | None:
    if _PLAIN.match(part):
        return part
    if part.startswith(".") and len(part) > 1:
        try:
            return bytes.fromhex(part[1:]).decode()
        except ValueError:
            return None
    return None


def target_name(export: str) -> str:
    """The IQN of an export named as NBD names it: NAME or NAME@TAG."""
    name, sep, tag = export.partition("@")
    return PREFIX + _encode(name) + (":" + _encode(tag) if sep else "")


def spelled_export(iqn: str) -> str | None:
    """The export an IQN spells literally, as a user who typed a VDI name into it means it
    (`...:Disk` -> `Disk`), when that differs from what the IQN names (`disk`); else None."""
    if not iqn.lower().startswith(PREFIX):
        return None
    name, sep, tag = iqn[len(PREFIX):].partition(":")
    literal = f"{name}@{tag}" if sep else name
    if name.startswith(".") or tag.startswith(".") or literal == export_name(iqn):
        return None
    return literal


def export_name(iqn: str) -> str | None:
    """NAME or NAME@TAG for one of our IQNs (any case), None for anything else."""
    iqn = iqn.lower()
    if not iqn.startswith(PREFIX):
        return None
    name, sep, tag = iqn[len(PREFIX) :].partition(":")
    vdi = _decode(name)
    if vdi is None:
        return None
    if not sep:
        return vdi
    snap = _decode(tag)
    return None if snap is None else f"{vdi}@{snap}"
