"""The machine a benchmark runs on: what it is (cores, memory, kernel, the filesystem under
the data) and how busy it is with other work, from /proc. Shared by `python -m bench` and
`python -m bench.objects`."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path


def machine_jiffies() -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores the machine keeps busy over `seconds` (before the bench starts)."""
    a = machine_jiffies()
    time.sleep(seconds)
    d = [y - x for x, y in zip(a, machine_jiffies(), strict=True)]
    total = sum(d) or 1
    return round((total - d[3] - d[4]) / total * len(os.sched_getaffinity(0)), 2)


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
    return info
