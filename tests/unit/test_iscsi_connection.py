"""The full feature phase of one connection, byte by byte: SCSI commands with Data-Out
(immediate, unsolicited, R2T-solicited), Data-In and residuals, the CmdSN window, NOP,
Text, task management, logout, session reinstatement and malformed input."""

from __future__ import annotations

import struct
import tracemalloc

from sheep.gateway.iscsi.connection import Closed, Connection, Execute
from sheep.gateway.iscsi.session import SessionTable

from .iscsi_initiator import NO_TAG, TARGET, FakePortal, In, Initiator, logged_in, text

READ10 = 0x28
WRITE10 = 0x2A
TUR = bytes(6)
SCSI_RESPONSE, DATA_IN, R2T, NOP_IN, TMF_RESPONSE, TEXT_RESPONSE = (
    0x21, 0x25, 0x31, 0x20, 0x22, 0x24)
LOGOUT_RESPONSE, REJECT = 0x26, 0x3F


def read10(blocks: int) -> bytes:
    return bytes([READ10, 0, 0, 0, 0, 0, 0]) + blocks.to_bytes(2, "big") + b"\0"


def write10(blocks: int) -> bytes:
    return bytes([WRITE10, 0, 0, 0, 0, 0, 0]) + blocks.to_bytes(2, "big") + b"\0"


def executes(ini: Initiator) -> list[Execute]:
    return [e for e in ini.conn.events() if isinstance(e, Execute)]


def closed(ini: Initiator) -> bool:
    return ini.conn.closed and any(isinstance(e, Closed) for e in ini.conn.events())


def residual(pdu: In) -> tuple[str, int]:
    kind = "over" if pdu.flags & 0x04 else "under" if pdu.flags & 0x02 else ""
    return kind, pdu.u32(44)


# -- reads ----------------------------------------------------------------------------------


def test_read_data_is_split_by_the_initiators_max_recv_data_segment_length() -> None:
    ini = logged_in(operational=text(MaxRecvDataSegmentLength="4096"))
    itt = ini.scsi(read10(20), edtl=10240, read=True)
    [_ex] = executes(ini)
    ini.conn.complete(itt, 0, bytes(range(256)) * 40)
    pdus = ini.replies()
    assert [p.opcode for p in pdus] == [DATA_IN] * 3
    assert [len(p.data) for p in pdus] == [4096, 4096, 2048]
    assert [p.u32(40) for p in pdus] == [0, 4096, 8192]  # buffer offsets
    assert [p.u32(36) for p in pdus] == [0, 1, 2]  # DataSN
    assert b"".join(p.data for p in pdus) == bytes(range(256)) * 40


def test_good_status_rides_in_the_last_data_in() -> None:
    ini = logged_in()
    itt = ini.scsi(read10(1), edtl=512, read=True)
    ini.conn.complete(itt, 0, b"x" * 512)
    [pdu] = ini.replies()
    assert pdu.opcode == DATA_IN and pdu.flags & 0x81 == 0x81 and pdu.bhs[3] == 0
    assert pdu.itt == itt and residual(pdu) == ("", 0)


def test_data_in_beyond_the_expected_length_is_cut_and_counted_as_overflow() -> None:
    ini = logged_in()
    itt = ini.scsi(read10(1), edtl=200, read=True)
    ini.conn.complete(itt, 0, b"x" * 512)
    [pdu] = ini.replies()
    assert len(pdu.data) == 200 and residual(pdu) == ("over", 312)


def test_data_in_short_of_the_expected_length_is_counted_as_underflow() -> None:
    ini = logged_in()
    itt = ini.scsi(read10(1), edtl=10000, read=True)
    ini.conn.complete(itt, 0, b"x" * 512)
    [pdu] = ini.replies()
    assert len(pdu.data) == 512 and residual(pdu) == ("under", 9488)


def test_a_read_with_no_expected_length_sends_only_status_with_overflow() -> None:
    ini = logged_in()
    itt = ini.scsi(read10(1), edtl=0, read=True)
    ini.conn.complete(itt, 0, b"x" * 512)
    [pdu] = ini.replies()
    assert pdu.opcode == SCSI_RESPONSE and residual(pdu) == ("over", 512)


def test_check_condition_goes_in_a_scsi_response_with_sense_length_prefix() -> None:
    ini = logged_in()
    itt = ini.scsi(read10(1), edtl=512, read=True)
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0])
    ini.conn.complete(itt, 2, b"", sense)
    [pdu] = ini.replies()
    assert pdu.opcode == SCSI_RESPONSE and pdu.bhs[3] == 2
    assert pdu.data == struct.pack(">H", len(sense)) + sense


