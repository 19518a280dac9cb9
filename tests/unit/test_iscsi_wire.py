"""The PDU codec: header layout, padding, digests, AHS, and cutting a byte stream."""

from __future__ import annotations

import struct

import pytest

from sheep.gateway.iscsi.wire import (
    DataDigestError,
    Digests,
    HeaderDigestError,
    IscsiFramingError,
    PduReader,
    SeqNumbers,
    crc32c,
    data_in,
    digest,
    r2t,
    scsi_response,
)

SN = SeqNumbers(statsn=7, expcmdsn=8, maxcmdsn=9)


def request(opcode: int = 0x40, data: bytes = b"", ahs: bytes = b"") -> bytes:
    head = bytearray(48)
    head[0] = opcode
    head[1] = 0x80
    head[4] = len(ahs) // 4
    head[5:8] = len(data).to_bytes(3, "big")
    head[16:20] = (0x11223344).to_bytes(4, "big")
    return bytes(head) + ahs + data + b"\0" * (-len(data) % 4)


def test_crc32c_is_the_castagnoli_polynomial() -> None:
    assert crc32c(b"123456789") == 0xE3069283


def test_digests_go_on_the_wire_least_significant_byte_first() -> None:
    assert digest(b"123456789") == bytes([0x83, 0x92, 0x06, 0xE3])


def test_scsi_response_puts_fields_at_their_rfc_offsets() -> None:
    [pdu] = scsi_response(0xABCD, 2, SN, sense=b"\x70" + bytes(17), residual_flags=0x02,
                          residual=100, expdatasn=3)
    assert pdu[0] == 0x21 and pdu[1] == 0x82 and pdu[2] == 0 and pdu[3] == 2
    assert int.from_bytes(pdu[5:8], "big") == 20  # SenseLength + sense
    assert struct.unpack(">IIIIIII", pdu[16:44]) == (0xABCD, 0, 7, 8, 9, 3, 0)
    assert struct.unpack(">I", pdu[44:48])[0] == 100
    assert pdu[48:50] == b"\x00\x12"
    assert len(pdu) == 48 + 20


def test_data_segments_are_padded_to_four_bytes() -> None:
    [pdu] = data_in(1, 0, b"abcde", offset=0, datasn=0, sn=SN, final=True)
    assert len(pdu) == 48 + 8 and pdu[48:] == b"abcde\0\0\0"


def test_data_digest_covers_the_padding_too() -> None:
    [pdu] = data_in(1, 0, b"abcde", offset=0, datasn=0, sn=SN, final=True,
                    digests=Digests(header=True, data=True))
    assert pdu[48:52] == digest(pdu[:48])
    assert pdu[-4:] == digest(b"abcde\0\0\0")


def test_large_data_is_passed_through_without_a_copy() -> None:
    payload = memoryview(bytearray(1 << 20))
    buffers = data_in(1, 0, payload, offset=0, datasn=0, sn=SN, final=True)
    assert any(b is payload for b in buffers)


def test_r2t_does_not_consume_a_statsn() -> None:
    [pdu] = r2t(1, 0, 0x55, SN, r2tsn=2, offset=4096, length=8192)
    assert struct.unpack(">IIIIIII", pdu[20:48]) == (0x55, 7, 8, 9, 2, 4096, 8192)


def test_reader_waits_for_a_whole_pdu() -> None:
    reader = PduReader()
    raw = request(data=b"hello")
    reader.feed(raw[:50])
    assert reader.next_pdu() is None
    reader.feed(raw[50:])
    pdu = reader.next_pdu()
    assert pdu is not None and pdu.data == b"hello" and pdu.itt == 0x11223344
    assert pdu.immediate and pdu.opcode == 0


def test_reader_cuts_back_to_back_pdus() -> None:
    reader = PduReader()
    reader.feed(request(data=b"a") + request(data=b"bb"))
    assert reader.next_pdu().data == b"a"
    assert reader.next_pdu().data == b"bb"
    assert reader.next_pdu() is None


def test_reader_refuses_a_data_segment_over_its_limit() -> None:
    reader = PduReader(max_data=1024)
    reader.feed(request(data=bytes(2048))[:48])
    with pytest.raises(IscsiFramingError):
        reader.next_pdu()


def test_reader_checks_the_header_digest() -> None:
    reader = PduReader()
    reader.header_digest = True
    raw = request()
    reader.feed(raw + digest(raw[:47] + b"\x01"))
    with pytest.raises(HeaderDigestError):
        reader.next_pdu()


def test_reader_checks_the_data_digest_and_names_the_pdu() -> None:
    reader = PduReader()
    reader.data_digest = True
    raw = request(data=b"abcd")
    reader.feed(raw + b"\0\0\0\0")
    with pytest.raises(DataDigestError) as err:
        reader.next_pdu()
    assert err.value.bhs == raw[:48]


def test_a_cdb_longer_than_16_bytes_comes_from_the_extended_cdb_ahs() -> None:
    cdb = bytes(range(1, 33))
    ahs = struct.pack(">HB", 17, 1) + b"\0" + cdb[16:] + b"\0" * 3  # 20 bytes, padded
    raw = bytearray(request(opcode=0x01, ahs=ahs))
    raw[32:48] = cdb[:16]
    reader = PduReader()
    reader.feed(bytes(raw))
    assert reader.next_pdu().cdb == cdb
