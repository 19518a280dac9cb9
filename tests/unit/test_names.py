"""The one set of name rules for VDIs and snapshot tags: every violation is refused with a
one-line reason, and what passes has an iSCSI target name iSCSI accepts."""

from __future__ import annotations

import pytest

from sheep.errors import InvalidParams
from sheep.names import MAX_IQN_BYTES, target_name, validate_label, validate_name


@pytest.mark.parametrize("name", ["disk", "vm-3.root", "My_Disk", "données", "名前", "a" * 202])
def test_ordinary_names_pass(name: str) -> None:
    validate_label(name)


@pytest.mark.parametrize(("name", "why"), [
    ("", "is empty"),
    ("a" * 256, "256 bytes long, over the 255"),
    ("a@b", "contains '@'"),
    ("a/b", "contains '/'"),
    ("a b", "U+0020"),
    ("tab\there", "U+0009"),
    ("evil\u202etxt.exe", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("zero\u200bwidth", "U+200B (ZERO WIDTH SPACE)"),
    ("bad\udcff", "not valid UTF-8"),  # how Python hands over a non-UTF-8 argv byte
    ("e\u0301", "not in Unicode normal form C"),  # é as e + combining acute
])
def test_each_kind_of_bad_name_gets_its_own_one_line_reason(name: str, why: str) -> None:
    with pytest.raises(InvalidParams) as raised:
        validate_name(name)
    assert why in str(raised.value) and "\n" not in str(raised.value)


def test_a_name_whose_target_name_would_pass_223_bytes_is_refused() -> None:
    """A 255-byte name once made a 532-byte IQN; names of other characters than
    a-z 0-9 . - take two bytes each in it."""
    validate_label("x" * 202)
    with pytest.raises(InvalidParams, match="target name would be 224 bytes"):
        validate_label("x" * 203)
    validate_label("X" * 100)
    with pytest.raises(InvalidParams, match="too long for iSCSI"):
        validate_label("X" * 101)


def test_a_snapshot_label_is_checked_as_a_whole() -> None:
    validate_label("disk", "t" * 197)
    with pytest.raises(InvalidParams, match="VDI name and snapshot tag too long"):
        validate_label("disk", "t" * 198)
    assert len(target_name("disk@" + "t" * 197)) == MAX_IQN_BYTES
