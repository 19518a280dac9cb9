"""Real clusters for tests: a private etcd, `sheep run` processes, `dog`, and clients.

Every port is chosen at run time on 127.0.0.1 (or ::1); every wait is bounded; every process is
stopped at the end (the fixtures in conftest.py own their lifetimes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sheep.localcluster import (
    LaunchError,
    LocalCluster,
    NodeProcess,
    cluster_info,
    format_cluster,
    free_port,
    stop_processes,
)
from sheep.netaddr import host_port
from sheep.objclient import open_client
from sheep.oid import ObjType, oid_type

BIN = Path(sys.executable).parent


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def dog(*args: str, address: str | None = None, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`env`: variables added to this dog's environment."""
    cmd = [str(BIN / "dog"), *args]
    if address is not None:
        cmd += ["-a", address]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env} if env else None)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def dog_json(*args: str, address: str) -> dict:
    return json.loads(dog(*args, "--json", address=address).stdout)


def processes_mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line contains `text` (a test's run directory): what a
    test must not leave behind. pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            if text in cmdline:
                found[int(entry.name)] = cmdline.strip()
    return found


def reap_leftovers(text: str, grace: float = 15.0) -> dict[int, str]:
    """Processes mentioning `text` still alive after `grace` seconds (a supervisor may take
    a moment to leave after its VM stopped): each is killed, and all are returned."""
    deadline = time.monotonic() + grace
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


class SheepProcess(NodeProcess):
    """A test's `sheep run` (sheep/localcluster.py), its failures as tests report them."""

    def wait_up(self, timeout: float = 20) -> None:
        """Until it serves (its ready file): AssertionError with its log if it exited,
        TimeoutError if it is still not ready after `timeout`."""
        try:
            self.wait_ready(timeout)
        except LaunchError as exc:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"sheep exited with {self.proc.returncode}:\n"
                                     f"{self.log()}") from None
            raise TimeoutError(f"timed out after {timeout}s waiting for sheep on port "
                               f"{self.port}: {exc}") from None

    def stop(self, timeout: float = 20) -> int | None:
        return super().stop(timeout)


@dataclass
class Cluster:
    root: Path
    etcd_base: str
    prefix: str = field(default_factory=lambda: f"/t-{uuid.uuid4().hex[:12]}")
    nodes: list[SheepProcess] = field(default_factory=list)
    lease_ttl: int = 3
    nbd_port: int = field(default_factory=free_port)
    iscsi_port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"  # every node binds it (an IPv6 literal is fine)

    def nbd_url(self, export: str = "") -> str:
        return f"nbd://{host_port(self.host, self.nbd_port)}/{export}"

    def iscsi_url(self, export: str = "", lun: int = 0, auth: str = "") -> str:
        """iscsi://[USER%SECRET@]HOST:PORT/IQN/LUN of an export (NAME or NAME@TAG);
        the portal alone without `export`."""
        from sheep.names import target_name

        who = f"{auth}@" if auth else ""
        base = f"iscsi://{who}{host_port(self.host, self.iscsi_port)}"
        return f"{base}/{target_name(export)}/{lun}" if export else base

    @property
    def etcd_url(self) -> str:
        return self.etcd_base + self.prefix

    @property
    def address(self) -> str:
        live = [n for n in self.nodes if n.alive]
        return (live or self.nodes)[0].address

    def add_node(self, *extra: str, wait: bool = True) -> SheepProcess:
        i = len(self.nodes)
        node = SheepProcess(
            self.root / f"node{i}",
            free_port(),
            self.etcd_url,
            ["--lease-ttl", str(self.lease_ttl), *extra],
            host=self.host,
        )
        self.nodes.append(node.start())
        if wait:
            node.wait_up()
        return node

    def format(self, copies: int = 3, *args: str) -> dict:
        return dog_json("cluster", "format", "--copies", str(copies), *args, address=self.address)

    def info(self) -> dict:
        return dog_json("cluster", "info", address=self.address)

    def node_list(self) -> list[dict]:
        return dog_json("node", "list", address=self.address).get("nodes", [])

    def wait_members(self, count: int, timeout: float = 30) -> dict:
        def settled() -> dict | None:
            info = self.info()
            history = info.get("history", [])
            if history and len(history[-1].get("nodes", [])) == count:
                return info
            return None

        return wait_until(settled, timeout, f"{count} members in the current epoch")

    def wait_members_quietly(self, count: int, timeout: float = 30) -> None:
        """wait_members asked over gRPC from this process, not by a `dog` per poll: every
        cluster fixture waits here, and a dog process costs more than the answer."""
        def settled() -> bool:
            history = cluster_info(self.address).history
            return bool(history) and len(history[-1].nodes) == count

        wait_until(settled, timeout, f"{count} members in the current epoch")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            stop_processes([node.proc for node in self.nodes], 20)


