"""The iSCSI gateway end to end, driven by real initiators (libiscsi's iscsi-ls, iscsi-inq,
iscsi-readcapacity16 and its conformance suite iscsi-test-cu; QEMU's iSCSI driver through
qemu-img and qemu-io) and by a small raw-socket client, against a real 3-node cluster
with copies=3 whose node 0 serves iSCSI (and NBD, to compare the two).

One cluster serves the module; every test works on a VDI of its own. Objects are 4 MiB,
so offsets near multiples of 4 MiB cross object boundaries on purpose. A second, smaller
module cluster has CHAP switched on.
"""

from __future__ import annotations

import itertools
import re
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.etcd_server import EtcdServer
from sheep.names import target_name

from ..cluster import Cluster, dog, recv_exact, start_cluster

MiB = 1 << 20
OBJ = 4 * MiB
SIZE = 64 * MiB
CLIENT_TIMEOUT = 120
CHAP_USER, CHAP_SECRET = "alice", "alice-secret-1"  # 14 bytes: secrets need 12

# every family the gateway must pass with no failure (a skipped optional feature is fine)
FAMILIES = [
    "ALL.TestUnitReady", "ALL.Inquiry", "ALL.Mandatory", "ALL.ReadCapacity10",
    "ALL.ReadCapacity16", "ALL.Read6", "ALL.Read10", "ALL.Read12", "ALL.Read16",
    "ALL.Write10", "ALL.Write12", "ALL.Write16", "ALL.WriteVerify10", "ALL.WriteVerify12",
    "ALL.WriteVerify16", "ALL.Verify10", "ALL.Verify12", "ALL.Verify16", "ALL.WriteSame10",
    "ALL.WriteSame16", "ALL.Unmap", "ALL.GetLBAStatus", "ALL.CompareAndWrite",
    "ALL.ReportSupportedOpcodes", "ALL.ModeSense6", "ALL.StartStopUnit", "ALL.iSCSIcmdsn",
    "ALL.iSCSIdatasn", "ALL.iSCSIResiduals", "ALL.iSCSITMF", "ALL.MultipathIO",
]


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[Cluster]:
    """One formatted 3-node cluster (copies=3); node 0 serves iSCSI and NBD."""
    c = start_cluster(tmp_path_factory.mktemp("iscsi") / "cluster", etcd.url, nodes=3,
                      copies=3, nbd=True, iscsi=True)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def chap_portal(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer
                ) -> Iterator[Cluster]:
    """The same, with CHAP required (one user, cluster-wide)."""
    root = tmp_path_factory.mktemp("iscsi-chap")
    secret = root / "chap"
    secret.write_text(f"{CHAP_USER}:{CHAP_SECRET}\n")
    secret.chmod(0o600)
    c = start_cluster(root / "cluster", etcd.url, nodes=3, copies=3, iscsi=True,
                      iscsi_args=("--iscsi-chap-file", str(secret)))
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def gateway_stays_healthy(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test: the gateways it used are alive and logged no traceback."""
    used = [request.getfixturevalue(name) for name in ("portal", "chap_portal")
            if name in request.fixturenames]
    starts = [len(c.nodes[0].log()) for c in used]
    yield
    for c, start in zip(used, starts, strict=True):
        assert c.nodes[0].alive, "the iSCSI gateway died"
        new = c.nodes[0].log()[start:]
        assert "Traceback" not in new, f"the gateway logged a traceback:\n{new[-5000:]}"


_names = itertools.count()


def new_vdi(cluster: Cluster, size: str = "64M") -> str:
    name = f"i{next(_names)}"
    dog("vdi", "create", name, size, address=cluster.address)
    return name


@pytest.fixture
def vdi(portal: Cluster) -> str:
    """A fresh, empty 64 MiB VDI."""
    return new_vdi(portal)


def run(cmd: list[str], cwd: Path, *, ok: bool = True, timeout: float = CLIENT_TIMEOUT
        ) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if ok:
        assert proc.returncode == 0, (f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def qemu_io(url: str, *commands: str, cwd: Path) -> str:
    """qemu-io commands in one session; any failed command or pattern mismatch fails."""
    cmd = ["qemu-io", "-f", "raw"]
    for command in commands:
        cmd += ["-c", command]
    proc = run([*cmd, url], cwd, ok=False)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0 or "fail" in text.lower() or "error" in text.lower():
        raise AssertionError(f"qemu-io {commands} on {url} ({proc.returncode}):\n{text[-3000:]}")
    return text


def cu_summary(output: str) -> dict[str, tuple[int, int, int]]:
    """iscsi-test-cu's Run Summary: {'tests': (ran, passed, failed), 'asserts': ...}."""
    out = {}
    for kind in ("tests", "asserts"):
        m = re.search(rf"^\s+{kind}\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", output, re.M)
        assert m, f"no {kind} line in the summary:\n{output[-3000:]}"
        out[kind] = (int(m[2]), int(m[3]), int(m[4]))
    return out


def failed_tests(output: str) -> list[str]:
    """Names of the tests CUnit marked FAILED (expected-failure log lines are not)."""
    failed, current = [], ""
    for line in output.splitlines():
        m = re.match(r"\s+Test: (\S+)", line)
        if m:
            current = m[1]
        if re.match(r"^FAILED\b", line.strip()) or "...FAILED" in line:
            failed.append(current)
    return failed


# -- discovery and inquiry --------------------------------------------------------------------


def test_iscsi_ls_discovers_every_vdi_and_snapshot(portal: Cluster, tmp_path: Path) -> None:
    name = new_vdi(portal, "16M")
    dog("vdi", "snapshot", "-s", "frozen", name, address=portal.address)
    out = run(["iscsi-ls", portal.iscsi_url()], tmp_path).stdout
    listed = re.findall(r"Target:(\S+) Portal:(\S+)", out)
    assert (target_name(name), f"127.0.0.1:{portal.iscsi_port},1") in listed
    assert (target_name(f"{name}@frozen"), f"127.0.0.1:{portal.iscsi_port},1") in listed


def test_iscsi_inq_reports_a_direct_access_disk(portal: Cluster, vdi: str, tmp_path: Path
                                                ) -> None:
    out = run(["iscsi-inq", portal.iscsi_url(vdi)], tmp_path).stdout
    assert "Peripheral Device Type:DIRECT_ACCESS" in out
    assert "Vendor:SHEEP" in out


def test_iscsi_readcapacity16_reports_the_vdi_size(portal: Cluster, vdi: str, tmp_path: Path
                                                   ) -> None:
    out = run(["iscsi-readcapacity16", portal.iscsi_url(vdi)], tmp_path).stdout
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in out
    assert f"Total size:{SIZE}" in out


def test_an_unknown_target_is_refused(portal: Cluster, tmp_path: Path) -> None:
    proc = run(["iscsi-inq", portal.iscsi_url("no-such-vdi")], tmp_path, ok=False)
    assert proc.returncode != 0


def iqn_url(cluster: Cluster, iqn: str) -> str:
    return f"iscsi://127.0.0.1:{cluster.iscsi_port}/{iqn}/0"


def test_a_name_spelt_in_another_case_never_reaches_the_wrong_disk(
        portal: Cluster, tmp_path: Path) -> None:
    lower, upper = "casedisk", "CaseDisk"
    for name, pattern in ((lower, "0x55"), (upper, "0xaa")):
        dog("vdi", "create", name, "16M", address=portal.address)
        qemu_io(portal.nbd_url(name), f"write -P {pattern} 0 64k", cwd=tmp_path)
    # CaseDisk's own target is its documented hex spelling, and serves its bytes
    assert target_name(upper) == "iqn.2026-11.io.sheep:.436173654469736b"
    qemu_io(iqn_url(portal, target_name(upper)), "read -P 0xaa 0 64k", cwd=tmp_path)
    # ...:CaseDisk would name casedisk (iSCSI names ignore case) while spelling CaseDisk,
    # which exists: refused rather than served the other disk
    proc = run(["qemu-io", "-f", "raw", "-c", "read -P 0x55 0 64k",
                iqn_url(portal, "iqn.2026-11.io.sheep:CaseDisk")], tmp_path, ok=False)
    assert proc.returncode != 0 or "fail" in (proc.stdout + proc.stderr).lower()
    # a case that spells no other VDI still names casedisk, as the standard wants
    qemu_io(iqn_url(portal, "iqn.2026-11.io.sheep:CASEDISK"), "read -P 0x55 0 64k",
            cwd=tmp_path)


def serial_number(cluster: Cluster, export: str, cwd: Path) -> str:
    out = run(["iscsi-inq", "-e", "1", "-c", "128", cluster.iscsi_url(export)], cwd).stdout
    found = re.search(r"Unit Serial Number:\s*(\S+)", out)
    assert found, out
    return found.group(1)


def test_a_disk_keeps_its_scsi_identity_through_snapshots_and_each_snapshot_has_its_own(
        portal: Cluster, vdi: str, tmp_path: Path) -> None:
    before = serial_number(portal, vdi, tmp_path)
    dog("vdi", "snapshot", "-s", "one", vdi, address=portal.address)
    dog("vdi", "snapshot", "-s", "two", vdi, address=portal.address)
    serials = [serial_number(portal, e, tmp_path) for e in (vdi, f"{vdi}@one", f"{vdi}@two")]
    assert serials[0] == before
    assert len(set(serials)) == 3
    dog("vdi", "rollback", "-s", "one", vdi, address=portal.address)
    assert serial_number(portal, vdi, tmp_path) == before


# -- the conformance suite ---------------------------------------------------------------------


@pytest.mark.slow
def test_libiscsi_conformance_families_pass(portal: Cluster, vdi: str, tmp_path: Path) -> None:
    """One run over every required family; MultipathIO gets two paths (two sessions)."""
    url = portal.iscsi_url(vdi)
    proc = run(["iscsi-test-cu", "--dataloss", "-t", ",".join(FAMILIES), url, url], tmp_path,
               ok=False, timeout=600)
    output = proc.stdout + proc.stderr
    (tmp_path / "iscsi-test-cu.log").write_text(output)
    summary = cu_summary(output)
    assert failed_tests(output) == [], output[-6000:]
    assert summary["tests"][2] == 0 and summary["asserts"][2] == 0, summary
    assert summary["tests"][0] >= len(FAMILIES)


@pytest.mark.slow
def test_libiscsi_read_only_family_passes_on_a_snapshot(portal: Cluster, tmp_path: Path
                                                        ) -> None:
    name = new_vdi(portal, "16M")
    dog("vdi", "snapshot", "-s", "ro", name, address=portal.address)
    proc = run(["iscsi-test-cu", "--dataloss", "-t", "ALL.ReadOnly",
                portal.iscsi_url(f"{name}@ro")], tmp_path, ok=False, timeout=300)
    output = proc.stdout + proc.stderr
    summary = cu_summary(output)
    assert failed_tests(output) == [], output[-6000:]
    assert summary["tests"][0] >= 1 and summary["tests"][2] == 0, summary


# -- QEMU's iSCSI driver -----------------------------------------------------------------------


def test_qcow2_converted_into_the_target_and_back_compares_equal(
        portal: Cluster, vdi: str, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(src), str(SIZE)], tmp_path)
    qemu_io_file = ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 5M",
                    "-c", f"write -P 0x33 {OBJ - 4096} 20000", "-c", "write -P 0x77 60M 4M",
                    str(src)]
    run(qemu_io_file, tmp_path)
    url = portal.iscsi_url(vdi)
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(src), url], tmp_path)
    back = tmp_path / "back.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(back)], tmp_path)
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), str(back)], tmp_path)


