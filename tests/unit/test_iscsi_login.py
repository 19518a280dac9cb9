"""The login phase, byte by byte: stages, status codes, operational keys and CHAP."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import pytest

from sheep.gateway.iscsi.connection import Closed, Connection, LoginReady
from sheep.gateway.iscsi.login import AuthPolicy, Chap, decode_binary
from sheep.gateway.iscsi.session import SessionTable

from .iscsi_initiator import TARGET, FakePortal, Initiator, logged_in, text

NAME = "iqn.1994-05.com.example:i"
CHAP = Chap("alice", b"secret-of-alice")
MUTUAL = Chap("target", b"secret-of-target")


def connect(policy: AuthPolicy | None = None) -> tuple[Connection, Initiator]:
    conn = Connection(FakePortal(policy=policy), SessionTable())
    return conn, Initiator(conn)


def md5(ident: int, secret: bytes, challenge: bytes) -> str:
    return "0x" + hashlib.md5(bytes([ident]) + secret + challenge).hexdigest()


def start_chap(conn: Connection, ini: Initiator) -> tuple[int, bytes]:
    """Security stage up to the target's challenge: (CHAP_I, CHAP_C)."""
    ini.login(text(InitiatorName=NAME, TargetName=TARGET, AuthMethod="CHAP,None"),
              csg=0, nsg=1, transit=False)
    first = ini.reply()
    assert first.login_status == 0 and first.pairs()["AuthMethod"] == "CHAP"
    ini.login(text(CHAP_A="7,5"), csg=0, nsg=1, transit=False)
    challenge = ini.reply().pairs()
    assert challenge["CHAP_A"] == "5"
    return int(challenge["CHAP_I"]), bytes.fromhex(challenge["CHAP_C"][2:])


def test_login_without_authentication_reaches_the_full_feature_phase() -> None:
    conn, ini = connect()
    ini.login(text(InitiatorName=NAME, TargetName=TARGET, AuthMethod="None"), csg=0, nsg=1)
    first = ini.reply()
    assert first.login_status == 0
    assert first.flags & 0x80 and (first.flags >> 2) & 3 == 0 and first.flags & 3 == 1
    assert first.pairs() == {"TargetPortalGroupTag": "1", "AuthMethod": "None"}
    ini.login(text(MaxRecvDataSegmentLength="65536"), csg=1, nsg=3)
    assert ini.replies() == []  # held until the owner accepts
    [ready] = conn.events()
    assert isinstance(ready, LoginReady) and ready.info.target_name == TARGET
    assert conn.accept_login()
    final = ini.reply()
    assert final.login_status == 0 and final.flags & 0x83 == 0x83
    assert final.tsih != 0
    declared = final.pairs()["MaxRecvDataSegmentLength"]
    assert declared == str(conn.limits.max_recv_data_segment_length)


def test_statsn_starts_at_the_initiators_expstatsn_and_counts_every_login_response() -> None:
    conn, ini = connect()
    ini.expstatsn = 500
    ini.login(text(InitiatorName=NAME, TargetName=TARGET), csg=0, nsg=1)
    assert ini.reply().statsn == 500
    ini.login(b"", csg=1, nsg=3)
    conn.accept_login()
    assert ini.reply().statsn == 501


def test_unknown_target_is_refused_with_not_found() -> None:
    conn, ini = connect()
    ini.login(text(InitiatorName=NAME, TargetName="iqn.2026-11.io.sheep:nope"), csg=0, nsg=1)
    assert ini.reply().login_status == 0x0203
    assert any(isinstance(e, Closed) for e in conn.events())


def test_target_names_are_compared_without_case() -> None:
    _conn, ini = connect()
    ini.login(text(InitiatorName=NAME, TargetName=TARGET.upper()), csg=0, nsg=1)
    assert ini.reply().login_status == 0


def test_missing_initiator_name_is_a_missing_parameter() -> None:
    _conn, ini = connect()
    ini.login(text(TargetName=TARGET), csg=0, nsg=1)
    assert ini.reply().login_status == 0x0207


def test_normal_session_without_target_name_is_a_missing_parameter() -> None:
    _conn, ini = connect()
    ini.login(text(InitiatorName=NAME), csg=0, nsg=1)
    assert ini.reply().login_status == 0x0207


