"""Replicated object I/O against a real 3-node cluster: ops/s, MB/s and latency per shape.

    python -m bench.objects [--seconds S] [--quick] [--json FILE] [--profile]

Brings up, in a temporary directory, a private etcd and three `sheep run` daemons on
loopback ports chosen at run time, formats the cluster with copies=3, and drives it with an
ObjectClient running in this process on uvloop (as a gateway would hold one). Each shape
runs N coroutine workers (N = depth) in a loop for a short warm-up and then `--seconds`;
only operations that complete inside the measured window count. Before the first shape the
64 objects are written in full (1 MiB writes), and after each shape the nodes are flushed
(untimed) so one shape's writeback does not land in the next one's window. Everything
started here is stopped at the end, also on Ctrl-C, SIGTERM and errors; every wait is
bounded. The filesystem under --dir matters (page-cache costs differ): it is reported.

MB/s is 10^6 bytes per second of object payload (replication traffic not included: a
replicated 1 MiB write moves 3 MiB over loopback). CPU columns are the CPU time used
during the window divided by the operations, by the client (this process) and by the three
daemons. "other load" is how many cores were busy with anything else (not the client, the
daemons or etcd): on a shared machine, a concurrent test run makes every number lower;
"steal" is the share of CPU time the hypervisor gave to other guests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from sheep.control import sheep_pb2 as pb
from sheep.control import sheep_pb2_grpc as pb_grpc
from sheep.etcd_server import EtcdServer
from sheep.objclient import open_client
from sheep.oid import data_oid

KiB = 1 << 10
MiB = 1 << 20
NODES = 3
COPIES = 3
OBJECT_SIZE = 4 * MiB
OBJECTS = 64
BENCH_VDI = 0xBE0C
JOIN_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1

# the aims on a 2-core machine, 3 nodes, copies=3
AIMS = {"write-4k-d32": ("ops_per_s", 10_000), "write-1m-d8": ("mb_per_s", 300)}


@dataclass(frozen=True)
class Shape:
    op: str  # "write" or "read"
    size: int
    depth: int

    @property
    def key(self) -> str:
        size = f"{self.size // MiB}m" if self.size >= MiB else f"{self.size // KiB}k"
        return f"{self.op}-{size}-d{self.depth}"

    @property
    def label(self) -> str:
        size = f"{self.size // MiB} MiB" if self.size >= MiB else f"{self.size // KiB} KiB"
        return f"{self.op} {size}"


SHAPES = (
    Shape("write", 4 * KiB, 1),
    Shape("write", 4 * KiB, 32),
    Shape("write", 1 * MiB, 8),
    Shape("read", 4 * KiB, 32),
    Shape("read", 1 * MiB, 8),
)


@dataclass
class Result:
    shape: str
    op: str
    size: int
    depth: int
    seconds: float
    ops: int
    ops_per_s: float
    mb_per_s: float
    mib_per_s: float
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float
    # CPU time in the measured window: exact per-process runtimes (client = this process,
    # daemons = the three nodes) and the whole machine's busy time (all processes, softirq)
    client_cpu_us_per_op: float
    daemons_cpu_us_per_op: float
    machine_cpu_us_per_op: float
    client_cpu_pct: float  # % of one core
    daemons_cpu_pct: float
    machine_busy_pct: float  # % of all cores
    machine_softirq_pct: float
    machine_steal_pct: float  # CPU the hypervisor gave to someone else
    others_cores: float  # cores busy with something else than the client, daemons and etcd
    client_sys_share: float  # estimated part of the client's CPU spent in the kernel
    daemons_sys_share: float


# -- processes --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the bench dies without cleaning up."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _ticks(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, from /proc (tick-sampled: a split only)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0, 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _runtime(pid: int) -> float:
    """CPU seconds of a process's live threads, from the scheduler's exact runtimes."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def _machine_jiffies() -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


