"""Text data and key negotiation (RFC 7143 §6, §13), and target names."""

from __future__ import annotations

import pytest

from sheep.gateway.iscsi.text import Limits, Params, TextError, encode, negotiate_key, parse
from sheep.names import export_name, spelled_export, target_name


def answer(key: str, value: str, params: Params | None = None) -> tuple[str, str] | None:
    return negotiate_key(key, value, params or Params(), Limits())


def test_text_round_trips_key_value_pairs_in_order() -> None:
    pairs = [("TargetName", "iqn.x:y"), ("TargetAddress", "1.2.3.4:3260,1"), ("A", "")]
    assert parse(encode(pairs)) == pairs


def test_trailing_nul_padding_is_ignored() -> None:
    assert parse(b"A=1\0\0\0\0") == [("A", "1")]


@pytest.mark.parametrize("raw", [b"novalue\0", b"=x\0", b"A=\xff\0"])
def test_malformed_text_is_an_error(raw: bytes) -> None:
    with pytest.raises(TextError):
        parse(raw)


def test_digest_is_the_first_of_the_initiators_list_we_support() -> None:
    params = Params()
    assert answer("HeaderDigest", "CRC32C,None", params) == ("HeaderDigest", "CRC32C")
    assert params.header_digest
    assert answer("DataDigest", "Other,None") == ("DataDigest", "None")
    assert answer("DataDigest", "Other") == ("DataDigest", "Reject")


def test_numeric_keys_take_the_smaller_value() -> None:
    params = Params()
    assert answer("MaxBurstLength", "512", params) == ("MaxBurstLength", "512")
    assert answer("FirstBurstLength", "65536", params) == ("FirstBurstLength", "512")
    big = str(1 << 23)
    assert answer("MaxBurstLength", big) == ("MaxBurstLength", str(Limits().max_burst_length))


def test_out_of_range_numbers_are_rejected_and_the_default_stays() -> None:
    params = Params()
    assert answer("MaxBurstLength", "100", params) == ("MaxBurstLength", "Reject")
    assert answer("MaxOutstandingR2T", "zero", params) == ("MaxOutstandingR2T", "Reject")
    assert params.max_burst_length == 262144


def test_initial_r2t_follows_the_initiator_and_immediate_data_too() -> None:
    params = Params()
    assert answer("InitialR2T", "No", params) == ("InitialR2T", "No")
    assert answer("ImmediateData", "No", params) == ("ImmediateData", "No")
    assert not params.initial_r2t and not params.immediate_data


def test_max_recv_data_segment_length_is_declarative() -> None:
    params = Params()
    assert answer("MaxRecvDataSegmentLength", "4096", params) is None
    assert params.max_recv_data_segment_length == 4096


def test_error_recovery_level_is_always_0() -> None:
    assert answer("ErrorRecoveryLevel", "2") == ("ErrorRecoveryLevel", "0")


def test_unknown_and_private_keys_are_not_understood() -> None:
    assert answer("X-com.example.Thing", "1") == ("X-com.example.Thing", "NotUnderstood")
    assert answer("Bogus", "1") == ("Bogus", "NotUnderstood")


@pytest.mark.parametrize(("export", "iqn"), [
    ("disk1", "iqn.2026-11.io.sheep:disk1"),
    ("vm-3.root", "iqn.2026-11.io.sheep:vm-3.root"),
    ("disk1@snap-1", "iqn.2026-11.io.sheep:disk1:snap-1"),
    ("MyDisk", "iqn.2026-11.io.sheep:.4d794469736b"),
    ("a:b@T", "iqn.2026-11.io.sheep:.613a62:.54"),
])
def test_exports_have_valid_iqns_that_map_back(export: str, iqn: str) -> None:
    assert target_name(export) == iqn
    assert export_name(iqn) == export
    assert export_name(iqn.upper()) == export


@pytest.mark.parametrize("iqn", ["iqn.2026-11.io.sheep:", "iqn.2000-01.com.other:disk",
                                 "iqn.2026-11.io.sheep:.zz", "iqn.2026-11.io.sheep:Bad_Name"])
def test_names_that_are_not_ours_map_to_nothing(iqn: str) -> None:
    assert export_name(iqn) is None


@pytest.mark.parametrize(("iqn", "literal"), [
    ("iqn.2026-11.io.sheep:Disk", "Disk"),
    ("IQN.2026-11.IO.SHEEP:Disk:Tag", "Disk@Tag"),
    ("iqn.2026-11.io.sheep:disk", None),  # spelled as it names
    ("iqn.2026-11.io.sheep:.4469736B", None),  # hex: no other reading
    ("iqn.2000-01.com.other:Disk", None),
])
def test_a_name_sent_in_another_case_is_known_by_what_it_spells(iqn: str,
                                                                 literal: str | None) -> None:
    assert spelled_export(iqn) == literal
