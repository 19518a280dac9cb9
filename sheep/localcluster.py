"""Local clusters on loopback, launched one way for `sheep up` (sheep/embedded.py), the
benchmarks (bench/) and the tests (tests/cluster.py): a private etcd (sheep/etcd_server.py)
and `sheep run` daemons, started, waited for, formatted and stopped.

A node is ready when its ready file (`sheep run --ready-file`, sheep/node/ready.py) holds
its pid: nothing here reads log text. Every wait is bounded, and so is every stop (SIGTERM,
then SIGKILL after a deadline shared by all the processes being stopped). A node's log
(appended across runs) is DIR.log beside its data directory DIR, its ready file DIR.ready.
"""

from __future__ import annotations

import functools
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from sheep.children import death_line, die_with_parent
from sheep.control import sheep_pb2 as pb
from sheep.control import sheep_pb2_grpc as pb_grpc
from sheep.control.channel import sync_channel
from sheep.etcd_server import EtcdServer
from sheep.etcd_users import EtcdUsers
from sheep.netaddr import host_port
from sheep.node.ready import read_ready_file, remove_ready_file
from sheep.security.identity import Identity
from sheep.security.local import LocalPki, node_args

READY_TIMEOUT = 60.0  # s for nodes to serve and the cluster to list them all
STOP_TIMEOUT = 15.0  # s from SIGTERM to SIGKILL
POLL = 0.05


class LaunchError(RuntimeError):
    """A process of a local cluster died, or was not ready in time."""


def free_port() -> int:
    """A loopback port free now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_processes(procs: Iterable[subprocess.Popen | None],
                   timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to every live one at once, then wait; SIGKILL whoever is left at the
    deadline."""
    live = [p for p in procs if p is not None]
    for proc in live:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in live:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class NodeProcess:
    """One `sheep run` daemon: its data directory, control port, etcd URL (with its key
    prefix) and any other `sheep run` options."""

    dir: Path
    port: int
    etcd_url: str
    extra: list[str] = field(default_factory=list)
    data_port: int = 0  # 0: any free port (published in etcd and in the ready file)
    name: str = ""  # in messages; default: the data directory's name
    own_session: bool = False  # a terminal's Ctrl-C reaches the launcher only, which stops it
    # SIGTERM when the launcher dies, even of SIGKILL; the signal follows the thread that
    # started it, so start such a node from the main thread only (sheep/children.py)
    die_with_parent: bool = False
    host: str = "127.0.0.1"  # the address it binds and is dialled at (--bind)
    proc: subprocess.Popen | None = None
    log_start: int = 0  # where this run's lines begin in the (appended) log

    def __post_init__(self) -> None:
        self.name = self.name or self.dir.name

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    @property
    def log_path(self) -> Path:
        return self.dir.with_suffix(".log")

    @property
    def ready_path(self) -> Path:
        return self.dir.with_suffix(".ready")

    def argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "sheep", "run",
            "--dir", str(self.dir),
            "--port", str(self.port),
            *(["--data-port", str(self.data_port)] if self.data_port else []),
            "--etcd", self.etcd_url,
            *(["--bind", self.host] if self.host != "127.0.0.1" else []),
            *self.extra,
            "--ready-file", str(self.ready_path),
        ]
        return die_with_parent(argv) if self.die_with_parent else argv

    def start(self) -> NodeProcess:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        remove_ready_file(self.ready_path)  # a killed run's file must not pass for this one's
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=self.own_session,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> dict | None:
        """What this run wrote in its ready file (pid, ports) once it serves; None before.
        A dead node is a LaunchError saying why, with this run's last log lines."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            raise LaunchError(self.death())
        doc = read_ready_file(self.ready_path)
        return doc if doc is not None and doc.get("pid") == self.proc.pid else None

    def wait_ready(self, timeout: float = READY_TIMEOUT,
                   check: Callable[[], None] | None = None) -> dict:
        """The ready file's contents, once there; `check` runs at each poll (it may raise
        to give up)."""
        return wait_ready([self], timeout, check)[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 3) -> str:
        """The last lines this run wrote, ' | ' between them."""
        text = self.log()[self.log_start:]
        return " | ".join(text.strip().splitlines()[-lines:])

    def death(self) -> str:
        assert self.proc is not None and self.proc.returncode is not None
        rc = self.proc.returncode
        return death_line(self.name, rc, self.tail() if rc > 0 else "")

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 20) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)
            self.proc.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, SIGKILL after `timeout`; the exit code (None: never started)."""
        if self.proc is None:
            return None
        stop_processes([self.proc], timeout)
        return self.proc.returncode