@dataclass
class CpuSample:
    at: float
    client: float
    daemons: float
    etcd: float
    client_ticks: tuple[float, float]
    daemons_ticks: tuple[float, float]
    machine: list[int]

    @classmethod
    def take(cls, daemon_pids: list[int], etcd_pid: int | None) -> CpuSample:
        me = os.getpid()
        ticks = [_ticks(p) for p in daemon_pids]
        return cls(
            at=time.perf_counter(),
            client=_runtime(me),
            daemons=sum(_runtime(p) for p in daemon_pids),
            etcd=_runtime(etcd_pid) if etcd_pid else 0.0,
            client_ticks=_ticks(me),
            daemons_ticks=(sum(t[0] for t in ticks), sum(t[1] for t in ticks)),
            machine=_machine_jiffies(),
        )


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores the machine keeps busy over `seconds` (before the bench starts)."""
    a = _machine_jiffies()
    time.sleep(seconds)
    d = [y - x for x, y in zip(a, _machine_jiffies(), strict=True)]
    total = sum(d) or 1
    return round((total - d[3] - d[4]) / total * len(os.sched_getaffinity(0)), 2)


def cpu_usage(a: CpuSample, b: CpuSample, ops: int) -> dict[str, float]:
    """CPU between two samples: per operation, as % of one core, and machine-wide."""
    window = b.at - a.at
    client = b.client - a.client
    daemons = b.daemons - a.daemons
    etcd = b.etcd - a.etcd

    def sys_share(t0: tuple[float, float], t1: tuple[float, float]) -> float:
        user, system = t1[0] - t0[0], t1[1] - t0[1]
        return round(system / (user + system), 3) if user + system else 0.0

    jiffies = [y - x for x, y in zip(a.machine, b.machine, strict=True)]
    total = sum(jiffies) or 1
    idle = jiffies[3] + jiffies[4]
    cores = len(os.sched_getaffinity(0))
    busy_core_s = (total - idle) / total * cores * window
    per_op = 1e6 / ops if ops else 0.0
    return {
        "client_cpu_us_per_op": client * per_op,
        "daemons_cpu_us_per_op": daemons * per_op,
        "machine_cpu_us_per_op": busy_core_s * per_op,
        "client_cpu_pct": 100 * client / window,
        "daemons_cpu_pct": 100 * daemons / window,
        "machine_busy_pct": 100 * (total - idle) / total,
        # busy cores not explained by the bench's processes: other work on this machine
        "others_cores": max(0.0, busy_core_s - client - daemons - etcd) / window,
        "machine_softirq_pct": 100 * jiffies[6] / total,
        "machine_steal_pct": 100 * jiffies[7] / total,
        "client_sys_share": sys_share(a.client_ticks, b.client_ticks),
        "daemons_sys_share": sys_share(a.daemons_ticks, b.daemons_ticks),
    }


@dataclass
class BenchCluster:
    root: Path
    etcd: EtcdServer | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    control_ports: list[int] = field(default_factory=list)
    prefix: str = "/bench"

    @property
    def etcd_url(self) -> str:
        assert self.etcd is not None
        return self.etcd.url + self.prefix

    def log_path(self, i: int) -> Path:
        return self.root / f"node{i}.log"

    def start(self) -> None:
        self.etcd = EtcdServer(
            self.root / "etcd", free_port(), free_port(), self.root / "etcd.log"
        )
        self.etcd.start()
        for i in range(NODES):
            port = free_port()
            self.control_ports.append(port)
            with open(self.log_path(i), "ab") as log:
                self.procs.append(
                    subprocess.Popen(
                        [
                            sys.executable, "-m", "sheep", "run",
                            "--dir", str(self.root / f"node{i}"),
                            "--port", str(port),
                            "--etcd", self.etcd_url,
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,  # Ctrl-C reaches the bench; it stops them
                        preexec_fn=_die_with_parent,
                    )
                )

    def check_alive(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                raise RuntimeError(f"node {i} exited with {proc.returncode}:\n{self.tail(i)}")

    def tail(self, i: int, lines: int = 15) -> str:
        try:
            text = self.log_path(i).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def etcd_pid(self) -> int | None:
        return self.etcd.proc.pid if self.etcd is not None and self.etcd.proc else None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.etcd is not None:
            self.etcd.stop()

    async def wait_and_format(self) -> None:
        """Wait (bounded) until all nodes are in the current epoch, then format."""
        deadline = time.monotonic() + JOIN_TIMEOUT
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.control_ports[0]}") as channel:
            stub = pb_grpc.ControlStub(channel)
            while True:
                self.check_alive()
                try:
                    reply = await stub.NodeList(pb.Empty(), timeout=3)
                    if len(reply.nodes) == NODES and all(n.reachable for n in reply.nodes):
                        break
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{NODES} nodes did not join within {JOIN_TIMEOUT:.0f}s")
                await asyncio.sleep(0.2)
            info = await stub.FormatCluster(
                pb.FormatRequest(copies=COPIES, object_size=OBJECT_SIZE), timeout=10
            )
            if info.copies != COPIES:
                raise RuntimeError(f"format gave {info.copies} copies, not {COPIES}")


# -- the in-process client --------------------------------------------------------------


def object_client(etcd_url: str):
    """The ObjectClient a gateway would hold, with bench-sized timeouts."""
    return open_client(etcd_url, timeout=10.0, deadline=30.0)


def _percentile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    i = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[i] / 1000


async def run_shape(
    client,
    shape: Shape,
    oids: list[int],
    seconds: float,
    warmup: float,
    daemon_pids: list[int],
    etcd_pid: int | None,
) -> Result:
    payload = os.urandom(shape.size) if shape.op == "write" else b""
    slots = OBJECT_SIZE // shape.size
    latencies: list[int] = []
    now = time.perf_counter_ns()
    begin = now + int(warmup * 1e9)
    end = begin + int(seconds * 1e9)
    op: Callable[[int, int], Awaitable[object]]
    if shape.op == "write":
        def op(oid: int, offset: int) -> Awaitable[object]:
            return client.write(oid, offset, payload)
    else:
        def op(oid: int, offset: int) -> Awaitable[object]:
            return client.read(oid, offset, shape.size)

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        clock = time.perf_counter_ns
        record = latencies.append
        n_oids = len(oids)
        while True:
            oid = oids[rng.randrange(n_oids)]
            offset = rng.randrange(slots) * shape.size
            t0 = clock()
            await op(oid, offset)
            t1 = clock()
            if t1 >= end:
                return
            if t1 >= begin:
                record(t1 - t0)

    samples: list[CpuSample] = []

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, (begin - time.perf_counter_ns()) / 1e9))
        samples.append(CpuSample.take(daemon_pids, etcd_pid))
        await asyncio.sleep(max(0.0, (end - time.perf_counter_ns()) / 1e9))
        samples.append(CpuSample.take(daemon_pids, etcd_pid))

    async with asyncio.timeout(warmup + seconds + 60), asyncio.TaskGroup() as tg:
        tg.create_task(sample_cpu())
        for i in range(shape.depth):
            tg.create_task(worker(shape.size * 1000 + shape.depth * 100 + i))

    latencies.sort()
    ops = len(latencies)
    return Result(
        shape=shape.key,
        op=shape.op,
        size=shape.size,
        depth=shape.depth,
        seconds=round(seconds, 3),
        ops=ops,
        ops_per_s=ops / seconds,
        mb_per_s=ops * shape.size / seconds / 1e6,
        mib_per_s=ops * shape.size / seconds / MiB,
        p50_us=_percentile(latencies, 0.50),
        p99_us=_percentile(latencies, 0.99),
        mean_us=sum(latencies) / ops / 1000 if ops else 0.0,
        max_us=latencies[-1] / 1000 if ops else 0.0,
        **cpu_usage(samples[0], samples[1], ops),
    )


async def prefill(client, oids: list[int]) -> None:
    """Write every object in full (reads must hit data, not holes), then check one read."""
    chunk = os.urandom(MiB)
    jobs = [(oid, off) for oid in oids for off in range(0, OBJECT_SIZE, MiB)]

    async def worker() -> None:
        while jobs:
            oid, off = jobs.pop()
            await client.write(oid, off, chunk)

    async with asyncio.timeout(120), asyncio.TaskGroup() as tg:
        for _ in range(8):
            tg.create_task(worker())
    got = await client.read(oids[0], 4 * KiB, 4 * KiB)
    if bytes(got) != chunk[4 * KiB : 8 * KiB]:
        raise RuntimeError("read-back after prefill does not match what was written")


async def settle(client) -> None:
    """Untimed, between shapes: make the nodes write back what the last shape dirtied, so
    its writeback does not run (and cost CPU) inside the next shape's window."""
    await asyncio.wait_for(client.flush(), 120)


