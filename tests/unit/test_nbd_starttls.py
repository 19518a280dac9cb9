"""NBD_OPT_STARTTLS in the server handshake, byte for byte, in each TLS mode.

Pure: the TLS session itself is the adapter's; here the handshake is told when it is up
(tls_started) and must refuse, acknowledge and forget exactly as the spec's TLS section
says (FORCEDTLS for `require`, SELECTIVETLS for `allow`, NOTLS for `off`). Numbers are
spelled out from the spec, not taken from sheep's constants.
"""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from sheep.gateway.nbd import (
    Closed,
    ExportInfo,
    HandshakeDone,
    NeedData,
    ServerHandshake,
    StartTls,
    TlsMode,
)

from .test_nbd_handshake import (
    ABORT,
    ACK,
    DISK,
    DISK_FLAGS,
    ERR_INVALID,
    ERR_UNSUP,
    EXPORT_NAME,
    GO,
    INFO,
    LIST,
    LIST_META_CONTEXT,
    SERVER,
    STARTTLS,
    STRUCTURED_REPLY,
    Catalog,
    info_export,
    info_request,
    meta_request,
    opt,
    rep,
)

ERR_POLICY, ERR_TLS_REQD = 2**31 + 2, 2**31 + 5
TLS_REQUIRED = b"TLS required"

SECRET = replace(DISK, name="secret", tls_only=True)  # has an allow-list: TLS only
BARRED = replace(DISK, name="barred", denied="client3 is not on the export's allow-list")


def started(mode: TlsMode, *exports: ExportInfo) -> ServerHandshake:
    hs = ServerHandshake(Catalog(*(exports or (DISK,))), tls=mode)
    hs.initial_bytes()
    hs.receive_data(struct.pack(">I", 0b11))
    assert hs.next_event() == NeedData()
    return hs


def exchange(hs: ServerHandshake, data: bytes) -> bytes:
    hs.receive_data(data)
    return hs.data_to_send()


def in_tls(mode: TlsMode, *exports: ExportInfo) -> ServerHandshake:
    """A handshake whose client has started TLS, as the adapter reports it."""
    hs = started(mode, *exports)
    assert exchange(hs, opt(STARTTLS)) == rep(STARTTLS, ACK)
    assert hs.next_event() == StartTls()
    hs.tls_started()
    assert hs.next_event() == NeedData()
    return hs


# -- require (FORCEDTLS) --------------------------------------------------------------------


@pytest.mark.parametrize(("code", "data"), [
    (LIST, b""), (INFO, info_request("disk")), (GO, info_request("disk")),
    (STRUCTURED_REPLY, b""), (LIST_META_CONTEXT, meta_request("disk")), (42, b"xyz"),
])
def test_require_refuses_every_option_before_tls_with_err_tls_reqd(code: int,
                                                                   data: bytes) -> None:
    hs = started(TlsMode.REQUIRE)
    assert exchange(hs, opt(code, data)) == rep(code, ERR_TLS_REQD, TLS_REQUIRED)
    assert hs.next_event() == NeedData()


def test_require_closes_on_export_name_before_tls() -> None:
    hs = started(TlsMode.REQUIRE)
    assert exchange(hs, opt(EXPORT_NAME, b"disk")) == b""
    event = hs.next_event()
    assert isinstance(event, Closed) and "TLS" in event.reason


def test_require_still_acks_abort_before_tls() -> None:
    hs = started(TlsMode.REQUIRE)
    assert exchange(hs, opt(ABORT)) == rep(ABORT, ACK)
    assert hs.next_event() == Closed("client sent NBD_OPT_ABORT", clean=True)


def test_starttls_is_acked_and_nothing_is_parsed_until_tls_is_up() -> None:
    hs = started(TlsMode.REQUIRE)
    assert exchange(hs, opt(STARTTLS)) == rep(STARTTLS, ACK)
    assert hs.next_event() == StartTls()
    assert hs.next_event() == StartTls()  # until the adapter reports the session


def test_plaintext_after_starttls_before_the_tls_handshake_closes() -> None:
    hs = started(TlsMode.REQUIRE)
    assert exchange(hs, opt(STARTTLS) + opt(LIST)) == rep(STARTTLS, ACK)
    assert isinstance(hs.next_event(), Closed)


def test_plaintext_arriving_while_tls_is_pending_closes() -> None:
    hs = started(TlsMode.REQUIRE)
    exchange(hs, opt(STARTTLS))
    assert exchange(hs, opt(LIST)) == b""
    event = hs.next_event()
    assert isinstance(event, Closed) and "before the TLS handshake" in event.reason


def test_inside_tls_options_are_served() -> None:
    hs = in_tls(TlsMode.REQUIRE)
    assert exchange(hs, opt(LIST)) == rep(LIST, SERVER, struct.pack(">I", 4) + b"disk" +
                                          b"a test disk") + rep(LIST, ACK)
    assert exchange(hs, opt(GO, info_request("disk"))) == (info_export(DISK.size, DISK_FLAGS)
                                                          + rep(GO, ACK))
    assert isinstance(hs.next_event(), HandshakeDone)
    assert hs.tls_active


def test_a_second_starttls_is_invalid() -> None:
    hs = in_tls(TlsMode.REQUIRE)
    assert exchange(hs, opt(STARTTLS)) == rep(STARTTLS, ERR_INVALID, b"TLS already started")
    assert hs.next_event() == NeedData()


