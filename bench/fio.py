"""fio's nbd engine as the load generator: the shapes, the command lines, and the parsing.

Why fio and not our own client: it is what people use to compare block devices, it is
written in C (the client costs little CPU next to the servers on a 2-core machine), and its
nbd engine (libnbd) talks to every system in the same way over one TCP connection, so the
systems differ only in the server. One job, one connection, `iodepth` requests in flight.

Each measured run is time based: `--ramp_time` of warm-up that is not counted, then
`--runtime` seconds. Random shapes use --norandommap (a real random workload, no block
bitmap); sizes and offsets cover the whole export (fio takes its size from the server).
Latencies are fio's completion latency (clat: from handing the request to libnbd until the
reply arrives), p50 and p99. MB/s is 10^6 bytes per second.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

KiB = 1 << 10
MiB = 1 << 20


@dataclass(frozen=True)
class Shape:
    key: str
    rw: str  # fio's --rw: randread, randwrite, read, write
    bs: int
    depth: int

    @property
    def op(self) -> str:
        return "read" if "read" in self.rw else "write"

    @property
    def metric(self) -> str:
        """What the shape is judged by: IOPS for small blocks, MB/s for large ones."""
        return "iops" if self.bs < MiB else "mb_per_s"

    @property
    def label(self) -> str:
        size = f"{self.bs // MiB} MiB" if self.bs >= MiB else f"{self.bs // KiB} KiB"
        kind = "random" if self.rw.startswith("rand") else "sequential"
        return f"{size} {kind} {self.op} d{self.depth}"


SHAPES = (
    Shape("randread-4k-d1", "randread", 4 * KiB, 1),
    Shape("randread-4k-d32", "randread", 4 * KiB, 32),
    Shape("randwrite-4k-d1", "randwrite", 4 * KiB, 1),
    Shape("randwrite-4k-d32", "randwrite", 4 * KiB, 32),
    Shape("read-1m-d8", "read", MiB, 8),
    Shape("write-1m-d8", "write", MiB, 8),
)
SHAPES_BY_KEY = {s.key: s for s in SHAPES}

FILL = Shape("fill-1m-d8", "write", MiB, 8)


def command(uri: str, shape: Shape, output: Path, seconds: float | None,
            ramp: float = 0.0) -> list[str]:
    """fio's command line; seconds=None: one pass over the whole export (the fill)."""
    cmd = [
        "fio", f"--name={shape.key}", "--ioengine=nbd", f"--uri={uri}",
        f"--rw={shape.rw}", f"--bs={shape.bs}", f"--iodepth={shape.depth}",
        "--percentile_list=50:99:99.9", "--output-format=json", f"--output={output}",
    ]
    if shape.rw.startswith("rand"):
        cmd.append("--norandommap")
    if seconds is not None:
        cmd += ["--time_based", f"--runtime={fio_time(seconds)}"]
        if ramp > 0:
            cmd.append(f"--ramp_time={fio_time(ramp)}")
    return cmd


def fio_time(seconds: float) -> str:
    """A duration as fio reads it: it takes whole units only ("0.5s" would be 0)."""
    return f"{seconds:g}s" if seconds == int(seconds) else f"{round(seconds * 1000)}ms"


def run(uri: str, shape: Shape, output: Path, seconds: float | None, ramp: float = 0.0,
        timeout: float = 600.0) -> dict:
    """Run fio once (bounded), keep its JSON in `output`, return the parsed numbers."""
    cmd = command(uri, shape, output, seconds, ramp)
    # its own process group: fio forks a process per job, and on a timeout or Ctrl-C both
    # must go (the terminal's SIGINT reaches only the bench, which stops everything)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"fio {shape.key} against {uri} failed ({proc.returncode}): "
                           f"{(stderr or stdout).strip()[-2000:]}")
    return parse(json.loads(output.read_text()), shape)


def _pct(clat: dict, key: str) -> float:
    return clat.get("percentile", {}).get(key, 0) / 1000


def parse(doc: dict, shape: Shape) -> dict:
    """IOPS, MB/s and completion latency (µs) of the one job in fio's JSON output."""
    job = doc["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job {shape.key} reported error {job['error']}")
    side = job[shape.op]
    clat = side.get("clat_ns", {})
    runtime_s = side.get("runtime", 0) / 1000
    return {
        "iops": side["iops"],
        "mb_per_s": side["bw_bytes"] / 1e6,
        "ios": side["total_ios"],
        "bytes": side["io_bytes"],
        "runtime_s": runtime_s,
        "p50_us": _pct(clat, "50.000000"),
        "p99_us": _pct(clat, "99.000000"),
        "p999_us": _pct(clat, "99.900000"),
        "mean_us": clat.get("mean", 0) / 1000,
        "max_us": clat.get("max", 0) / 1000,
        "fio_usr_cpu_pct": job.get("usr_cpu", 0.0),
        "fio_sys_cpu_pct": job.get("sys_cpu", 0.0),
    }

