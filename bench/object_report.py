"""What `python -m bench.objects` reports: the table printed at the end, the issue's aims,
warnings about other load, the machine, and the JSON file of every number (--json)."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from .machine import machine_info
from .object_workload import OBJECT_SIZE, OBJECTS, SHAPES, MiB, Result

# the aims on a 2-core machine, 3 nodes, copies=3
AIMS = {"write-4k-d32": ("ops_per_s", 10_000), "write-1m-d8": ("mb_per_s", 300)}


def object_machine_info(loop_kind: str, busy_before: float, data_fs: str) -> dict:
    """The machine, with the cgroup's CPU limit, the event loop and the data's filesystem."""
    info = machine_info()
    with contextlib.suppress(OSError):
        info["cgroup_cpu_max"] = Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    try:
        import uvloop

        info["event_loop"] = f"uvloop {uvloop.__version__}"
    except ImportError:
        info["event_loop"] = "asyncio"
    info["event_loop"] = loop_kind if loop_kind == "asyncio" else info["event_loop"]
    info["busy_cores_before"] = busy_before
    info["data_fs"] = data_fs
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


def print_report(results: list[Result], machine: dict, config: dict) -> None:
    """The summary printed at the end of a run (config: nodes, copies, seconds, warmup)."""
    print()
    plane = "mutual TLS" if config.get("secure") else "plain TCP"
    print(f"sheep objects: {config['nodes']} nodes, copies={config['copies']}, data plane "
          f"{plane}, {OBJECTS} "
          f"objects x {OBJECT_SIZE // MiB} MiB, {config['seconds']:g} s per shape after "
          f"{config['warmup']:g} s warm-up; client in-process on {machine['event_loop']}; "
          f"data on {machine['data_fs']}")
    print()
    print(markdown(results))
    print()
    for line in aims_report(results):
        print(line)
    worst = max((r.others_cores for r in results), default=0.0)
    before = machine["busy_cores_before"]
    if worst > 0.2:
        print(f"warning: other work kept up to {worst:.2f} cores busy during the run "
              f"(before start: {before:.2f}); the numbers understate the cluster")
    print()
    mem = machine.get("memory_gib", "?")
    print(f"machine: {machine['usable_cores']}/{machine['cores']} cores "
          f"({machine.get('cpu', '?')}), {mem} GiB memory, kernel {machine['kernel']}, "
          f"{machine['python']}, load average at end {machine['loadavg_at_end']}")


def write_json(path: Path, results: list[Result], machine: dict, config: dict) -> None:
    """Every number of the run (config: nodes, copies, seconds, warmup, profile)."""
    doc = {
        "bench": "objects",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "nodes": config["nodes"],
            "copies": config["copies"],
            "secure": config.get("secure", False),
            "object_size": OBJECT_SIZE,
            "objects": OBJECTS,
            "seconds": config["seconds"],
            "warmup": config["warmup"],
            "profile": config["profile"],
        },
        "machine": machine,
        "results": [asdict(r) for r in results],
        "aims": aims_report(results),
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
