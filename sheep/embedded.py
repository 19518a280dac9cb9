"""The embedded default: a private etcd and N storage daemons on loopback, in the
foreground, formatted on first start, reused on the next (`sheep up`, `make run`). The
processes are launched by sheep/localcluster.py; here they are supervised (a dead one is
started again after a backoff, sheep/children.py) and the cluster's state is shown."""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from sheep.children import Child
from sheep.control import sheep_pb2 as pb
from sheep.control import sheep_pb2_grpc as pb_grpc
from sheep.control.channel import aio_channel
from sheep.etcd_server import EtcdNotInstalled
from sheep.localcluster import LocalCluster
from sheep.output import unbreakable_output
from sheep.security import config
from sheep.units import format_size

ETCD_CLIENT_OFFSET = 379
ETCD_PEER_OFFSET = 380
DATA_PORT_OFFSET = 100
DEFAULT_NBD_PORT = 10809  # IANA's NBD port; node 0 is the gateway
DEFAULT_ISCSI_PORT = 3260  # IANA's iSCSI port; node 0 is the portal
JOIN_TIMEOUT = 30.0  # s for every node to serve and join, at start


class _Stopped(Exception):
    """Asked to stop (Ctrl-C, SIGTERM) while starting."""


class EmbeddedCluster:
    def __init__(
        self, root: Path, *, nodes: int, copies: int, base_port: int, object_size: int,
        nbd_port: int = DEFAULT_NBD_PORT, iscsi_port: int = DEFAULT_ISCSI_PORT,
        vm: bool = False, restart: bool = True, iscsi_chap_file: str = "",
    ) -> None:
        self.root = root.resolve()
        self.nodes = nodes
        self.copies = copies
        self.base_port = base_port
        self.object_size = object_size
        self.nbd_port = nbd_port
        self.iscsi_port = iscsi_port
        self.iscsi_chap_file = iscsi_chap_file
        self.vm = vm  # boot the demo VM (qemu_driver.demo) once the cluster is up
        self.restart = restart  # start a dead node (or etcd) again, after a backoff
        self.cluster = LocalCluster(
            self.root, nodes,
            etcd_ports=(base_port + ETCD_CLIENT_OFFSET, base_port + ETCD_PEER_OFFSET),
            control_ports=[self.control_port(i) for i in range(nodes)],
            data_ports=[self.data_port(i) for i in range(nodes)],
            node_extra=lambda i: [
                "--nbd-port", str(nbd_port), "--iscsi-port", str(iscsi_port),
                *(["--iscsi-chap-file", str(Path(iscsi_chap_file).resolve())]
                  if iscsi_chap_file else []),
            ] if i == 0 else [],
            node_names=lambda i: f"node {i}",
            own_session=True,  # Ctrl-C reaches sheep up only, which stops them
            die_with_parent=True,
            secure=True,  # its CA and certificates in ROOT/pki, made on first start
        )
        self.etcd = self.cluster.etcd
        self.etcd_child = Child("etcd", self.etcd.log_path, self._launch_etcd)
        self.node_children = [
            Child(node.name, node.log_path, lambda node=node: node.start().proc)
            for node in self.cluster.nodes
        ]
        self._stop = False
        self._demo_started = False
        self._demo: asyncio.Future | None = None  # the demo VM's task, its console attached

    def control_port(self, i: int) -> int:
        return self.base_port + i

    def data_port(self, i: int) -> int:
        return self.base_port + DATA_PORT_OFFSET + i

    def _ports(self) -> dict[int, str]:
        """Every port this cluster listens on, and how to choose another."""
        ports = {
            self.etcd.client_port: "etcd's client port; choose others with --base-port",
            self.etcd.peer_port: "etcd's peer port; choose others with --base-port",
            self.nbd_port: "the NBD gateway's port; choose another with --nbd-port",
            self.iscsi_port: "the iSCSI portal's port; choose another with --iscsi-port",
        }
        for i in range(self.nodes):
            ports[self.control_port(i)] = f"node {i}'s control port; choose others with --base-port"
            ports[self.data_port(i)] = f"node {i}'s data port; choose others with --base-port"
        return ports

    def check_ports(self) -> None:
        """Refuse, before starting anything, a port something else listens on: found later,
        it would leave etcd and the other nodes to clean up, and look like a crash."""
        for port, what in self._ports().items():
            with socket.socket() as sock:
                # as the servers bind: a port left in TIME_WAIT by our last run is free
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    raise RuntimeError(f"port {port} ({what}) is in use") from None

    def _launch_etcd(self) -> subprocess.Popen:
        try:
            self.etcd.start()
        except EtcdNotInstalled:
            raise
        except RuntimeError:
            pass  # it died, or hung and was stopped: reported as a death, with its log
        assert self.etcd.proc is not None
        return self.etcd.proc

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.cluster.write_dog_config()
        self.etcd_child.start()
        self._check_children()
        for child in self.node_children:
            child.start()

    def stop(self) -> None:
        self.cluster.stop()

    async def _wait_and_format(self) -> pb.ClusterInfoReply | None:
        """The formatted cluster's info, once every node serves and has joined; None when
        asked to stop first. The launcher's waits block: they run in a thread, so the
        signal handlers of this loop still run."""

        def check() -> None:
            if self._stop:
                raise _Stopped
            self._check_children()

        try:
            await asyncio.to_thread(self.cluster.wait_ready, JOIN_TIMEOUT, check)
        except _Stopped:
            return None
        info = await asyncio.to_thread(self.cluster.info)
        if not info.cluster_id:
            info = await asyncio.to_thread(self.cluster.format, self.copies, self.object_size)
            print(f"formatted cluster {info.cluster_id}: {info.copies} copies", flush=True)
        return info

    def _check_children(self) -> None:
        """While starting: a dead child is this run's failure, with what it said."""
        for child in (self.etcd_child, *self.node_children):
            if child.dead():
                raise RuntimeError(child.death())

    def _dog_config(self) -> str:
        """Where dog finds this cluster: said as `export SHEEP_CONFIG=...` unless dog finds
        it by itself from here (./var/dog.conf)."""
        path = self.root / "dog.conf"
        if config.DEFAULT.exists() and config.DEFAULT.resolve() == path:
            return f"{config.DEFAULT} (dog finds it from this directory)"
        return f"{path} (export {config.ENV}={path})"

    def _console_attached(self) -> bool:
        return self._demo is not None and not self._demo.done()

    def _say(self, line: str) -> None:
        """An event line; while the demo VM's console has the terminal (raw mode, the guest's
        output around it), set apart on a line of its own and marked as ours."""
        if self._console_attached():
            print(f"\r\n[sheep up] {line}\r", flush=True)
        else:
            print(line, flush=True)

    def _supervise(self) -> None:
        """Once up: a dead child leaves the cluster running degraded, and is started again
        after a backoff unless --no-restart."""
        for child in (self.etcd_child, *self.node_children):
            if not child.dead():
                continue
            if child.restart_at is None:
                if self.restart:
                    delay = child.backoff.delay(child.uptime())
                    self._say(f"{child.death()}; restarting it in {delay:.0f}s")
                    child.restart_at = time.monotonic() + delay
                else:
                    self._say(f"{child.death()}; not restarting it (--no-restart)")
                    child.restart_at = math.inf
            elif time.monotonic() >= child.restart_at:
                child.start()
                if not child.dead():
                    self._say(f"{child.name} restarted (pid {child.proc.pid})")

    async def _watch(self) -> None:
        # Our own handlers for Ctrl-C and SIGTERM, setting a flag the loops below poll: a
        # script's `sheep up &` starts with SIGINT ignored, which Python (and so asyncio.run's
        # KeyboardInterrupt) leaves alone, and `kill -INT` then did nothing at all.
        wake = asyncio.Event()

        def request_stop() -> None:
            self._stop = True
            wake.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # HUP: terminal closed
            loop.add_signal_handler(sig, request_stop)
        async with aio_channel(self.cluster.address, self.cluster.admin) as channel:
            stub = pb_grpc.ControlStub(channel)
            if await self._wait_and_format() is None:
                return
            etcd = self.etcd_child
            print(f"etcd: pid {etcd.proc.pid}  {self.etcd.url}  log {etcd.log}", flush=True)
            for i, child in enumerate(self.node_children):
                print(
                    f"node {i}: pid {child.proc.pid}  control 127.0.0.1:{self.control_port(i)}  "
                    f"data 127.0.0.1:{self.data_port(i)}  log {child.log}",
                    flush=True,
                )
            print(f"nbd: nbd://127.0.0.1:{self.nbd_port}/VDI  (every VDI by name; "
                  f"NAME@TAG is a read-only snapshot)", flush=True)
            chap = (f"CHAP as the USER:SECRET in {self.iscsi_chap_file}; "
                    if self.iscsi_chap_file else "")
            who = "USER%SECRET@" if self.iscsi_chap_file else ""
            print(f"iscsi: portal 127.0.0.1:{self.iscsi_port}, target "
                  f"iqn.2026-11.io.sheep:VDI per VDI, LUN 0 (iqn.2026-11.io.sheep:VDI:TAG "
                  f"is a read-only snapshot; {chap}iscsi-ls "
                  f"iscsi://{who}127.0.0.1:{self.iscsi_port})", flush=True)
            print(f"dog: its address and the admin's certificate are in {self._dog_config()}",
                  flush=True)
            print(f"try: dog vdi create disk 10G; "
                  f"qemu-img info nbd://127.0.0.1:{self.nbd_port}/disk   (Ctrl-C stops)",
                  flush=True)
            if self.vm:
                from qemu_driver.demo import run_demo

                self._demo = asyncio.ensure_future(run_demo(
                    self.etcd.url, self.root / "vm", self.cluster.admin,
                    disk_identity=self.cluster.client))
                self._demo_started = True
            last = ""
            while not self._stop:
                demo = self._demo
                if demo is not None and demo.done():
                    if not demo.cancelled() and demo.exception() is not None:
                        print(f"vm: {demo.exception()}", flush=True)
                    self._demo = None
                    last = ""  # the console had the terminal: say where the cluster is
                self._supervise()
                try:
                    info = await stub.ClusterInfo(pb.Empty(), timeout=5)
                    nodes = await stub.NodeList(pb.Empty(), timeout=5)
                    used = sum(n.used for n in nodes.nodes)
                    state = (
                        f"cluster {info.status}, epoch {info.epoch}, {len(nodes.nodes)} node(s), "
                        f"{info.copies} copies, {format_size(used)} used"
                    )
                except grpc.aio.AioRpcError as exc:
                    state = f"cluster unreachable: {exc.details()}"
                # routine status waits while the guest's console has the terminal
                if state != last and not self._console_attached():
                    print(time.strftime("%H:%M:%S"), state, flush=True)
                    last = state
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        await wake.wait()

    def run_foreground(self) -> int:
        def request_stop(*_args: object) -> None:
            self._stop = True

        unbreakable_output()  # a print must never skip the stop path below
        signal.signal(signal.SIGTERM, request_stop)
        try:
            self.check_ports()
        except RuntimeError as exc:
            print(f"sheep: {exc}", file=sys.stderr, flush=True)
            return 1
        code = 0
        try:
            self.start()
            asyncio.run(self._watch())
        except KeyboardInterrupt:
            pass
        except RuntimeError as exc:
            print(f"sheep: {exc}", file=sys.stderr, flush=True)
            code = 1
        finally:
            print("stopping...", flush=True)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if self._demo_started:
                from qemu_driver.demo import stop_demo

                asyncio.run(stop_demo(self.etcd.url, identity=self.cluster.admin))
            self.stop()
            print("stopped", flush=True)
        return code