def test_unsupported_version_is_refused() -> None:
    _conn, ini = connect()
    ini.login(text(InitiatorName=NAME, TargetName=TARGET), csg=0, nsg=1, version_min=1)
    assert ini.reply().login_status == 0x0205


def test_discovery_session_needs_no_target_name() -> None:
    _conn, ini = connect()
    ini.login(text(InitiatorName=NAME, SessionType="Discovery"), csg=0, nsg=1)
    reply = ini.reply()
    assert reply.login_status == 0 and "TargetPortalGroupTag" not in reply.pairs()


def test_a_text_continued_over_two_requests_is_answered_after_the_last() -> None:
    _conn, ini = connect()
    whole = text(InitiatorName=NAME, TargetName=TARGET, AuthMethod="None")
    ini.login(whole[:10], csg=0, nsg=1, transit=False, more=True)
    ask_more = ini.reply()
    assert ask_more.login_status == 0 and ask_more.data == b"" and not ask_more.flags & 0x80
    ini.login(whole[10:], csg=0, nsg=1)
    assert ini.reply().pairs()["AuthMethod"] == "None"


def test_operational_keys_are_answered_with_their_results() -> None:
    conn, ini = connect()
    ini.login(text(InitiatorName=NAME, TargetName=TARGET), csg=0, nsg=1)
    ini.reply()
    ini.login(text(HeaderDigest="CRC32C,None", DataDigest="None", InitialR2T="No",
                   ImmediateData="Yes", MaxBurstLength="16776192", FirstBurstLength="262144",
                   MaxOutstandingR2T="4", ErrorRecoveryLevel="2", MaxConnections="8",
                   DefaultTime2Wait="2", DefaultTime2Retain="20", IFMarker="No",
                   OFMarker="No", DataPDUInOrder="Yes", DataSequenceInOrder="Yes",
                   **{"X-com.example.Foo": "1"}),
              csg=1, nsg=3, transit=False)
    got = ini.reply().pairs()
    assert got["HeaderDigest"] == "CRC32C" and got["DataDigest"] == "None"
    assert got["InitialR2T"] == "No" and got["ImmediateData"] == "Yes"
    assert got["MaxBurstLength"] == str(conn.limits.max_burst_length)
    assert int(got["FirstBurstLength"]) <= int(got["MaxBurstLength"])
    assert got["MaxOutstandingR2T"] == "4" and got["ErrorRecoveryLevel"] == "0"
    assert got["MaxConnections"] == "1" and got["DefaultTime2Retain"] == "0"
    assert got["IFMarker"] == "No" and got["X-com.example.Foo"] == "NotUnderstood"


def test_negotiated_digests_apply_from_the_first_pdu_after_login() -> None:
    ini = logged_in(operational=text(HeaderDigest="CRC32C", DataDigest="CRC32C"))
    ini.nop_out(b"ping")
    reply = ini.reply()  # split() checks both digests
    assert reply.opcode == 0x20 and reply.data == b"ping"


def test_security_keys_in_the_operational_stage_fail_the_login() -> None:
    _conn, ini = connect()
    ini.login(text(InitiatorName=NAME, TargetName=TARGET), csg=1, nsg=3,
              transit=False)
    ini.reply()
    ini.login(text(CHAP_A="5"), csg=1, nsg=3)
    assert ini.reply().login_status == 0x0200


# -- CHAP -----------------------------------------------------------------------------------


def test_chap_with_the_right_secret_logs_in() -> None:
    conn, ini = connect(AuthPolicy(CHAP))
    ident, challenge = start_chap(conn, ini)
    ini.login(text(CHAP_N="alice", CHAP_R=md5(ident, CHAP.secret, challenge)), csg=0, nsg=1)
    reply = ini.reply()
    assert reply.login_status == 0 and reply.flags & 0x80 and reply.flags & 3 == 1
    ini.login(b"", csg=1, nsg=3)
    assert isinstance(conn.events()[0], LoginReady)