@pytest.mark.parametrize(("offset", "length"), [
    (OBJ - 512, 1024),  # one sector each side of the first object boundary
    (2 * OBJ - 3 * MiB, 5 * MiB),  # most of two objects
    (0, 3 * OBJ + 4096),  # three whole objects and a bit
])
def test_qemu_io_patterns_across_object_boundaries_read_back(
        portal: Cluster, vdi: str, tmp_path: Path, offset: int, length: int) -> None:
    url = portal.iscsi_url(vdi)
    qemu_io(url, f"write -P 0xa5 {offset} {length}", cwd=tmp_path)
    qemu_io(url, f"read -P 0xa5 {offset} {length}", f"read -P 0 {offset + length} 4096",
            cwd=tmp_path)


def test_nbd_and_iscsi_see_the_same_bytes(portal: Cluster, vdi: str, tmp_path: Path) -> None:
    iscsi, nbd = portal.iscsi_url(vdi), portal.nbd_url(vdi)
    qemu_io(iscsi, f"write -P 0x11 {OBJ - 8192} 16384", cwd=tmp_path)
    qemu_io(nbd, f"read -P 0x11 {OBJ - 8192} 16384", f"write -P 0x22 {3 * OBJ} 4096",
            cwd=tmp_path)
    qemu_io(iscsi, f"read -P 0x22 {3 * OBJ} 4096", f"read -P 0x11 {OBJ - 8192} 16384",
            cwd=tmp_path)