def test_statsn_advances_by_one_per_response() -> None:
    ini = logged_in()
    first = ini.scsi(TUR)
    second = ini.scsi(TUR)
    ini.conn.complete(first, 0)
    ini.conn.complete(second, 0)
    a, b = ini.replies()
    assert b.statsn == a.statsn + 1


def test_commands_to_another_lun_get_logical_unit_not_supported() -> None:
    ini = logged_in()
    ini.scsi(TUR, lun=1 << 48)
    assert executes(ini) == []
    [pdu] = ini.replies()
    assert pdu.bhs[3] == 2 and pdu.data[2 + 2] == 0x05 and pdu.data[2 + 12] == 0x25


def test_report_luns_to_another_lun_still_reaches_the_lun() -> None:
    ini = logged_in()
    ini.scsi(bytes([0xA0]) + bytes(11), edtl=16, read=True, lun=1 << 48)
    assert len(executes(ini)) == 1


# -- writes ---------------------------------------------------------------------------------


def test_a_write_carried_entirely_as_immediate_data_executes_at_once() -> None:
    ini = logged_in()
    ini.scsi(write10(2), edtl=1024, write=True, data=b"a" * 1024)
    [ex] = executes(ini)
    assert bytes(ex.data_out) == b"a" * 1024 and ex.cdb[:10] == write10(2)


def test_the_rest_of_a_write_is_solicited_with_r2ts_within_max_burst_length() -> None:
    ini = logged_in(operational=text(ImmediateData="No", MaxBurstLength="4096",
                                     MaxOutstandingR2T="2"))
    itt = ini.scsi(write10(24), edtl=12288, write=True)
    r2ts = ini.replies()
    assert [p.opcode for p in r2ts] == [R2T, R2T]  # MaxOutstandingR2T
    assert [(p.u32(36), p.u32(40), p.u32(44)) for p in r2ts] == [(0, 0, 4096), (1, 4096, 4096)]
    ttts = [p.u32(20) for p in r2ts]
    ini.data_out(itt, ttts[0], b"a" * 4096, offset=0, datasn=0)
    [third] = ini.replies()
    assert (third.u32(36), third.u32(40), third.u32(44)) == (2, 8192, 4096)
    ini.data_out(itt, ttts[1], b"b" * 2048, offset=4096, datasn=0, final=False)
    ini.data_out(itt, ttts[1], b"c" * 2048, offset=6144, datasn=1)
    ini.data_out(itt, third.u32(20), b"d" * 4096, offset=8192, datasn=0)
    [ex] = executes(ini)
    assert bytes(ex.data_out) == b"a" * 4096 + b"b" * 2048 + b"c" * 2048 + b"d" * 4096


def test_immediate_and_unsolicited_data_then_r2t_for_the_rest() -> None:
    ini = logged_in(operational=text(InitialR2T="No", FirstBurstLength="2048"))
    itt = ini.scsi(write10(8), edtl=4096, write=True, data=b"i" * 512, final=False)
    assert ini.replies() == []  # unsolicited Data-Out may still come
    ini.data_out(itt, NO_TAG, b"u" * 1536, offset=512, datasn=0)
    [solicit] = ini.replies()
    assert (solicit.u32(40), solicit.u32(44)) == (2048, 2048)
    ini.data_out(itt, solicit.u32(20), b"s" * 2048, offset=2048, datasn=0)
    [ex] = executes(ini)
    assert bytes(ex.data_out) == b"i" * 512 + b"u" * 1536 + b"s" * 2048


def test_write_residual_underflow_when_more_is_sent_than_the_cdb_writes() -> None:
    ini = logged_in()
    itt = ini.scsi(write10(1), edtl=1024, write=True, data=b"a" * 1024)
    [ex] = executes(ini)
    assert len(ex.data_out) == 1024 and ex.expected_length == 1024
    ini.conn.complete(itt, 0)
    [pdu] = ini.replies()
    assert pdu.bhs[3] == 0 and residual(pdu) == ("under", 512)


def test_write_overflow_passes_what_was_sent_and_counts_the_rest() -> None:
    ini = logged_in()
    itt = ini.scsi(write10(2), edtl=512, write=True, data=b"a" * 512)
    [ex] = executes(ini)
    assert bytes(ex.data_out) == b"a" * 512
    ini.conn.complete(itt, 0)
    [pdu] = ini.replies()
    assert pdu.bhs[3] == 0 and residual(pdu) == ("over", 512)