def wait_ready(nodes: list[NodeProcess], timeout: float = READY_TIMEOUT,
               check: Callable[[], None] | None = None) -> list[dict]:
    """Until every node serves: their ready files' contents, in order."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        docs = [node.ready() for node in nodes]
        if all(doc is not None for doc in docs):
            return docs  # type: ignore[return-value]
        if time.monotonic() > deadline:
            late = ", ".join(n.name for n, d in zip(nodes, docs, strict=True) if d is None)
            raise LaunchError(f"{late} did not get ready within {timeout:.0f}s; see "
                              f"{nodes[0].log_path.parent}/*.log")
        time.sleep(POLL)


def _control(address: str, identity: Identity | None) -> tuple[grpc.Channel,
                                                                pb_grpc.ControlStub]:
    channel = sync_channel(address, identity)
    return channel, pb_grpc.ControlStub(channel)


def wait_members(address: str, count: int, timeout: float = READY_TIMEOUT,
                 check: Callable[[], None] | None = None,
                 identity: Identity | None = None) -> pb.NodeListReply:
    """Until the node at `address` lists at least `count` members of the current epoch,
    every one of them reachable."""
    deadline = time.monotonic() + timeout
    channel, stub = _control(address, identity)
    with channel:
        while True:
            if check is not None:
                check()
            try:
                reply = stub.NodeList(pb.Empty(), timeout=3)
                if len(reply.nodes) >= count and all(n.reachable for n in reply.nodes):
                    return reply
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise LaunchError(f"{count} nodes did not join within {timeout:.0f}s")
            time.sleep(0.2)


def cluster_info(address: str, identity: Identity | None = None) -> pb.ClusterInfoReply:
    channel, stub = _control(address, identity)
    with channel:
        return stub.ClusterInfo(pb.Empty(), timeout=5)


def format_cluster(address: str, copies: int, object_size: int = 0,
                   identity: Identity | None = None) -> pb.ClusterInfoReply:
    """`dog cluster format` (object_size 0: the default); the formatted cluster's info."""
    channel, stub = _control(address, identity)
    with channel:
        info = stub.FormatCluster(pb.FormatRequest(copies=copies, object_size=object_size),
                                  timeout=10)
    if info.copies != copies:
        raise LaunchError(f"format gave {info.copies} copies, not {copies}")
    return info