def test_qemu_flush_goes_through(portal: Cluster, vdi: str, tmp_path: Path) -> None:
    qemu_io(portal.iscsi_url(vdi), "write -P 0x42 0 64k", "flush", cwd=tmp_path)


def test_writes_to_a_snapshot_target_are_refused(portal: Cluster, tmp_path: Path) -> None:
    name = new_vdi(portal, "16M")
    dog("vdi", "snapshot", "-s", "s1", name, address=portal.address)
    proc = run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4096",
                portal.iscsi_url(f"{name}@s1")], tmp_path, ok=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 or "fail" in text.lower() or "error" in text.lower(), text


# -- a raw client: what the CLI tools cannot send ----------------------------------------------


class RawSession:
    """A minimal initiator written from RFC 7143 §11: one login PDU straight into the full
    feature phase (no digests, no CHAP), then one command at a time."""

    BHS = struct.Struct(">BBBBIQIIIIIIII")

    def __init__(self, port: int, target: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.cmdsn, self.itt, self.statsn = 1, 1, 0
        keys = (f"InitiatorName=iqn.2026-11.test:raw\0SessionType=Normal\0"
                f"TargetName={target}\0").encode()
        # CSG=1 (operational) -> NSG=3 (full feature), T bit; ISID type "random"
        self.send(0x43, 0x80 | 1 << 2 | 3, keys, lun=(0x80_0000_0001 << 16), f20=0)
        bhs, data = self.recv()
        assert bhs[0] & 0x3F == 0x23 and struct.unpack_from(">H", bhs, 36)[0] == 0, data

    def send(self, b0: int, b1: int, data: bytes = b"", *, lun: int = 0, f20: int = 0,
             cdb: bytes = b"", b2: int = 0) -> None:
        cdb = cdb.ljust(16, b"\0")
        words = struct.unpack(">IIII", cdb)
        head = self.BHS.pack(b0, b1, b2, 0, len(data), lun, self.itt, f20, self.cmdsn,
                             self.statsn + 1, *words)
        self.sock.sendall(head + data + b"\0" * (-len(data) % 4))

    def recv(self) -> tuple[bytes, bytes]:
        bhs = recv_exact(self.sock, 48)
        length = int.from_bytes(bhs[5:8], "big")
        data = recv_exact(self.sock, length + (-length % 4))[:length]
        if bhs[0] & 0x3F != 0x25 or bhs[1] & 1:
            self.statsn = struct.unpack_from(">I", bhs, 24)[0]
        return bhs, data

    def command(self, cdb: bytes, *, edtl: int = 0) -> tuple[int, bytes]:
        """(SCSI status, response data) of a command without Data-Out."""
        self.itt += 1
        self.send(0x01, 0x80 | (0x40 if edtl else 0) | 1, cdb=cdb, f20=edtl)
        self.cmdsn += 1
        data = b""
        while True:
            bhs, chunk = self.recv()
            if bhs[0] & 0x3F == 0x25:
                data += chunk
                if bhs[1] & 1:
                    return bhs[3], data
            else:
                assert bhs[0] & 0x3F == 0x21, f"unexpected opcode {bhs[0]:#x}"
                return bhs[3], chunk

    def close(self) -> None:
        self.sock.close()


def test_synchronize_cache_returns_good(portal: Cluster, vdi: str) -> None:
    raw = RawSession(portal.iscsi_port, target_name(vdi))
    try:
        status, _ = raw.command(bytes([0x35]) + bytes(9))  # SYNCHRONIZE CACHE(10), all
        assert status == 0
        status, _ = raw.command(bytes([0x91]) + bytes(15))  # SYNCHRONIZE CACHE(16)
        assert status == 0
    finally:
        raw.close()


def test_nop_out_ping_is_echoed(portal: Cluster, vdi: str) -> None:
    raw = RawSession(portal.iscsi_port, target_name(vdi))
    try:
        raw.itt += 1
        raw.send(0x40, 0x80, b"are you there", f20=0xFFFFFFFF)  # immediate NOP-Out
        bhs, data = raw.recv()
        assert bhs[0] & 0x3F == 0x20 and data == b"are you there"
    finally:
        raw.close()


def test_garbage_ends_only_its_own_connection(portal: Cluster, vdi: str, tmp_path: Path
                                              ) -> None:
    with socket.create_connection(("127.0.0.1", portal.iscsi_port), timeout=10) as sock:
        sock.sendall(b"\xff" * 4096)
        sock.settimeout(10)
        with pytest.raises((ConnectionError, OSError)):
            while sock.recv(4096):
                pass
            raise ConnectionError("closed")
    run(["iscsi-inq", portal.iscsi_url(vdi)], tmp_path)


# -- CHAP --------------------------------------------------------------------------------------


def test_chap_with_the_right_secret_logs_in(chap_portal: Cluster, tmp_path: Path) -> None:
    name = new_vdi(chap_portal, "16M")
    url = chap_portal.iscsi_url(name, auth=f"{CHAP_USER}%{CHAP_SECRET}")
    assert "DIRECT_ACCESS" in run(["iscsi-inq", url], tmp_path).stdout
    info = run(["qemu-img", "info", "--output=json", url], tmp_path).stdout
    assert f'"virtual-size": {16 * MiB}' in info


def test_chap_with_a_wrong_secret_is_refused(chap_portal: Cluster, tmp_path: Path) -> None:
    name = new_vdi(chap_portal, "16M")
    start = len(chap_portal.nodes[0].log())
    for auth in (f"{CHAP_USER}%wrong-secret-1", f"mallory%{CHAP_SECRET}", ""):
        proc = run(["iscsi-inq", chap_portal.iscsi_url(name, auth=auth)], tmp_path, ok=False)
        assert proc.returncode != 0, auth
    assert "AUTH_FAILED" in chap_portal.nodes[0].log()[start:]


def test_chap_also_guards_discovery(chap_portal: Cluster, tmp_path: Path) -> None:
    name = new_vdi(chap_portal, "16M")
    assert run(["iscsi-ls", chap_portal.iscsi_url()], tmp_path, ok=False).returncode != 0
    auth = f"{CHAP_USER}%{CHAP_SECRET}"
    out = run(["iscsi-ls", chap_portal.iscsi_url(auth=auth)], tmp_path).stdout
    assert target_name(name) in out