def test_chap_with_a_wrong_secret_is_an_authentication_failure() -> None:
    conn, ini = connect(AuthPolicy(CHAP))
    ident, challenge = start_chap(conn, ini)
    ini.login(text(CHAP_N="alice", CHAP_R=md5(ident, b"guess", challenge)), csg=0, nsg=1)
    assert ini.reply().login_status == 0x0201
    assert any(isinstance(e, Closed) for e in conn.events())


def test_chap_with_a_wrong_user_is_an_authentication_failure() -> None:
    conn, ini = connect(AuthPolicy(CHAP))
    ident, challenge = start_chap(conn, ini)
    ini.login(text(CHAP_N="mallory", CHAP_R=md5(ident, CHAP.secret, challenge)), csg=0, nsg=1)
    assert ini.reply().login_status == 0x0201


def test_chap_response_may_be_base64() -> None:
    import base64

    conn, ini = connect(AuthPolicy(CHAP))
    ident, challenge = start_chap(conn, ini)
    raw = hashlib.md5(bytes([ident]) + CHAP.secret + challenge).digest()
    ini.login(text(CHAP_N="alice", CHAP_R="0b" + base64.b64encode(raw).decode()),
              csg=0, nsg=1)
    assert ini.reply().login_status == 0


def test_a_required_chap_cannot_be_skipped_with_authmethod_none() -> None:
    _conn, ini = connect(AuthPolicy(CHAP))
    ini.login(text(InitiatorName=NAME, TargetName=TARGET, AuthMethod="None"), csg=0, nsg=1)
    assert ini.reply().login_status == 0x0201


def test_a_required_chap_cannot_be_skipped_by_starting_in_the_operational_stage() -> None:
    _conn, ini = connect(AuthPolicy(CHAP))
    ini.login(text(InitiatorName=NAME, TargetName=TARGET), csg=1, nsg=3)
    assert ini.reply().login_status == 0x0201


def test_mutual_chap_answers_the_initiators_challenge() -> None:
    conn, ini = connect(AuthPolicy(CHAP, MUTUAL))
    ident, challenge = start_chap(conn, ini)
    mine = bytes(range(100, 116))
    ini.login(text(CHAP_N="alice", CHAP_R=md5(ident, CHAP.secret, challenge), CHAP_I="42",
                   CHAP_C="0x" + mine.hex()), csg=0, nsg=1)
    reply = ini.reply()
    assert reply.login_status == 0
    assert reply.pairs()["CHAP_N"] == "target"
    assert reply.pairs()["CHAP_R"] == md5(42, MUTUAL.secret, mine)


def test_mutual_chap_configured_but_not_asked_for_is_refused() -> None:
    conn, ini = connect(AuthPolicy(CHAP, MUTUAL))
    ident, challenge = start_chap(conn, ini)
    ini.login(text(CHAP_N="alice", CHAP_R=md5(ident, CHAP.secret, challenge)), csg=0, nsg=1)
    assert ini.reply().login_status == 0x0201


def test_mutual_chap_asked_for_but_not_configured_is_refused() -> None:
    conn, ini = connect(AuthPolicy(CHAP))
    ident, challenge = start_chap(conn, ini)
    ini.login(text(CHAP_N="alice", CHAP_R=md5(ident, CHAP.secret, challenge), CHAP_I="1",
                   CHAP_C="0x0102030405060708"), csg=0, nsg=1)
    assert ini.reply().login_status == 0x0201


def test_our_own_challenge_reflected_back_is_refused() -> None:
    conn, ini = connect(AuthPolicy(CHAP, MUTUAL))
    ident, challenge = start_chap(conn, ini)
    ini.login(text(CHAP_N="alice", CHAP_R=md5(ident, CHAP.secret, challenge), CHAP_I="1",
                   CHAP_C="0x" + challenge.hex()), csg=0, nsg=1)
    assert ini.reply().login_status == 0x0201


def test_chap_without_md5_among_the_algorithms_is_refused() -> None:
    _conn, ini = connect(AuthPolicy(CHAP))
    ini.login(text(InitiatorName=NAME, TargetName=TARGET, AuthMethod="CHAP"), csg=0, nsg=1,
              transit=False)
    ini.reply()
    ini.login(text(CHAP_A="7"), csg=0, nsg=1, transit=False)
    assert ini.reply().login_status == 0x0201