def start_cluster(root: Path, etcd_base: str, nodes: int = 3, copies: int = 3,
                  lease_ttl: int = 3, nbd: bool = False, iscsi: bool = False,
                  iscsi_args: tuple[str, ...] = (), host: str = "127.0.0.1",
                  every_node_gateway: bool = False) -> Cluster:
    """With `nbd`, node 0 also serves NBD on `cluster.nbd_port`; with `iscsi`, iSCSI on
    `cluster.iscsi_port` (`iscsi_args`: more options for it, e.g. CHAP); with
    `every_node_gateway`, the other nodes serve them too, each on ports of its own (the
    gateways of VMs they host). Every node binds `host`."""
    cluster = Cluster(root, etcd_base, lease_ttl=lease_ttl, host=host)
    for i in range(nodes):
        gateway = i == 0 or every_node_gateway
        nbd_port = cluster.nbd_port if i == 0 else free_port()
        iscsi_port = cluster.iscsi_port if i == 0 else free_port()
        extra = ["--nbd-port", str(nbd_port)] if nbd and gateway else []
        if iscsi and gateway:
            extra += ["--iscsi-port", str(iscsi_port), *iscsi_args]
        cluster.add_node(*extra, wait=False)
    for node in cluster.nodes:
        node.wait_up()
    cluster.wait_members_quietly(nodes)
    if copies:  # in-process too (tests of `dog cluster format` call Cluster.format)
        format_cluster(cluster.address, copies)
    return cluster



class SecureCluster(LocalCluster):
    """A LocalCluster(secure=True), with its own etcd and CA (`pki`), whose node 0 also
    serves NBD on `nbd_port`."""

    def __init__(self, root: Path, nodes: int = 3) -> None:
        self.nbd_port = free_port()
        super().__init__(root, nodes, secure=True,
                         node_extra=lambda i: ["--nbd-port", str(self.nbd_port)] if i == 0
                         else [])

    @property
    def nbd_url(self) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}"


def start_secure_cluster(root: Path, nodes: int = 3, copies: int = 3) -> SecureCluster:
    """A SecureCluster, up and formatted."""
    cluster = SecureCluster(root, nodes)
    try:
        cluster.up(copies)
        cluster.write_dog_config()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from a raw protocol client's socket (tests that speak NBD or
    iSCSI by hand)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def x509_client_dir(out: Path, ca: Path, cert: Path | None = None,
                    key: Path | None = None) -> Path:
    """A directory laid out as QEMU's tls-creds-x509 (endpoint=client) and libnbd's
    `tls-certificates=` want it: ca-cert.pem, and client-cert.pem/client-key.pem when the
    client is to present a certificate (without them it presents none)."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    (out / "ca-cert.pem").write_bytes(Path(ca).read_bytes())
    if cert is not None and key is not None:
        (out / "client-cert.pem").write_bytes(Path(cert).read_bytes())
        key_out = out / "client-key.pem"
        key_out.write_bytes(Path(key).read_bytes())
        key_out.chmod(0o600)
    return out


class TcpProxy:
    """A loopback TCP relay that a test can cut (every connection dropped, new ones
    refused) and restore on the same port: a node behind it loses its etcd."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


# the client tests hold, as a gateway would
object_client = open_client


# -- VDI test helpers ---------------------------------------------------------------------


