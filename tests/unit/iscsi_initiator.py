"""A scripted iSCSI initiator for the unit tests: builds request PDUs byte by byte from
RFC 7143 §11 and reads the target's answers back. No sockets: it talks to a
sheep.gateway.iscsi.connection.Connection directly."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import crc32c

from sheep.gateway.iscsi.connection import Connection, LoginReady
from sheep.gateway.iscsi.login import AuthPolicy
from sheep.gateway.iscsi.session import SessionTable
from sheep.names import target_name

BHS = struct.Struct(">BBBBIQIIIIIIII")
NO_TAG = 0xFFFFFFFF
TARGET = target_name("disk")
ISID = 0x80_1234_5678_9A


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def text(**pairs: str) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs.items())


def digest(data: bytes) -> bytes:
    return struct.pack("<I", crc32c.crc32c(data))


@dataclass
class In:
    """One target PDU as the initiator sees it."""

    bhs: bytes
    data: bytes

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def flags(self) -> int:
        return self.bhs[1]

    def u32(self, off: int) -> int:
        return struct.unpack_from(">I", self.bhs, off)[0]

    @property
    def itt(self) -> int:
        return self.u32(16)

    @property
    def statsn(self) -> int:
        return self.u32(24)

    @property
    def expcmdsn(self) -> int:
        return self.u32(28)

    @property
    def maxcmdsn(self) -> int:
        return self.u32(32)

    @property
    def login_status(self) -> int:
        return struct.unpack_from(">H", self.bhs, 36)[0]

    @property
    def tsih(self) -> int:
        return struct.unpack_from(">H", self.bhs, 14)[0]

    def pairs(self) -> dict[str, str]:
        out = {}
        for item in self.data.rstrip(b"\0").split(b"\0"):
            if item:
                k, _, v = item.decode().partition("=")
                out[k] = v
        return out


def split(buffers: list, header_digest: bool = False, data_digest: bool = False) -> list[In]:
    raw = b"".join(bytes(b) for b in buffers)
    out = []
    pos = 0
    while pos < len(raw):
        bhs = raw[pos : pos + 48]
        dsl = int.from_bytes(bhs[5:8], "big")
        pos += 48
        if header_digest:
            assert raw[pos : pos + 4] == digest(bhs), "bad header digest from the target"
            pos += 4
        data = raw[pos : pos + dsl]
        padded = dsl + (-dsl % 4)
        if data_digest and dsl:
            assert raw[pos + padded : pos + padded + 4] == digest(raw[pos : pos + padded])
            pos += 4
        pos += padded
        out.append(In(bhs, data))
    return out


class FakePortal:
    def __init__(self, targets: list[str] | None = None, policy: AuthPolicy | None = None):
        self.names = targets if targets is not None else [TARGET, target_name("other")]
        self.policy = policy or AuthPolicy()

    def canonical_target(self, name: str) -> str | None:
        return name.lower() if name.lower() in self.names else None

    def targets(self) -> list[str]:
        return list(self.names)

    def auth(self, target: str | None) -> AuthPolicy:
        return self.policy

    def random(self, n: int) -> bytes:
        return bytes(range(7, 7 + n))


def write10_length(cdb: bytes) -> int:
    """The test double of Lun.data_out_length: WRITE(10) moves 512-byte blocks."""
    if cdb[0] == 0x2A:
        return int.from_bytes(cdb[7:9], "big") * 512
    return 0


class Initiator:
    """Drives one Connection; keeps CmdSN/ITT/ExpStatSN like a real initiator."""

    def __init__(self, conn: Connection, isid: int = ISID) -> None:
        self.conn = conn
        self.isid = isid
        self.cmdsn = 1
        self.itt = 0x100
        self.expstatsn = 0
        self.header_digest = False
        self.data_digest = False

    # -- sending ---------------------------------------------------------------------------

    def raw(self, data: bytes) -> None:
        self.conn.receive_data(data)

    def pdu(self, b0: int, b1: int, *, b2: int = 0, b3: int = 0, data: bytes = b"",
            lun: int = 0, itt: int | None = None, f20: int = 0, f24: int | None = None,
            f28: int | None = None, f32: int = 0, f36: int = 0, f40: int = 0, f44: int = 0,
            ahs: bytes = b"") -> bytes:
        head = BHS.pack(b0, b1, b2, b3, (len(ahs) // 4) << 24 | len(data), lun,
                        self.itt if itt is None else itt, f20,
                        self.cmdsn if f24 is None else f24,
                        self.expstatsn if f28 is None else f28, f32, f36, f40, f44)
        head += ahs
        out = head + (digest(head) if self.header_digest else b"") + pad(data)
        if self.data_digest and data:
            out += digest(pad(data))
        return out

    def send(self, *args, **kwargs) -> None:
        self.raw(self.pdu(*args, **kwargs))

    def login(self, pairs: bytes, *, csg: int, nsg: int, transit: bool = True,
              more: bool = False, tsih: int = 0, cid: int = 1, version_min: int = 0) -> None:
        flags = (0x80 if transit else 0) | (0x40 if more else 0) | csg << 2 | nsg
        self.send(0x43, flags, b2=0, b3=version_min, data=pairs, lun=self.isid << 16 | tsih,
                  f20=cid << 16)

    def scsi(self, cdb: bytes, *, edtl: int = 0, read: bool = False, write: bool = False,
             data: bytes = b"", final: bool = True, immediate: bool = False, lun: int = 0,
             cmdsn: int | None = None, advance: bool = True) -> int:
        itt = self.next_itt()
        flags = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | 1
        sn = self.cmdsn if cmdsn is None else cmdsn
        self.send(0x01 | (0x40 if immediate else 0), flags, data=data, lun=lun, itt=itt,
                  f20=edtl, f24=sn, ahs=b"", f32=int.from_bytes(cdb[:4].ljust(4, b"\0"), "big"),
                  f36=int.from_bytes(cdb[4:8].ljust(4, b"\0"), "big"),
                  f40=int.from_bytes(cdb[8:12].ljust(4, b"\0"), "big"),
                  f44=int.from_bytes(cdb[12:16].ljust(4, b"\0"), "big"))
        if advance and not immediate and cmdsn is None:
            self.cmdsn += 1
        return itt

    def data_out(self, itt: int, ttt: int, data: bytes, *, offset: int, datasn: int,
                 final: bool = True) -> None:
        self.send(0x05, 0x80 if final else 0, data=data, itt=itt, f20=ttt, f24=0, f36=datasn,
                  f40=offset)

    def nop_out(self, data: bytes = b"", *, itt: int | None = None,
                immediate: bool = True) -> int:
        itt = self.next_itt() if itt is None else itt
        self.send(0x40 if immediate else 0x00, 0x80, data=data, itt=itt, f20=NO_TAG)
        if not immediate:
            self.cmdsn += 1
        return itt

    def tmf(self, function: int, *, ref_itt: int = NO_TAG, ref_cmdsn: int = 0,
            lun: int = 0) -> int:
        itt = self.next_itt()
        self.send(0x42, 0x80 | function, lun=lun, itt=itt, f20=ref_itt, f32=ref_cmdsn)
        return itt

    def text_request(self, pairs: bytes, *, ttt: int = NO_TAG) -> int:
        itt = self.next_itt()
        self.send(0x04, 0x80, data=pairs, itt=itt, f20=ttt)
        self.cmdsn += 1
        return itt

    def logout(self, reason: int = 0) -> int:
        itt = self.next_itt()
        self.send(0x46, 0x80 | reason, itt=itt)
        return itt

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    # -- receiving -------------------------------------------------------------------------

    def replies(self) -> list[In]:
        got = split(self.conn.data_to_send(), self.header_digest, self.data_digest)
        for pdu in got:
            if pdu.opcode in (0x21, 0x22, 0x23, 0x24, 0x26, 0x3F) or (
                    pdu.opcode == 0x25 and pdu.flags & 1):
                self.expstatsn = pdu.statsn + 1
        return got

    def reply(self) -> In:
        got = self.replies()
        assert len(got) == 1, f"expected one PDU, got {[hex(p.opcode) for p in got]}"
        return got[0]


def logged_in(conn: Connection | None = None, *, operational: bytes = b"",
              sessions: SessionTable | None = None, isid: int = ISID,
              data_out_length=write10_length, discovery: bool = False) -> Initiator:
    """A connection that went through a plain login (no CHAP) into the full feature phase,
    with `operational` keys negotiated; the initiator's replies are drained."""
    if conn is None:
        conn = Connection(FakePortal(), sessions if sessions is not None else SessionTable())
    ini = Initiator(conn, isid)
    if discovery:
        first = text(InitiatorName="iqn.1994-05.com.example:i", SessionType="Discovery",
                     AuthMethod="None")
    else:
        first = text(InitiatorName="iqn.1994-05.com.example:i", SessionType="Normal",
                     TargetName=TARGET, AuthMethod="None")
    ini.login(first, csg=0, nsg=1)
    assert ini.reply().login_status == 0
    ini.login(operational, csg=1, nsg=3)
    events = conn.events()
    assert any(isinstance(e, LoginReady) for e in events), events
    assert conn.accept_login(data_out_length)
    final = ini.reply()
    assert final.login_status == 0 and final.flags & 0x80
    ini.header_digest = conn.session.params.header_digest
    ini.data_digest = conn.session.params.data_digest
    return ini
