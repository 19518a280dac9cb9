"""Which TLS mode a node serves NBD in, and who may attach an export (pure policy)."""

from __future__ import annotations

import pytest

from sheep.gateway.nbd.tls import OPEN, Access, TlsMode, access, choose_mode, psk_peer
from sheep.security.identity import Peer

CLIENT = Peer("client", "vmhost1")
ETCD = Peer("etcd", "etcd")


@pytest.mark.parametrize(("bind", "identity", "mode"), [
    ("127.0.0.1", False, TlsMode.OFF),
    ("::1", False, TlsMode.OFF),
    ("localhost", False, TlsMode.OFF),
    ("127.0.0.1", True, TlsMode.ALLOW),
    ("10.0.0.5", True, TlsMode.REQUIRE),
    ("0.0.0.0", True, TlsMode.REQUIRE),
    ("::", True, TlsMode.REQUIRE),
    ("node1.example", True, TlsMode.REQUIRE),
])
def test_default_mode_follows_the_bind_and_the_identity(bind: str, identity: bool,
                                                        mode: TlsMode) -> None:
    assert choose_mode(None, bind, identity) is mode


@pytest.mark.parametrize("requested", ["require", "allow"])
def test_tls_without_an_identity_is_refused_in_one_line(requested: str) -> None:
    with pytest.raises(ValueError, match=f"--nbd-tls {requested} needs"):
        choose_mode(requested, "127.0.0.1", False)


def test_a_non_loopback_bind_without_an_identity_is_refused_by_default() -> None:
    with pytest.raises(ValueError, match="identity"):
        choose_mode(None, "10.0.0.5", False)


def test_an_explicit_mode_wins_over_the_default() -> None:
    assert choose_mode("require", "127.0.0.1", True) is TlsMode.REQUIRE
    assert choose_mode("off", "10.0.0.5", True) is TlsMode.OFF


def test_before_tls_require_makes_every_export_tls_only() -> None:
    assert access(TlsMode.REQUIRE, None, None) == Access(tls_only=True)


def test_before_tls_allow_serves_exports_without_allow_list_and_not_others() -> None:
    assert access(TlsMode.ALLOW, None, None) == OPEN
    assert access(TlsMode.ALLOW, None, frozenset({"vmhost1"})) == Access(tls_only=True)


def test_off_refuses_an_export_with_an_allow_list() -> None:
    assert access(TlsMode.OFF, None, frozenset({"vmhost1"})).denied
    assert access(TlsMode.OFF, None, None) == OPEN


@pytest.mark.parametrize("role", ["client", "admin", "node"])
def test_any_attaching_role_may_attach_an_export_without_allow_list(role: str) -> None:
    assert access(TlsMode.REQUIRE, Peer(role, "x"), None) == OPEN


def test_an_etcd_certificate_may_not_attach() -> None:
    assert "role etcd" in access(TlsMode.REQUIRE, ETCD, None).denied


def test_the_allow_list_names_who_may_attach() -> None:
    allow = frozenset({"vmhost1"})
    assert access(TlsMode.REQUIRE, CLIENT, allow) == OPEN
    refused = access(TlsMode.REQUIRE, Peer("admin", "admin"), allow)
    assert refused.denied == "admin is not on the export's NBD allow-list"


def test_a_psk_client_is_a_client_named_psk_and_its_identity() -> None:
    assert psk_peer(b"vmhost1") == Peer("client", "psk:vmhost1")


def test_an_allow_list_tells_a_psk_identity_from_a_certificate_of_the_same_name() -> None:
    assert access(TlsMode.REQUIRE, psk_peer(b"vmhost1"), frozenset({"vmhost1"})).denied
    assert access(TlsMode.REQUIRE, CLIENT, frozenset({"psk:vmhost1"})).denied
    assert access(TlsMode.REQUIRE, psk_peer(b"vmhost1"), frozenset({"psk:vmhost1"})) == OPEN