class LocalCluster:
    """A private etcd in ROOT/etcd (log ROOT/etcd.log) and `nodes` daemons in ROOT/nodeI,
    on the ports given or on free loopback ports. `node_extra(i)`: more `sheep run`
    options of node i (a gateway's ports, say)."""

    def __init__(
        self, root: Path, nodes: int, *,
        etcd_ports: tuple[int, int] | None = None,
        control_ports: list[int] | None = None,
        data_ports: list[int] | None = None,
        prefix: str = "",
        node_extra: Callable[[int], list[str]] = lambda i: [],
        node_names: Callable[[int], str] = lambda i: "",
        own_session: bool = False,
        die_with_parent: bool = False,
        secure: bool = False,
    ) -> None:
        self.root = root
        # secure: a CA and certificates in ROOT/pki (sheep/security/local.py), each node
        # started with its own, and ROOT/dog.conf naming the admin's
        self.pki = LocalPki.ensure(root, nodes) if secure else None
        client, peer = etcd_ports or (free_port(), free_port())
        # secure: etcd too serves https only, to certificates of the cluster's CA
        # (sheep/etcd_users.py: the admin and the nodes, not the cluster's other holders)
        self.etcd = EtcdServer(
            root / "etcd", client, peer, root / "etcd.log",
            tls=self.pki.etcd if self.pki else None,
            users=EtcdUsers(self.pki.admin, tuple(self.pki.node(i) for i in range(nodes)))
            if self.pki else None)
        self.prefix = prefix
        control_ports = control_ports or [free_port() for _ in range(nodes)]
        data_ports = data_ports or [0] * nodes
        self.nodes = [
            NodeProcess(root / f"node{i}", control_ports[i], self.etcd_url,
                        extra=[*(node_args(self.pki.node(i)) if self.pki else []),
                               *node_extra(i)],
                        data_port=data_ports[i],
                        name=node_names(i), own_session=own_session,
                        die_with_parent=die_with_parent)
            for i in range(nodes)
        ]

    @property
    def etcd_url(self) -> str:
        return self.etcd.url + self.prefix

    @functools.cached_property
    def admin(self) -> Identity | None:
        """The admin's identity on a secure cluster (what dog would use)."""
        return Identity.from_files(self.pki.admin) if self.pki else None

    @functools.cached_property
    def client(self) -> Identity | None:
        """The disks' clients' identity on a secure cluster (what QEMU shows NBD)."""
        return Identity.from_files(self.pki.client) if self.pki else None

    def write_dog_config(self, path: Path | None = None) -> Path | None:
        """ROOT/dog.conf (or `path`) naming node 0 and the admin's certificate."""
        if self.pki is None:
            return None
        return self.pki.write_dog_config(path or self.root / "dog.conf", self.address)

    @property
    def address(self) -> str:
        """Node 0's control address."""
        return self.nodes[0].address

    def start(self) -> None:
        """etcd (waiting until it listens), then every node (not waiting)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.etcd.start()
        for node in self.nodes:
            node.start()

    def check_alive(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is not None:
                raise LaunchError(node.death())

    def wait_ready(self, timeout: float = READY_TIMEOUT,
                   check: Callable[[], None] | None = None) -> None:
        """Until every node serves and node 0 lists them all, reachable; bounded by
        `timeout` in all."""
        deadline = time.monotonic() + timeout
        wait_ready(self.nodes, timeout, check)
        left = max(1.0, deadline - time.monotonic())

        def alive() -> None:
            if check is not None:
                check()
            self.check_alive()

        wait_members(self.address, len(self.nodes), left, alive, self.admin)

    def format(self, copies: int, object_size: int = 0) -> pb.ClusterInfoReply:
        return format_cluster(self.address, copies, object_size, self.admin)

    def info(self) -> pb.ClusterInfoReply:
        return cluster_info(self.address, self.admin)

    def up(self, copies: int, object_size: int = 0,
           timeout: float = READY_TIMEOUT) -> pb.ClusterInfoReply:
        """Start, wait until ready, format: the formatted cluster's info."""
        self.start()
        self.wait_ready(timeout)
        return self.format(copies, object_size)

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes if n.proc is not None]

    def etcd_pid(self) -> int | None:
        return self.etcd.proc.pid if self.etcd.proc is not None else None

    def logs(self, lines: int = 15) -> str:
        """The last lines of every node's log, for a report of a failure."""
        out = []
        for node in self.nodes:
            if node.proc is None:
                continue
            text = node.log().splitlines()[-lines:]
            out.append(f"--- {node.log_path.name} (tail) ---\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Every node (bounded), then etcd."""
        stop_processes([n.proc for n in self.nodes], timeout)
        self.etcd.stop()
