"""A hostile iSCSI initiator, over raw sockets against a real gateway: whatever it
announces or sends, the daemon's memory stays bounded and other initiators are served."""

from __future__ import annotations

import socket
import subprocess

from sheep.names import target_name

from ..cluster import Cluster, dog
from ..hostile import RawInitiator, rss
from .test_nbd import NbdClient

MiB = 1 << 20
WRITE10 = 0x2A
SCSI_RESPONSE = 0x21


def write10(blocks: int) -> bytes:
    return bytes([WRITE10, 0, 0, 0, 0, 0, 0]) + blocks.to_bytes(2, "big") + b"\0"


def still_served(c: Cluster, name: str) -> None:
    inq = subprocess.run(["iscsi-inq", c.iscsi_url(name)], capture_output=True, text=True,
                         timeout=60)
    assert inq.returncode == 0 and "SHEEP" in inq.stdout.upper(), inq.stdout + inq.stderr


def test_writes_announcing_huge_lengths_do_not_make_the_gateway_allocate_them(
        iscsi_cluster: Cluster) -> None:
    """Four 48-byte PDUs announcing 256 MiB writes each once cost the gateway 1 GiB, and
    sixteen within the largest WRITE a LUN takes (32 MiB) cost 512 MiB: announced lengths
    are buffered only within the connection's write budget."""
    c = iscsi_cluster
    dog("vdi", "create", "disk", "64M", address=c.address)
    pid = c.nodes[0].proc.pid  # type: ignore[union-attr]
    ini = RawInitiator(c.iscsi_port)
    try:
        ini.log_in(target_name("disk"), ImmediateData="No")
        before = rss(pid)
        for _ in range(4):
            ini.scsi(write10(0xFFFF), edtl=256 * MiB, write=True)
        for _ in range(16):
            ini.scsi(write10(0xFFFF), edtl=32 * MiB, write=True)
        replies = [ini.read_pdu() for _ in range(5)]  # 4 refusals, an R2T for the first 32
        grown = rss(pid) - before
        assert grown < 64 * MiB, f"the gateway grew by {grown / MiB:.0f} MiB"
        assert sorted(p.opcode for p in replies) == [SCSI_RESPONSE] * 4 + [0x31]
        still_served(c, "disk")
    finally:
        ini.close()


def read10(blocks: int) -> bytes:
    return bytes([0x28, 0, 0, 0, 0, 0, 0]) + blocks.to_bytes(2, "big") + b"\0"


def test_reads_whose_data_is_never_taken_cost_a_bounded_amount(
        iscsi_cluster: Cluster) -> None:
    """64 READs of 32 MiB in the CmdSN window, none of their Data-In read, once all ran at
    once: 2 GiB held for an initiator that reads nothing. Commands now start only while
    16 MiB of data is in flight and the initiator takes what was answered."""
    c = iscsi_cluster
    dog("vdi", "create", "big", "64M", address=c.address)
    with NbdClient(c.nbd_port, "big") as client:  # unallocated blocks read as shared zeros
        for offset in range(0, 64 * MiB, 4 * MiB):
            client.write(offset, b"\xa5" * (4 * MiB))
        client.flush()
    pid = c.nodes[0].proc.pid  # type: ignore[union-attr]
    ini = RawInitiator(c.iscsi_port)
    ini.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        ini.log_in(target_name("big"))
        before = rss(pid)
        for _ in range(64):
            ini.scsi(read10(0xFFFF), edtl=0xFFFF * 512, read=True)
        still_served(c, "big")
        grown = rss(pid) - before
        assert grown < 64 * MiB, f"the gateway grew by {grown / MiB:.0f} MiB"
    finally:
        ini.close()
