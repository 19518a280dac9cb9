"""A client the adapter found may not negotiate in plaintext (`plaintext_refused`: a
loopback client of another local user, sheep/netpeer.py), byte for byte: every option but
STARTTLS and ABORT is refused with the reason until TLS is up, as ERR_TLS_REQD where TLS
is offered and ERR_POLICY where it is not; inside TLS it is served as anyone.
"""

from __future__ import annotations

import struct

import pytest

from sheep.gateway.nbd import Closed, HandshakeDone, NeedData, ServerHandshake, StartTls, TlsMode

from .test_nbd_handshake import (
    ABORT,
    ACK,
    DISK,
    EXPORT_NAME,
    GO,
    INFO,
    LIST,
    LIST_META_CONTEXT,
    STARTTLS,
    STRUCTURED_REPLY,
    Catalog,
    info_request,
    meta_request,
    opt,
    rep,
)

ERR_POLICY, ERR_TLS_REQD = 2**31 + 2, 2**31 + 5
WHY = "plaintext NBD on loopback is only for root (uid 0), not uid 65534; use TLS"


def started(mode: TlsMode, refused: str = WHY) -> ServerHandshake:
    hs = ServerHandshake(Catalog(DISK), tls=mode, plaintext_refused=refused)
    hs.initial_bytes()
    hs.receive_data(struct.pack(">I", 0b11))
    assert hs.next_event() == NeedData()
    return hs


def exchange(hs: ServerHandshake, data: bytes) -> bytes:
    hs.receive_data(data)
    return hs.data_to_send()


@pytest.mark.parametrize(("code", "data"), [
    (LIST, b""), (INFO, info_request("disk")), (GO, info_request("disk")),
    (STRUCTURED_REPLY, b""), (LIST_META_CONTEXT, meta_request("disk")), (42, b"xyz"),
])
def test_under_allow_every_option_gets_err_tls_reqd_with_the_reason(code: int,
                                                                   data: bytes) -> None:
    hs = started(TlsMode.ALLOW)
    assert exchange(hs, opt(code, data)) == rep(code, ERR_TLS_REQD, WHY.encode())
    assert hs.next_event() == NeedData()


@pytest.mark.parametrize("code", [LIST, GO, STARTTLS])
def test_under_off_options_get_err_policy_since_no_tls_is_offered(code: int) -> None:
    hs = started(TlsMode.OFF)
    data = info_request("disk") if code == GO else b""
    assert exchange(hs, opt(code, data)) == rep(code, ERR_POLICY, WHY.encode())


def test_export_name_is_hung_up_on_with_the_reason() -> None:
    hs = started(TlsMode.ALLOW)
    assert exchange(hs, opt(EXPORT_NAME, b"disk")) == b""
    event = hs.next_event()
    assert isinstance(event, Closed) and WHY in event.reason


def test_abort_is_still_acked() -> None:
    hs = started(TlsMode.ALLOW)
    assert exchange(hs, opt(ABORT)) == rep(ABORT, ACK)
    assert hs.next_event() == Closed("client sent NBD_OPT_ABORT", clean=True)


def test_inside_tls_the_client_is_served() -> None:
    hs = started(TlsMode.ALLOW)
    assert exchange(hs, opt(STARTTLS)) == rep(STARTTLS, ACK)
    assert hs.next_event() == StartTls()
    hs.tls_started()
    assert exchange(hs, opt(GO, info_request("disk"))).endswith(rep(GO, ACK))
    assert isinstance(hs.next_event(), HandshakeDone)


def test_without_a_refusal_plaintext_is_served_as_before() -> None:
    hs = started(TlsMode.ALLOW, refused="")
    assert exchange(hs, opt(GO, info_request("disk"))).endswith(rep(GO, ACK))
    assert isinstance(hs.next_event(), HandshakeDone)
