"""Where the CPU went while a benchmark ran: per process (this client, the daemons, etcd)
and machine-wide, from /proc. The exact per-thread runtimes (schedstat) give the totals;
the tick-sampled user/system times only their split."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .machine import machine_jiffies


def ticks(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, from /proc (tick-sampled: a split only)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0, 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a whole process (exited threads included), from /proc."""
    user, system = ticks(pid)
    return user + system


def runtime(pid: int) -> float:
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
        daemon_ticks = [ticks(p) for p in daemon_pids]
        return cls(
            at=time.perf_counter(),
            client=runtime(me),
            daemons=sum(runtime(p) for p in daemon_pids),
            etcd=runtime(etcd_pid) if etcd_pid else 0.0,
            client_ticks=ticks(me),
            daemons_ticks=(sum(t[0] for t in daemon_ticks), sum(t[1] for t in daemon_ticks)),
            machine=machine_jiffies(),
        )


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
