"""Who may reach a node, decided from its options before it binds: open on loopback,
authenticated anywhere else, and never advertising an address peers cannot dial."""

from __future__ import annotations

import pytest

from sheep.node.exposure import Exposure, refusal, refusals


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_node_may_be_open(bind: str) -> None:
    assert refusals(Exposure(bind=bind)) == []


def test_a_loopback_node_may_serve_iscsi_without_chap() -> None:
    assert refusals(Exposure(bind="127.0.0.1", iscsi=True)) == []


@pytest.mark.parametrize("bind", ["10.213.0.1", "192.168.1.5", "fd00::5", "node7.example"])
def test_a_node_others_can_reach_needs_its_identity(bind: str) -> None:
    assert refusals(Exposure(bind=bind)) == [
        f"--bind {bind} is not a loopback address: a node others can reach needs its "
        "identity (--ca, --cert, --key)"]


def test_a_node_others_can_reach_with_its_identity_may_start() -> None:
    assert refusals(Exposure(bind="10.213.0.1", identity=True)) == []


def test_iscsi_others_can_reach_needs_chap_even_with_an_identity() -> None:
    assert refusals(Exposure(bind="10.213.0.1", identity=True, iscsi=True)) == [
        "--bind 10.213.0.1 is not a loopback address: iSCSI there needs CHAP "
        "(--iscsi-chap-file)"]


def test_iscsi_others_can_reach_with_chap_may_start() -> None:
    assert refusals(Exposure(bind="10.213.0.1", identity=True, iscsi=True,
                             iscsi_chap=True)) == []


@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
def test_listening_on_every_address_needs_an_advertised_one(bind: str) -> None:
    assert (f"--bind {bind} listens on every address: peers need --advertise ADDRESS, the "
            "one they can dial") in refusals(Exposure(bind=bind, identity=True))


@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
def test_listening_on_every_address_is_not_loopback(bind: str) -> None:
    found = refusals(Exposure(bind=bind, advertise="10.213.0.1"))
    assert found == [f"--bind {bind} is not a loopback address: a node others can reach "
                     "needs its identity (--ca, --cert, --key)"]


@pytest.mark.parametrize("advertise", ["10.213.0.1", "fd00::5", "node7.example.com"])
def test_every_address_with_an_advertised_one_and_an_identity_may_start(
        advertise: str) -> None:
    assert refusals(Exposure(bind="0.0.0.0", advertise=advertise, identity=True)) == []


@pytest.mark.parametrize("advertise", ["0.0.0.0", "::", "10.0.0.1:7000", "[fd00::5]",
                                       "224.0.0.1", "no such host"])
def test_an_advertised_address_must_be_one_peers_can_dial(advertise: str) -> None:
    assert refusals(Exposure(bind="0.0.0.0", advertise=advertise, identity=True)) == [
        f"--advertise {advertise} is not an address peers can dial: give this node's own "
        "address (no port, no brackets)"]


def test_every_reason_is_given_on_one_line() -> None:
    line = refusal(Exposure(bind="0.0.0.0", iscsi=True))
    assert line is not None and "\n" not in line
    assert line.count("; ") == 2  # no --advertise, no identity, no CHAP


def test_no_reason_is_none() -> None:
    assert refusal(Exposure(bind="127.0.0.1")) is None
