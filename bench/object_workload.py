"""The object benchmark's workload: the shapes (operation, size, depth), the in-process
ObjectClient a gateway would hold, and the loop that drives one shape and measures it.

Each shape runs N coroutine workers (N = depth) in a loop for a short warm-up and then the
measured window; only operations that complete inside the window count. Before the first
shape the objects are written in full (1 MiB writes), and after each shape the nodes are
flushed (untimed) so one shape's writeback does not land in the next one's window."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sheep.objclient import open_client
from sheep.security.identity import Identity

from .cpu import CpuSample, cpu_usage

KiB = 1 << 10
MiB = 1 << 20
OBJECT_SIZE = 4 * MiB
OBJECTS = 64
BENCH_VDI = 0xBE0C


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


def object_client(etcd_url: str, identity: Identity | None = None, *,
                  encrypt_loopback: bool = False):
    """The ObjectClient a gateway would hold, with bench-sized timeouts (as `identity` on
    a secure cluster, its links encrypted with `encrypt_loopback`)."""
    return open_client(etcd_url, identity=identity, encrypt_loopback=encrypt_loopback,
                       timeout=10.0, deadline=30.0)


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
