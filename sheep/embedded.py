"""The embedded default: a private etcd and N storage daemons on loopback, in the
foreground, formatted on first start, reused on the next (`sheep up`, `make run`)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from sheep.control import sheep_pb2 as pb
from sheep.control import sheep_pb2_grpc as pb_grpc
from sheep.etcd_server import EtcdServer
from sheep.units import format_size

ETCD_CLIENT_OFFSET = 379
ETCD_PEER_OFFSET = 380
DATA_PORT_OFFSET = 100
DEFAULT_NBD_PORT = 10809  # IANA's NBD port; node 0 is the gateway
DEFAULT_ISCSI_PORT = 3260  # IANA's iSCSI port; node 0 is the portal


class EmbeddedCluster:
    def __init__(
        self, root: Path, *, nodes: int, copies: int, base_port: int, object_size: int,
        nbd_port: int = DEFAULT_NBD_PORT, iscsi_port: int = DEFAULT_ISCSI_PORT,
        vm: bool = False,
    ) -> None:
        self.root = root.resolve()
        self.nodes = nodes
        self.copies = copies
        self.base_port = base_port
        self.object_size = object_size
        self.nbd_port = nbd_port
        self.iscsi_port = iscsi_port
        self.vm = vm  # boot the demo VM (qemu_driver.demo) once the cluster is up
        self.etcd = EtcdServer(
            self.root / "etcd",
            base_port + ETCD_CLIENT_OFFSET,
            base_port + ETCD_PEER_OFFSET,
            self.root / "etcd.log",
        )
        self.procs: list[subprocess.Popen] = []
        self._stop = False

    def control_port(self, i: int) -> int:
        return self.base_port + i

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.etcd.start()
        for i in range(self.nodes):
            log = open(self.root / f"node{i}.log", "ab")  # noqa: SIM115 - owned by the child
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable, "-m", "sheep", "run",
                        "--dir", str(self.root / f"node{i}"),
                        "--port", str(self.control_port(i)),
                        "--data-port", str(self.base_port + DATA_PORT_OFFSET + i),
                        "--etcd", self.etcd.url,
                        *(["--nbd-port", str(self.nbd_port)] if i == 0 else []),
                        *(["--iscsi-port", str(self.iscsi_port)] if i == 0 else []),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            log.close()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.etcd.stop()

    async def _wait_and_format(self, stub: pb_grpc.ControlStub) -> pb.ClusterInfoReply | None:
        """The formatted cluster's info; None when asked to stop first."""
        deadline = time.monotonic() + 30
        while True:
            if self._stop:
                return None
            self._check_children()
            try:
                nodes = await stub.NodeList(pb.Empty(), timeout=3)
                if len(nodes.nodes) >= self.nodes:
                    break
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the nodes did not all join within 30s; see {self.root}/*.log")
            await asyncio.sleep(0.2)
        info = await stub.ClusterInfo(pb.Empty(), timeout=5)
        if not info.cluster_id:
            info = await stub.FormatCluster(
                pb.FormatRequest(copies=self.copies, object_size=self.object_size), timeout=10
            )
            print(f"formatted cluster {info.cluster_id}: {info.copies} copies", flush=True)
        return info

    def _check_children(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                tail = (self.root / f"node{i}.log").read_text(errors="replace").splitlines()[-3:]
                raise RuntimeError(
                    f"node {i} exited with {proc.returncode}: " + " | ".join(tail)
                )

    async def _watch(self) -> None:
        # Our own handlers for Ctrl-C and SIGTERM, setting a flag the loops below poll: a
        # script's `sheep up &` starts with SIGINT ignored, which Python (and so asyncio.run's
        # KeyboardInterrupt) leaves alone, and `kill -INT` then did nothing at all.
        wake = asyncio.Event()

        def request_stop() -> None:
            self._stop = True
            wake.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, request_stop)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.control_port(0)}") as channel:
            stub = pb_grpc.ControlStub(channel)
            if await self._wait_and_format(stub) is None:
                return
            print(f"etcd: {self.etcd.url}", flush=True)
            for i in range(self.nodes):
                print(
                    f"node {i}: control 127.0.0.1:{self.control_port(i)}  "
                    f"data 127.0.0.1:{self.base_port + DATA_PORT_OFFSET + i}  "
                    f"log {self.root}/node{i}.log",
                    flush=True,
                )
            print(f"nbd: nbd://127.0.0.1:{self.nbd_port}/VDI  (every VDI by name; "
                  f"NAME@TAG is a read-only snapshot)", flush=True)
            print(f"iscsi: portal 127.0.0.1:{self.iscsi_port}, target "
                  f"iqn.2026-11.io.sheep:VDI per VDI, LUN 0 (iqn.2026-11.io.sheep:VDI:TAG "
                  f"is a read-only snapshot; iscsi-ls iscsi://127.0.0.1:{self.iscsi_port})",
                  flush=True)
            print(f"try: dog vdi create disk 10G -a 127.0.0.1:{self.control_port(0)}; "
                  f"qemu-img info nbd://127.0.0.1:{self.nbd_port}/disk   (Ctrl-C stops)",
                  flush=True)
            demo = None
            if self.vm:
                from qemu_driver.demo import run_demo

                demo = asyncio.ensure_future(run_demo(self.etcd.url, self.root / "vm"))
            last = ""
            while not self._stop:
                if demo is not None and demo.done():
                    if not demo.cancelled() and demo.exception() is not None:
                        print(f"vm: {demo.exception()}", flush=True)
                    demo = None
                self._check_children()
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
                if state != last:
                    print(time.strftime("%H:%M:%S"), state, flush=True)
                    last = state
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        await wake.wait()

    def run_foreground(self) -> int:
        def request_stop(*_args: object) -> None:
            self._stop = True

        signal.signal(signal.SIGTERM, request_stop)
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
            if self.vm:
                from qemu_driver.demo import stop_demo

                asyncio.run(stop_demo(self.etcd.url))
            self.stop()
            print("stopped", flush=True)
        return code