# -- memory: Data-Out is buffered within a budget ------------------------------------------


def test_a_write_announcing_more_than_the_budget_is_refused_without_buffering_it() -> None:
    """Two 48-byte PDUs announcing 4 GiB each once made the target allocate 8 GiB."""
    tracemalloc.start()
    try:
        ini = logged_in(operational=text(ImmediateData="No"))
        first = ini.scsi(write10(0xFFFF), edtl=0xFFFFFFFF, write=True)
        second = ini.scsi(write10(0xFFFF), edtl=0xFFFFFFFF, write=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    assert executes(ini) == []
    pdus = ini.replies()
    assert [(p.opcode, p.itt) for p in pdus] == [(SCSI_RESPONSE, first), (SCSI_RESPONSE, second)]
    for pdu in pdus:  # CHECK CONDITION, ILLEGAL REQUEST, INVALID FIELD IN CDB
        assert pdu.bhs[3] == 2 and pdu.data[2 + 2] == 0x05 and pdu.data[2 + 12] == 0x24


def test_writes_beyond_the_budget_are_solicited_only_as_earlier_ones_finish() -> None:
    conn = Connection(FakePortal(), SessionTable(), write_budget=8192)
    ini = logged_in(conn, operational=text(ImmediateData="No", MaxBurstLength="8192"))
    first = ini.scsi(write10(16), edtl=8192, write=True)
    second = ini.scsi(write10(16), edtl=8192, write=True)
    [r2t] = ini.replies()  # none for the second yet: the budget is the first's
    assert (r2t.opcode, r2t.itt) == (R2T, first)
    ini.data_out(first, r2t.u32(20), b"a" * 8192, offset=0, datasn=0)
    [ex] = executes(ini)
    assert ini.replies() == []
    ini.conn.complete(first, 0)
    response, r2t2 = sorted(ini.replies(), key=lambda p: p.opcode)
    assert (response.opcode, response.itt) == (SCSI_RESPONSE, first)
    assert (r2t2.opcode, r2t2.itt, r2t2.u32(44)) == (R2T, second, 8192)
    ini.data_out(second, r2t2.u32(20), b"b" * 8192, offset=0, datasn=0)
    [ex] = executes(ini)
    assert bytes(ex.data_out) == b"b" * 8192


def test_unsolicited_data_of_a_write_waiting_for_budget_is_kept() -> None:
    conn = Connection(FakePortal(), SessionTable(), write_budget=4096)
    ini = logged_in(conn, operational=text(InitialR2T="No", FirstBurstLength="1024",
                                           MaxBurstLength="4096"))
    first = ini.scsi(write10(8), edtl=4096, write=True, data=b"i" * 1024)
    [r2t] = ini.replies()
    second = ini.scsi(write10(8), edtl=4096, write=True, data=b"j" * 512, final=False)
    ini.data_out(second, NO_TAG, b"u" * 512, offset=512, datasn=0)
    assert ini.replies() == []  # the second waits for budget
    ini.data_out(first, r2t.u32(20), b"a" * 3072, offset=1024, datasn=0)
    [ex] = executes(ini)
    ini.conn.complete(first, 0)
    _, r2t2 = sorted(ini.replies(), key=lambda p: p.opcode)
    assert (r2t2.itt, r2t2.u32(40), r2t2.u32(44)) == (second, 1024, 3072)
    ini.data_out(second, r2t2.u32(20), b"s" * 3072, offset=1024, datasn=0)
    [ex] = executes(ini)
    assert bytes(ex.data_out) == b"j" * 512 + b"u" * 512 + b"s" * 3072


def data_phase_error(pdus: list[In]) -> bool:
    """A Reject of the bad Data-Out, then the task's CHECK CONDITION (DATA PHASE ERROR)."""
    if [p.opcode for p in pdus] != [REJECT, SCSI_RESPONSE]:
        return False
    sense = pdus[1].data[2:]
    return pdus[1].bhs[3] == 2 and (sense[2] & 0x0F, sense[12]) == (0x0B, 0x4B)


def test_data_out_with_a_wrong_datasn_fails_the_task_but_not_the_connection() -> None:
    ini = logged_in(operational=text(ImmediateData="No"))
    itt = ini.scsi(write10(2), edtl=1024, write=True)
    [solicit] = ini.replies()
    ini.data_out(itt, solicit.u32(20), b"a" * 512, offset=0, datasn=0, final=False)
    ini.data_out(itt, solicit.u32(20), b"a" * 512, offset=512, datasn=0)
    assert data_phase_error(ini.replies())
    assert executes(ini) == [] and not ini.conn.closed
    ini.nop_out(b"still here")
    assert ini.reply().data == b"still here"


def test_data_out_at_a_wrong_offset_fails_the_task_and_its_later_data_is_dropped() -> None:
    ini = logged_in(operational=text(ImmediateData="No"))
    itt = ini.scsi(write10(2), edtl=1024, write=True)
    [solicit] = ini.replies()
    ini.data_out(itt, solicit.u32(20), b"a" * 512, offset=512, datasn=1, final=False)
    ini.data_out(itt, solicit.u32(20), b"a" * 512, offset=0, datasn=0)
    assert data_phase_error(ini.replies())
    assert executes(ini) == [] and not ini.conn.closed


def test_unsolicited_data_out_when_initial_r2t_is_yes_fails_the_task() -> None:
    ini = logged_in(operational=text(ImmediateData="No"))
    itt = ini.scsi(write10(1), edtl=512, write=True, final=False)
    ini.replies()
    ini.data_out(itt, NO_TAG, b"a" * 512, offset=0, datasn=0)
    assert data_phase_error(ini.replies())


def test_immediate_data_when_it_was_negotiated_off_is_a_protocol_error() -> None:
    ini = logged_in(operational=text(ImmediateData="No"))
    ini.scsi(write10(1), edtl=512, write=True, data=b"a" * 512)
    assert [p.opcode for p in ini.replies()] == [REJECT]
    assert closed(ini)


# -- the CmdSN window -----------------------------------------------------------------------


def test_maxcmdsn_opens_as_commands_complete() -> None:
    ini = logged_in()
    itt = ini.scsi(TUR)
    ini.conn.complete(itt, 0)
    [pdu] = ini.replies()
    assert pdu.expcmdsn == 2 and pdu.maxcmdsn == pdu.expcmdsn + ini.conn.depth - 1


def test_a_command_above_maxcmdsn_is_dropped_silently_and_the_next_one_works() -> None:
    ini = logged_in()
    session = ini.conn.session
    ini.scsi(TUR, cmdsn=session.max_cmdsn + 1)
    assert executes(ini) == [] and ini.replies() == [] and not ini.conn.closed
    itt = ini.scsi(TUR)
    assert [e.itt for e in executes(ini)] == [itt]


def test_a_command_below_expcmdsn_is_dropped_silently() -> None:
    ini = logged_in()
    ini.scsi(TUR, cmdsn=ini.cmdsn - 1)
    assert executes(ini) == [] and ini.replies() == [] and not ini.conn.closed


def test_commands_arriving_out_of_order_run_in_cmdsn_order() -> None:
    ini = logged_in()
    first_sn = ini.cmdsn
    late = ini.scsi(TUR, cmdsn=first_sn + 1)
    assert executes(ini) == []
    early = ini.scsi(TUR, cmdsn=first_sn)
    assert [e.itt for e in executes(ini)] == [early, late]


def test_an_immediate_command_does_not_advance_expcmdsn() -> None:
    ini = logged_in()
    before = ini.conn.session.exp_cmdsn
    itt = ini.scsi(TUR, immediate=True)
    ini.conn.complete(itt, 0)
    assert ini.reply().expcmdsn == before


def test_a_text_request_continued_past_64_kib_is_rejected_and_ends_the_connection() -> None:
    ini = logged_in()
    for _ in range(3):  # 96 KiB of one continued text
        itt = ini.next_itt()
        ini.send(0x04, 0x40, data=b"X" * (32 << 10), itt=itt, f20=NO_TAG)
        ini.cmdsn += 1
    assert REJECT in [p.opcode for p in ini.replies()]
    assert closed(ini)


# -- NOP, Text, logout ----------------------------------------------------------------------


def test_nop_out_ping_is_answered_with_its_data() -> None:
    ini = logged_in()
    itt = ini.nop_out(b"hello")
    pdu = ini.reply()
    assert pdu.opcode == NOP_IN and pdu.itt == itt and pdu.data == b"hello"
    assert pdu.u32(20) == NO_TAG


def test_nop_out_without_a_task_tag_gets_no_answer() -> None:
    ini = logged_in()
    ini.nop_out(b"", itt=NO_TAG)
    assert ini.replies() == []


def test_target_ping_carries_a_transfer_tag_and_does_not_consume_statsn() -> None:
    ini = logged_in()
    ini.conn.ping()
    ping = ini.reply()
    assert ping.opcode == NOP_IN and ping.itt == NO_TAG and ping.u32(20) != NO_TAG
    ini.nop_out()
    assert ini.reply().statsn == ping.statsn


def test_send_targets_in_a_discovery_session_lists_every_target() -> None:
    ini = logged_in(discovery=True)
    ini.text_request(text(SendTargets="All"))
    pdu = ini.reply()
    assert pdu.opcode == TEXT_RESPONSE and pdu.flags & 0x80
    names = [v for k, v in (i.split("=", 1) for i in pdu.data.decode().split("\0") if i)
             if k == "TargetName"]
    assert names == ini.conn.portal.targets()
    assert "TargetAddress=127.0.0.1:3260,1" in pdu.data.decode()


def test_send_targets_in_a_normal_session_names_only_its_own_target() -> None:
    ini = logged_in()
    ini.text_request(text(SendTargets="All"))
    assert ini.reply().pairs()["TargetName"] == TARGET


def test_a_long_send_targets_answer_continues_on_request() -> None:
    names = [f"iqn.2026-11.io.sheep:disk{i:04}" for i in range(400)]
    conn = Connection(FakePortal(names), SessionTable())
    ini = logged_in(conn, discovery=True, operational=text(MaxRecvDataSegmentLength="4096"))
    itt = ini.text_request(text(SendTargets="All"))
    parts = []
    pdu = ini.reply()
    while not pdu.flags & 0x80:
        assert pdu.flags & 0x40 and len(pdu.data) == 4096
        parts.append(pdu.data)
        ini.send(0x04, 0x80, itt=itt, f20=pdu.u32(20))
        ini.cmdsn += 1
        pdu = ini.reply()
    parts.append(pdu.data)
    assert b"".join(parts).count(b"TargetName=") == 400


def test_logout_waits_for_running_commands_then_closes() -> None:
    ini = logged_in()
    itt = ini.scsi(TUR)
    out = ini.logout()
    assert ini.replies() == []
    ini.conn.complete(itt, 0)
    response, logout = ini.replies()
    assert response.opcode == SCSI_RESPONSE
    assert logout.opcode == LOGOUT_RESPONSE and logout.itt == out and logout.bhs[2] == 0
    assert closed(ini)
    assert len(ini.conn.sessions) == 0


def test_logout_for_recovery_is_not_supported_at_erl_0() -> None:
    ini = logged_in()
    ini.logout(reason=2)
    pdu = ini.reply()
    assert pdu.opcode == LOGOUT_RESPONSE and pdu.bhs[2] == 2 and not ini.conn.closed


# -- task management ------------------------------------------------------------------------


def test_abort_task_of_a_running_command_answers_after_it_finishes_and_drops_its_status() -> None:
    ini = logged_in()
    cmd_sn = ini.cmdsn
    itt = ini.scsi(write10(1), edtl=512, write=True, data=b"a" * 512)
    abort = ini.tmf(1, ref_itt=itt, ref_cmdsn=cmd_sn)
    assert ini.replies() == []
    ini.conn.complete(itt, 0)
    [pdu] = ini.replies()
    assert pdu.opcode == TMF_RESPONSE and pdu.itt == abort and pdu.bhs[2] == 0


def test_abort_task_of_a_command_waiting_for_data_answers_at_once() -> None:
    ini = logged_in(operational=text(ImmediateData="No"))
    itt = ini.scsi(write10(1), edtl=512, write=True)
    [solicit] = ini.replies()
    ini.tmf(1, ref_itt=itt)
    assert ini.reply().bhs[2] == 0
    ini.data_out(itt, solicit.u32(20), b"a" * 512, offset=0, datasn=0)  # late: ignored
    assert executes(ini) == [] and not ini.conn.closed


def test_abort_task_of_a_finished_command_says_it_does_not_exist() -> None:
    ini = logged_in()
    cmd_sn = ini.cmdsn
    itt = ini.scsi(TUR)
    ini.conn.complete(itt, 0)
    ini.replies()
    ini.tmf(1, ref_itt=itt, ref_cmdsn=cmd_sn)
    assert ini.reply().bhs[2] == 1


def test_lun_reset_leaves_a_unit_attention_on_every_session_of_the_target() -> None:
    sessions = SessionTable()
    one = logged_in(sessions=sessions, isid=1)
    two = logged_in(sessions=sessions, isid=2)
    one.tmf(5)
    assert one.reply().bhs[2] == 0
    for ini in (one, two):
        ini.scsi(TUR)
        [pdu] = ini.replies()
        assert pdu.bhs[3] == 2 and pdu.data[2 + 2] == 0x06 and pdu.data[2 + 12] == 0x29
        ini.scsi(TUR)
        assert len(executes(ini)) == 1  # reported once


def test_lun_reset_of_another_lun_says_the_lun_does_not_exist() -> None:
    ini = logged_in()
    ini.tmf(5, lun=1 << 48)
    assert ini.reply().bhs[2] == 2


def test_unsupported_task_management_functions_say_so() -> None:
    ini = logged_in()
    ini.tmf(3)  # CLEAR ACA
    assert ini.reply().bhs[2] == 5
    ini.tmf(7)  # TARGET COLD RESET
    assert ini.reply().bhs[2] == 5


# -- sessions -------------------------------------------------------------------------------


def test_a_second_login_with_the_same_isid_reinstates_the_session() -> None:
    sessions = SessionTable()
    old = logged_in(sessions=sessions)
    old_tsih = old.conn.session.tsih
    new = logged_in(sessions=sessions)
    assert closed(old)
    assert len(sessions) == 1 and new.conn.session.tsih != old_tsih


def test_sessions_with_different_isids_live_side_by_side() -> None:
    sessions = SessionTable()
    logged_in(sessions=sessions, isid=1)
    logged_in(sessions=sessions, isid=2)
    assert len(sessions) == 2


def test_a_login_naming_an_unknown_tsih_is_refused() -> None:
    conn = Connection(FakePortal(), SessionTable())
    ini = Initiator(conn)
    ini.login(text(InitiatorName="iqn.x:i", TargetName=TARGET), csg=1, nsg=3, tsih=77)
    conn.events()
    assert not conn.accept_login()
    assert ini.reply().login_status == 0x020A


def test_the_session_ends_with_its_connection() -> None:
    sessions = SessionTable()
    ini = logged_in(sessions=sessions)
    ini.conn.connection_lost()
    assert len(sessions) == 0


# -- malformed input ------------------------------------------------------------------------


def test_an_unknown_opcode_is_rejected_and_the_connection_goes_on() -> None:
    ini = logged_in()
    ini.send(0x1C, 0x80)
    pdu = ini.reply()
    assert pdu.opcode == REJECT and pdu.bhs[2] == 0x05 and pdu.data[0] == 0x1C
    assert not ini.conn.closed
    ini.nop_out(b"still here")
    assert ini.reply().data == b"still here"


def test_a_bad_header_digest_ends_the_connection() -> None:
    ini = logged_in(operational=text(HeaderDigest="CRC32C"))
    raw = bytearray(ini.pdu(0x40, 0x80, itt=5, f20=NO_TAG))
    raw[50] ^= 0xFF
    ini.raw(bytes(raw))
    assert closed(ini)


def test_a_bad_data_digest_is_rejected_and_ends_the_connection() -> None:
    ini = logged_in(operational=text(DataDigest="CRC32C"))
    raw = bytearray(ini.pdu(0x40, 0x80, itt=5, f20=NO_TAG, data=b"ping"))
    raw[-1] ^= 0xFF
    ini.raw(bytes(raw))
    assert [p.opcode for p in ini.replies()] == [REJECT]
    assert closed(ini)


def test_a_scsi_command_before_login_ends_the_connection() -> None:
    conn = Connection(FakePortal(), SessionTable())
    Initiator(conn).scsi(TUR)
    assert conn.closed and conn.data_to_send() == []


def test_a_data_segment_over_our_limit_ends_the_connection() -> None:
    ini = logged_in()
    ini.raw(ini.pdu(0x40, 0x80, itt=5, f20=NO_TAG)[:5] + (1 << 24 - 1).to_bytes(3, "big")
            + bytes(40))
    assert closed(ini)


def test_pdus_split_across_reads_are_reassembled() -> None:
    ini = logged_in()
    raw = ini.pdu(0x40, 0x80, itt=9, f20=NO_TAG, data=b"split")
    for i in range(len(raw)):
        ini.raw(raw[i : i + 1])
    assert ini.reply().data == b"split"


def test_completions_after_the_connection_closed_are_ignored() -> None:
    ini = logged_in()
    itt = ini.scsi(TUR)
    ini.conn.connection_lost()
    ini.conn.complete(itt, 0)
    assert ini.replies() == []