def dog_bytes(*args: str, address: str, input: bytes | Path = b"", check: bool = True
              ) -> subprocess.CompletedProcess:
    """`dog` with binary stdin and stdout (vdi read/write); `input` is piped in, or a
    file to give as stdin itself."""
    cmd = [str(BIN / "dog"), *args, "-a", address]
    if isinstance(input, Path):
        with open(input, "rb") as stdin:
            proc = subprocess.run(cmd, stdin=stdin, capture_output=True, timeout=60)
    else:
        proc = subprocess.run(cmd, input=input, capture_output=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def dog_error(*args: str, address: str, input: bytes | Path = b"") -> str:
    """Run a dog command that must fail cleanly: non-zero exit, one line on stderr that
    starts with "dog: ", nothing on stdout. Returns that line without the prefix."""
    proc = dog_bytes(*args, address=address, input=input, check=False)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, f"dog {' '.join(args)} succeeded: {proc.stdout[:200]!r}"
    assert err.startswith("dog: ") and err.count("\n") == 1 and err.endswith("\n"), (
        f"dog {' '.join(args)}: not a one-line error: {err!r}")
    assert proc.stdout == b"", f"dog {' '.join(args)} printed {proc.stdout[:200]!r}"
    return err[len("dog: "):].rstrip("\n")


async def dog_async(*args: str, address: str, input: bytes | None = None,
                    timeout: float = 60) -> tuple[int, bytes, bytes]:
    """`dog` as an asyncio subprocess, so the test's own event loop keeps running (e.g. a
    Volume held open for writing that must answer the command). Returns (rc, out, err)."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "dog"), *args, "-a", address,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(input)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


def object_path(node: SheepProcess, oid: int) -> Path:
    """Where `node` keeps object `oid` on disk (see ObjectStore._path)."""
    return node.dir / "obj" / f"{oid:016x}"


def objects_on_disk(cluster: Cluster) -> dict[int, set[int]]:
    """Node index -> the oids whose files exist in that node's object directory."""
    found: dict[int, set[int]] = {}
    for i, node in enumerate(cluster.nodes):
        objdir = node.dir / "obj"
        names = [p.name for p in objdir.iterdir()] if objdir.is_dir() else []
        found[i] = {int(n, 16) for n in names if len(n) == 16}
    return found


def vdi_with_one_object(cluster: Cluster, name: str, seed: int) -> tuple[bytes, int]:
    """A 16 MiB VDI whose first object holds 4 MiB of random data: (the data, its oid)."""
    data = random.Random(seed).randbytes(4 << 20)
    dog("vdi", "create", name, "16M", address=cluster.address)
    dog_bytes("vdi", "write", name, address=cluster.address, input=data)
    (oid,) = {o for o in set().union(*objects_on_disk(cluster).values())
              if oid_type(o) == ObjType.DATA}
    return data, oid


def all_objects_on_disk(cluster: Cluster) -> set[int]:
    return set().union(*objects_on_disk(cluster).values())


async def vdi_write(manager, name: str, offset: int, data: bytes) -> None:
    """Open NAME for writing through `manager` (a VdiManager), write, close."""
    async with await manager.open(name, writable=True) as vol:
        await vol.write(offset, data)


async def vdi_read(manager, name: str, offset: int, length: int, tag: str | None = None
                   ) -> bytes:
    async with await manager.open(name, tag) as vol:
        return bytes(await vol.read(offset, length))


# -- recovery and fencing test helpers -----------------------------------------------------


def wait_healthy(cluster: Cluster, timeout: float = 60) -> dict:
    """Until `dog cluster info` says every member of the current epoch finished recovery."""
    def healthy() -> dict | None:
        info = cluster.info()
        return info if info.get("health") == "healthy" else None

    return wait_until(healthy, timeout, "cluster health 'healthy'")


def qemu_io(url: str, *commands: str, cwd: Path, timeout: float = 120) -> str:
    """Run qemu-io commands on an NBD export in one connection (closing it flushes); any
    failed command or pattern mismatch fails the test."""
    cmd = ["qemu-io", "-f", "raw"]
    for command in commands:
        cmd += ["-c", command]
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "failed" in out or "error" in out.lower():
        raise AssertionError(f"qemu-io {commands} on {url} ({proc.returncode}):\n{out[-3000:]}")
    return proc.stdout


class PatternImage:
    """What an export must read back: a model of the qemu-io `write -P` commands sent."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, pattern: int, offset: int, length: int) -> str:
        """Apply to the model; the qemu-io command that does the same to the export."""
        self.data[offset : offset + length] = bytes([pattern]) * length
        return f"write -P {pattern:#x} {offset} {length}"

    def verify(self, url: str, cwd: Path, timeout: float = 120) -> None:
        """Read the whole export with nbdcopy and compare byte for byte."""
        out = cwd / "readback.img"
        out.unlink(missing_ok=True)
        proc = subprocess.run(["nbdcopy", url, str(out)], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        assert proc.returncode == 0, f"nbdcopy {url} failed: {proc.stderr[-2000:]}"
        got = out.read_bytes()
        out.unlink()
        assert len(got) == len(self.data), f"read {len(got)} bytes of {len(self.data)}"
        if got != self.data:
            first = next(i for i, (a, b) in enumerate(zip(got, self.data, strict=True)) if a != b)
            bad = sum(1 for a, b in zip(got, self.data, strict=True) if a != b)
            raise AssertionError(f"{bad} byte(s) differ; the first at {first}: read "
                                 f"{got[first]:#x}, expected {self.data[first]:#x}")


@contextlib.contextmanager
def nodes_stay_healthy(nodes: Sequence[NodeProcess]) -> Iterator[None]:
    """Around a test: every node is still alive after it and logged no traceback during it."""
    starts = [len(node.log()) for node in nodes]
    yield
    for node, start in zip(nodes, starts, strict=True):
        assert node.alive, f"{node.dir.name} died"
        new = node.log()[start:]
        assert "Traceback" not in new, f"{node.dir.name} logged a traceback:\n{new[-5000:]}"
