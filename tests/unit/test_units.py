"""Human sizes as people type them."""

from __future__ import annotations

import pytest

from sheep.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("4k", 4096), ("4K", 4096), ("4KiB", 4096), ("4M", 4 << 20),
     ("1.5G", 3 << 29), ("2T", 2 << 40), (" 10g ", 10 << 30)],
)
def test_parse_size_accepts_plain_bytes_and_binary_units(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1", "4X", "1.3", "0.5k0"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(("text", "value"), [
    ("9007199254740993", 2**53 + 1),  # a float would make it 2**53
    ("18446744073709551617", 2**64 + 1),
    ("4.000000000000000001T", None),  # a float would round it to exactly 4T
    ("0.1k", None),  # 102.4 bytes
])
def test_parse_size_is_exact_where_a_float_would_round(text: str, value: int | None) -> None:
    if value is None:
        with pytest.raises(ValueError, match="not a whole number of bytes"):
            parse_size(text)
    else:
        assert parse_size(text) == value


def test_format_size_uses_the_largest_fitting_unit() -> None:
    assert format_size(512) == "512 B"
    assert format_size(4 << 20) == "4 MiB"
    assert format_size(1536) == "1.5 KiB"