@pytest.mark.parametrize(("value", "expected"), [
    ("0x0a0B", b"\x0a\x0b"), ("0XAB", b"\xab"), ("0bAQI=", b"\x01\x02"), ("0x0g", None),
    ("12", None),
])
def test_chap_binary_values_are_hex_or_base64(value: str, expected: bytes | None) -> None:
    assert decode_binary(value) == expected


def test_chap_parses_user_and_secret_and_keeps_colons_in_the_secret() -> None:
    assert Chap.parse("bob:a:b-long-secret") == Chap("bob", b"a:b-long-secret")
    with pytest.raises(ValueError):
        Chap.parse("nosecret")


def test_a_chap_secret_under_12_bytes_is_refused() -> None:
    """A 1-byte secret was accepted; RFC 7143 asks for 96 bits."""
    with pytest.raises(ValueError, match="at least 12"):
        Chap.parse("bob:elevenbytes")
    assert Chap.parse("bob:twelve-bytes").secret == b"twelve-bytes"


def test_chap_secrets_come_from_a_file_only_its_owner_reads(tmp_path: Path) -> None:
    path = tmp_path / "chap"
    path.write_text("bob:a-long-enough-secret\n")
    path.chmod(0o600)
    assert Chap.load(path) == Chap("bob", b"a-long-enough-secret")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="may be read by others"):
        Chap.load(path)
    with pytest.raises(ValueError, match="cannot read"):
        Chap.load(tmp_path / "missing")


# -- an initiator refused without CHAP (a loopback client of another local user) --------------

REFUSED = "iSCSI without CHAP on loopback is only for root (uid 0), not uid 65534"


@pytest.mark.parametrize(("csg", "session"), [
    (0, {"TargetName": TARGET}), (1, {"TargetName": TARGET}), (0, {"SessionType": "Discovery"}),
])
def test_a_refused_initiator_fails_authentication_at_its_first_request(
        csg: int, session: dict[str, str]) -> None:
    conn, ini = connect(AuthPolicy(refused=REFUSED))
    ini.login(text(InitiatorName=NAME, AuthMethod="None", **session), csg=csg, nsg=3)
    reply = ini.reply()
    assert reply.login_status == 0x0201 and reply.data == b""
    assert conn.closed and not any(isinstance(e, LoginReady) for e in conn.events())


def test_chap_admits_an_initiator_that_would_be_refused_without_it() -> None:
    conn, ini = connect(AuthPolicy(CHAP, refused=REFUSED))
    ident, challenge = start_chap(conn, ini)
    ini.login(text(CHAP_N="alice", CHAP_R=md5(ident, CHAP.secret, challenge)), csg=0, nsg=1)
    assert ini.reply().login_status == 0
    ini.login(b"", csg=1, nsg=3)
    assert isinstance(conn.events()[0], LoginReady)


# -- bounded input before authentication -----------------------------------------------------


def test_a_login_pdu_over_8192_bytes_of_data_ends_the_connection() -> None:
    """RFC 7143 §6.1: a login PDU carries at most 8192 bytes; the negotiated
    MaxRecvDataSegmentLength (256 KiB here) applies only after login."""
    conn, ini = connect()
    ini.login(text(InitiatorName=NAME, TargetName=TARGET, AuthMethod="None") + b"\0" * 9000,
              csg=0, nsg=1)
    assert conn.closed and any(isinstance(e, Closed) for e in conn.events())


def test_login_text_continued_without_end_is_refused_with_bounded_memory() -> None:
    """Continued login text (C bit) once grew without limit before authentication, even on
    a CHAP-protected portal."""
    conn, ini = connect(AuthPolicy(chap=CHAP))
    tracemalloc.start()
    try:
        for _ in range(64):  # 512 KiB offered
            ini.login(b"X" * 8192, csg=0, nsg=1, transit=False, more=True)
            if conn.closed:
                break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    statuses = [p.login_status for p in ini.replies()]
    assert statuses[-1] == 0x0200 and all(s == 0 for s in statuses[:-1])  # initiator error
    assert len(statuses) <= 9 and conn.closed
    assert peak < 1 << 20, peak