# -- profiling --------------------------------------------------------------------------


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy record on the daemons and on this process, for the length of the shapes."""

    def __init__(self, py_spy: str, out_dir: Path, fmt: str, rate: int) -> None:
        self.py_spy = py_spy
        self.out_dir = out_dir
        self.fmt = fmt
        self.rate = rate
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, targets: dict[str, int]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ext = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[self.fmt]
        for name, pid in targets.items():
            with open(self.out_dir / f"{name}.py-spy.log", "ab") as log:
                proc = subprocess.Popen(
                    [
                        self.py_spy, "record", "--pid", str(pid), "--rate", str(self.rate),
                        "--nonblocking", "--format", self.fmt,
                        "-o", str(self.out_dir / f"{name}.{ext}"),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.procs.append((name, proc))

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        deadline = time.monotonic() + 60
        for name, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"py-spy for {name} did not finish; killing it", file=sys.stderr)
                proc.kill()
                proc.wait(5)
        self.procs.clear()


# -- report -----------------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    """'TYPE on DEVICE (MOUNTPOINT)' of the mount holding `path`, from /proc/mounts."""
    best = ("", "?", "?")
    target = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    return f"{best[1]} on {best[2]} ({best[0]})"


def machine_info() -> dict:
    info: dict = {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["cgroup_cpu_max"] = Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    try:
        import uvloop

        info["event_loop"] = f"uvloop {uvloop.__version__}"
    except ImportError:
        info["event_loop"] = "asyncio"
    return info


def markdown(results: list[Result]) -> str:
    rows = [
        "| shape | depth | ops/s | MB/s | p50 µs | p99 µs | client CPU µs/op "
        "| daemons CPU µs/op | other load (cores) | steal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        label = next(s.label for s in SHAPES if s.key == r.shape)
        rows.append(
            f"| {label} | {r.depth} | {r.ops_per_s:,.0f} | {r.mb_per_s:,.1f} | "
            f"{r.p50_us:,.0f} | {r.p99_us:,.0f} | {r.client_cpu_us_per_op:,.0f} | "
            f"{r.daemons_cpu_us_per_op:,.0f} | {r.others_cores:.2f} | "
            f"{r.machine_steal_pct:.1f}% |"
        )
    return "\n".join(rows)


def aims_report(results: list[Result]) -> list[str]:
    by_key = {r.shape: r for r in results}
    lines = []
    for key, (metric, target) in AIMS.items():
        r = by_key.get(key)
        if r is None:
            continue
        value = getattr(r, metric)
        unit = "ops/s" if metric == "ops_per_s" else "MB/s"
        mark = "met" if value >= target else "NOT met"
        lines.append(f"aim {key}: >= {target:,} {unit}: {value:,.0f} ({mark})")
    return lines


# -- main -------------------------------------------------------------------------------


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


async def bench(cluster: BenchCluster, args: argparse.Namespace, shapes: list[Shape]) -> dict:
    t = time.monotonic()
    await cluster.wait_and_format()
    print(f"cluster up and formatted in {time.monotonic() - t:.1f}s "
          f"({NODES} nodes, copies={COPIES}, etcd {cluster.etcd_url})", flush=True)
    oids = [data_oid(BENCH_VDI, i) for i in range(OBJECTS)]
    async with object_client(cluster.etcd_url) as client:
        t = time.monotonic()
        await prefill(client, oids)
        await settle(client)
        print(f"pre-wrote {OBJECTS} x {OBJECT_SIZE // MiB} MiB objects in "
              f"{time.monotonic() - t:.1f}s", flush=True)
        profiler: Profiler | None = None
        if args.profile:
            py_spy = find_py_spy()
            if py_spy is None:
                print("--profile: py-spy is not installed (pip install py-spy); "
                      "running without it", flush=True)
            else:
                out = Path(args.profile_dir or tempfile.mkdtemp(prefix="sheep-bench-profile-"))
                profiler = Profiler(py_spy, out, args.profile_format, args.profile_rate)
                targets = {f"node{i}": pid for i, pid in enumerate(cluster.pids())}
                targets["client"] = os.getpid()
                profiler.start(targets)
                await asyncio.sleep(1.0)  # let py-spy attach
        results: list[Result] = []
        try:
            for shape in shapes:
                cluster.check_alive()
                r = await run_shape(
                    client, shape, oids, args.seconds, args.warmup, cluster.pids(),
                    cluster.etcd_pid(),
                )
                results.append(r)
                await settle(client)
                print(f"  {shape.key:<13} {r.ops_per_s:>9,.0f} ops/s {r.mb_per_s:>8,.1f} MB/s"
                      f"  p50 {r.p50_us:>7,.0f} µs  p99 {r.p99_us:>7,.0f} µs", flush=True)
        finally:
            if profiler is not None:
                profiler.stop()
                print(f"profiles in {profiler.out_dir}", flush=True)
    return {"results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.objects", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per shape")
    parser.add_argument("--warmup", type=float, default=None,
                        help="warm-up per shape (default 1 s; 0.3 s with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 s per shape")
    parser.add_argument("--json", metavar="FILE", help="write all numbers to FILE")
    parser.add_argument("--only", action="append", metavar="SHAPE",
                        help="run only this shape (repeatable): "
                             + ", ".join(s.key for s in SHAPES))
    parser.add_argument("--profile", action="store_true",
                        help="record the daemons and the client with py-spy, if installed")
    parser.add_argument("--profile-dir", help="where profiles go (default: a new temp dir)")
    parser.add_argument("--profile-format", default="flamegraph",
                        choices=("flamegraph", "raw", "speedscope"))
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument("--dir", help="where the cluster's temporary directory goes "
                                      "(default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 1.0
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 1.0
    shapes = list(SHAPES)
    if args.only:
        unknown = set(args.only) - {s.key for s in SHAPES}
        if unknown:
            parser.error(f"unknown shape(s): {', '.join(sorted(unknown))}")
        shapes = [s for s in SHAPES if s.key in args.only]

    loop_kind = _install_uvloop()
    signal.signal(signal.SIGTERM, _sigterm)
    before = busy_cores()
    if before > 0.2:
        print(f"warning: {before:.2f} cores are busy with other work before the bench starts",
              flush=True)
    root = Path(tempfile.mkdtemp(prefix="sheep-bench-", dir=args.dir))
    data_fs = filesystem_of(root)
    cluster = BenchCluster(root)
    keep = args.keep
    try:
        cluster.start()
        out = asyncio.run(bench(cluster, args, shapes))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        keep = True
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        for i in range(len(cluster.procs)):
            print(f"--- node{i}.log (tail) ---\n{cluster.tail(i)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if keep:
            print(f"cluster directory kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    results: list[Result] = out["results"]
    machine = machine_info()
    machine["event_loop"] = loop_kind if loop_kind == "asyncio" else machine["event_loop"]
    machine["busy_cores_before"] = before
    machine["data_fs"] = data_fs
    print()
    print(f"sheep objects: {NODES} nodes, copies={COPIES}, {OBJECTS} objects x "
          f"{OBJECT_SIZE // MiB} MiB, {args.seconds:g} s per shape after {args.warmup:g} s "
          f"warm-up; client in-process on {machine['event_loop']}; data on {data_fs}")
    print()
    print(markdown(results))
    print()
    for line in aims_report(results):
        print(line)
    worst = max((r.others_cores for r in results), default=0.0)
    if worst > 0.2:
        print(f"warning: other work kept up to {worst:.2f} cores busy during the run "
              f"(before start: {before:.2f}); the numbers understate the cluster")
    print()
    mem = machine.get("memory_gib", "?")
    print(f"machine: {machine['usable_cores']}/{machine['cores']} cores "
          f"({machine.get('cpu', '?')}), {mem} GiB memory, kernel {machine['kernel']}, "
          f"{machine['python']}, load average at end {machine['loadavg_at_end']}")
    if args.json:
        doc = {
            "bench": "objects",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {
                "nodes": NODES,
                "copies": COPIES,
                "object_size": OBJECT_SIZE,
                "objects": OBJECTS,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "profile": args.profile,
            },
            "machine": machine,
            "results": [asdict(r) for r in results],
            "aims": aims_report(results),
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