@pytest.mark.parametrize("mode", [TlsMode.REQUIRE, TlsMode.ALLOW])
def test_starttls_with_data_is_invalid_and_negotiation_continues(mode: TlsMode) -> None:
    hs = started(mode)
    assert exchange(hs, opt(STARTTLS, b"x")) == rep(STARTTLS, ERR_INVALID, b"unexpected data")
    assert hs.next_event() == NeedData()
    assert exchange(hs, opt(STARTTLS)) == rep(STARTTLS, ACK)


def test_negotiation_before_starttls_is_forgotten() -> None:
    """The spec: after STARTTLS the server MUST NOT keep structured replies (nor meta
    contexts) negotiated in plaintext; so GO's transmission flags lack SEND_DF."""
    hs = started(TlsMode.ALLOW)
    assert exchange(hs, opt(STRUCTURED_REPLY)) == rep(STRUCTURED_REPLY, ACK)
    exchange(hs, opt(STARTTLS))
    hs.tls_started()
    assert exchange(hs, opt(GO, info_request("disk"))) == (info_export(DISK.size, DISK_FLAGS)
                                                          + rep(GO, ACK))
    done = hs.next_event()
    assert isinstance(done, HandshakeDone) and not done.structured_replies


def test_tls_started_without_starttls_is_a_bug() -> None:
    hs = started(TlsMode.REQUIRE)
    with pytest.raises(RuntimeError):
        hs.tls_started()


def test_options_sent_with_the_tls_records_are_read_after_tls_started() -> None:
    """Bytes the adapter feeds once TLS is up are parsed as options again."""
    hs = started(TlsMode.REQUIRE)
    exchange(hs, opt(STARTTLS))
    hs.tls_started()
    assert exchange(hs, opt(ABORT)) == rep(ABORT, ACK)
    assert isinstance(hs.next_event(), Closed)


# -- allow (SELECTIVETLS) -------------------------------------------------------------------


def test_allow_serves_plaintext_clients_exports_without_an_allow_list() -> None:
    hs = started(TlsMode.ALLOW, DISK, SECRET)
    assert exchange(hs, opt(GO, info_request("disk"))).endswith(rep(GO, ACK))
    assert isinstance(hs.next_event(), HandshakeDone)


def test_allow_refuses_a_tls_only_export_before_tls_with_err_tls_reqd() -> None:
    hs = started(TlsMode.ALLOW, DISK, SECRET)
    for code in (INFO, GO):
        assert exchange(hs, opt(code, info_request("secret"))) == rep(
            code, ERR_TLS_REQD, b"export 'secret' needs TLS")
    assert hs.next_event() == NeedData()


def test_allow_closes_on_export_name_of_a_tls_only_export_before_tls() -> None:
    hs = started(TlsMode.ALLOW, DISK, SECRET)
    assert exchange(hs, opt(EXPORT_NAME, b"secret")) == b""
    assert isinstance(hs.next_event(), Closed)


def test_allow_serves_a_tls_only_export_inside_tls() -> None:
    hs = in_tls(TlsMode.ALLOW, DISK, SECRET)
    assert exchange(hs, opt(GO, info_request("secret"))).endswith(rep(GO, ACK))
    done = hs.next_event()
    assert isinstance(done, HandshakeDone) and done.export.name == "secret"


# -- exports this client may not attach ---------------------------------------------------


@pytest.mark.parametrize("mode", list(TlsMode))
def test_a_denied_export_is_err_policy_with_the_reason(mode: TlsMode) -> None:
    hs = in_tls(mode, DISK, BARRED) if mode is not TlsMode.OFF else started(mode, DISK, BARRED)
    for code in (INFO, GO):
        assert exchange(hs, opt(code, info_request("barred"))) == rep(
            code, ERR_POLICY, BARRED.denied.encode())
    assert hs.next_event() == NeedData()


def test_a_denied_export_closes_on_export_name() -> None:
    hs = in_tls(TlsMode.REQUIRE, DISK, BARRED)
    assert exchange(hs, opt(EXPORT_NAME, b"barred")) == b""
    assert isinstance(hs.next_event(), Closed)


def test_a_denied_export_gives_no_meta_contexts() -> None:
    hs = in_tls(TlsMode.REQUIRE, DISK, BARRED)
    exchange(hs, opt(STRUCTURED_REPLY))
    assert exchange(hs, opt(LIST_META_CONTEXT, meta_request("barred"))) == rep(
        LIST_META_CONTEXT, ERR_POLICY, BARRED.denied.encode())


# -- off (NOTLS) ----------------------------------------------------------------------------


def test_off_answers_starttls_as_before_tls_existed() -> None:
    hs = started(TlsMode.OFF)
    assert exchange(hs, opt(STARTTLS)) == rep(STARTTLS, ERR_UNSUP, b"unsupported option")
    assert hs.next_event() == NeedData()


def test_off_never_sends_err_tls_reqd_even_for_a_tls_only_export() -> None:
    hs = started(TlsMode.OFF, DISK, SECRET)
    reply = exchange(hs, opt(GO, info_request("secret")))
    assert reply == rep(GO, ERR_POLICY, b"export needs TLS, which this server does not offer")
