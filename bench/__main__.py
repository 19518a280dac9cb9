"""sheep over NBD next to nbdkit and qemu-nbd, driven by fio: `make bench`, `python -m bench`.

    python -m bench [--seconds 20] [--repeat 3] [--size 1G] [--quick] [--out DIR] [--dir DIR]

Brings up, in a temporary directory (under --dir), a private etcd and a 3-node sheep
cluster with copies=3 whose node 0 serves NBD, and creates a VDI of --size; next to it,
nbdkit's file plugin and qemu-nbd each serve a raw file of the same size (see
bench/systems.py for how each one is configured). Every export is first filled with a
sequential write of the whole volume, so random reads hit allocated data everywhere (a thin
VDI's holes would read unfairly fast). Then, --repeat times, every shape runs on every
system (the systems' order rotates between repeats, so a slow moment of a shared machine
does not always fall on the same one), and each shape and system reports the median of its
repeats. Last, `dog vdi write` and `dog vdi read` of --vdi-rw-size (bench/vdi_rw.py).

Why this exists: the numbers say where sheep stands against C servers of one local copy
on the same machine, and they are what the team optimises. Speeds are never asserted; the
suite only checks that `--quick` (2 s per run, one repeat, 256 MiB; options given
explicitly win, and the suite shortens the runs and the volume further) still produces a
complete report. Output in --out (default bench/results/<timestamp>/): report.md (the table
printed at the end), results.json (every run, the machine and tool versions), chart.png,
fio/*.json (fio's own output of every run). Everything started is stopped at
the end, also on Ctrl-C, SIGTERM and errors (then the data directory is kept for its logs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sheep.units import parse_size

from . import fio, report, vdi_rw
from .cpu import cpu_seconds
from .machine import busy_cores, filesystem_of, machine_info, machine_jiffies
from .systems import (
    SYSTEMS,
    SheepSystem,
    System,
    make_system,
    sheep_commit,
    tool_versions,
)

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"
OTHER_LOAD_WARNING = 0.3  # cores


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured_run(system: System, shape: fio.Shape, output: Path, seconds: float,
                 ramp: float) -> dict:
    """One fio run plus where the CPU went meanwhile (server, fio, anything else)."""
    pids = system.pids()
    server0 = sum(cpu_seconds(p) for p in pids)
    fio0 = _children_cpu()
    jiffies0 = machine_jiffies()
    t0 = time.perf_counter()
    numbers = fio.run(system.uri, shape, output, seconds, ramp,
                      timeout=seconds + ramp + 120)
    wall = time.perf_counter() - t0
    jiffies = [b - a for a, b in zip(jiffies0, machine_jiffies(), strict=True)]
    total = sum(jiffies) or 1
    busy = (total - jiffies[3] - jiffies[4]) / total * len(os.sched_getaffinity(0))
    server = (sum(cpu_seconds(p) for p in pids) - server0) / wall
    fio_cores = (_children_cpu() - fio0) / wall
    return {
        **numbers,
        "wall_s": wall,
        "server_cores": server,  # CPU of the server's processes / wall time of the run
        "fio_cores": fio_cores,
        "machine_busy_cores": busy,
        "other_cores": max(0.0, busy - server - fio_cores),
    }


def attempts(system: System, what: str, fn: Callable[[], dict], tries: int = 3) -> dict:
    """fn() after system.ready(); a failed fio run is retried (after ready() again) up to
    `tries` times in all, and the result says how many it took (see SheepSystem.ready)."""
    for attempt in range(1, tries + 1):
        system.ready()
        try:
            result = fn()
        except RuntimeError as exc:
            system.check_alive()
            if attempt == tries:
                raise
            print(f"  {what} on {system.name} failed, retrying: {str(exc)[-300:]}", flush=True)
            time.sleep(1.0)
            continue
        return {**result, "attempts": attempt}
    raise AssertionError("unreachable")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float,
                        help="measured seconds per run (default 20)")
    parser.add_argument("--ramp", type=float, default=None,
                        help="uncounted warm-up per run (default 2 s; 0.5 s with --quick)")
    parser.add_argument("--repeat", type=int,
                        help="runs per shape and system; the median is reported (default 3)")
    parser.add_argument("--size", help="volume size (default 1G)")
    parser.add_argument("--quick", action="store_true",
                        help="2 s per run, 1 repeat, 256 MiB volume, 64 MiB dog vdi write/read "
                             "(options given explicitly still win)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    parser.add_argument("--only", action="append", metavar="SHAPE",
                        help="run only this shape (repeatable): "
                             + ", ".join(s.key for s in fio.SHAPES))
    parser.add_argument("--vdi-rw-size",
                        help="bytes of the dog vdi write/read runs (default 1G)")
    parser.add_argument("--no-vdi-rw", action="store_true", help="skip dog vdi write/read")
    parser.add_argument("--out", help="output directory (default bench/results/<timestamp>/)")
    parser.add_argument("--dir", help="where the data directory goes (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)
    presets = {"seconds": 2.0, "repeat": 1, "size": "256M", "vdi_rw_size": "64M",
               "ramp": 0.5} if args.quick else {
        "seconds": 20.0, "repeat": 3, "size": "1G", "vdi_rw_size": "1G", "ramp": 2.0}
    for option, value in presets.items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    try:
        args.size = parse_size(args.size)
        args.vdi_rw_size = parse_size(args.vdi_rw_size)
    except ValueError as exc:
        parser.error(str(exc))
    if args.size < MiB or args.size % MiB:
        parser.error("--size must be a whole number of MiB")
    if args.seconds <= 0 or args.repeat < 1 or args.ramp < 0 or args.vdi_rw_size <= 0:
        parser.error("--seconds, --repeat and --vdi-rw-size must be positive")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown or not args.systems:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown)) or '(none)'}")
    args.shapes = list(fio.SHAPES)
    if args.only:
        unknown = set(args.only) - set(fio.SHAPES_BY_KEY)
        if unknown:
            parser.error(f"unknown shape(s): {', '.join(sorted(unknown))}")
        args.shapes = [s for s in fio.SHAPES if s.key in args.only]
    return args


def bench(args: argparse.Namespace, systems: list[System], out: Path, doc: dict) -> None:
    """Start, fill, measure; appends to doc as it goes (a failure keeps what was done)."""
    for system in systems:
        t = time.monotonic()
        system.start()
        print(f"{system.name} up in {time.monotonic() - t:.1f}s: {system.uri}", flush=True)
    (out / "fio").mkdir(parents=True, exist_ok=True)
    for system in systems:
        system.check_alive()
        rel = Path("fio") / f"fill-{system.name}.json"
        t = time.perf_counter()
        numbers = attempts(system, "fill", lambda s=system, r=rel: fio.run(
            s.uri, fio.FILL, out / r, None, timeout=max(300.0, args.size / 2e6)))
        system.settle()
        seconds = time.perf_counter() - t
        doc["fills"].append({"system": system.name, "bytes": args.size, "seconds": seconds,
                             "mb_per_s": numbers["mb_per_s"], "attempts": numbers["attempts"],
                             "fio_output": str(rel)})
        print(f"filled {system.name}: {args.size / MiB:g} MiB at "
              f"{numbers['mb_per_s']:,.0f} MB/s (+ flush: {seconds:.1f} s)", flush=True)

    for rep in range(args.repeat):
        order = systems[rep % len(systems):] + systems[: rep % len(systems)]
        for shape in args.shapes:
            for system in order:
                system.check_alive()
                rel = Path("fio") / f"{system.name}-{shape.key}-r{rep}.json"
                run = attempts(system, shape.key, lambda s=system, sh=shape, r=rel:
                               measured_run(s, sh, out / r, args.seconds, args.ramp))
                if shape.op == "write":
                    system.settle()
                doc["runs"].append({"shape": shape.key, "system": system.name,
                                    "repeat": rep, "rw": shape.rw, "bs": shape.bs,
                                    "depth": shape.depth, **run, "fio_output": str(rel)})
                print(f"  [{rep + 1}/{args.repeat}] {shape.key:<17} {system.name:<8} "
                      f"{run['iops']:>9,.0f} IOPS {run['mb_per_s']:>8,.1f} MB/s  "
                      f"p50 {run['p50_us']:>7,.0f} µs  p99 {run['p99_us']:>7,.0f} µs  "
                      f"server {run['server_cores']:.2f} cores", flush=True)

    sheep = next((s for s in systems if isinstance(s, SheepSystem)), None)
    if sheep is not None and not args.no_vdi_rw:
        doc["vdi_rw"] = {"config": {"size": args.vdi_rw_size, "repeat": args.repeat},
                         "runs": []}
        runs = vdi_rw.run(sheep.address, args.vdi_rw_size, args.repeat,
                          sheep.root / "vdi_rw", log=lambda line: print(line, flush=True))
        doc["vdi_rw"]["runs"] = runs
        doc["vdi_rw"]["summary"] = vdi_rw.summarize(runs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else RESULTS / stamp
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _sigterm)
    before = busy_cores()
    if before > OTHER_LOAD_WARNING:
        print(f"warning: {before:.2f} cores are busy with other work before the bench starts",
              flush=True)
    root = Path(tempfile.mkdtemp(prefix="sheep-bench-nbd-", dir=args.dir))
    systems = [make_system(name, root, args.size) for name in args.systems]
    doc: dict = {
        "bench": "nbd",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": False,
        "config": {
            "volume_size": args.size, "seconds": args.seconds, "ramp": args.ramp,
            "repeat": args.repeat, "quick": args.quick, "systems": args.systems,
            "shapes": [s.key for s in args.shapes],
            "shape_labels": {s.key: s.label for s in args.shapes},
            "vdi_rw_size": None if args.no_vdi_rw else args.vdi_rw_size,
            "fio_command_example": " ".join(fio.command(
                "nbd://127.0.0.1:PORT/EXPORT", fio.SHAPES[1], Path("OUT.json"),
                args.seconds, args.ramp)),
            "data_dir": str(root),
        },
        "systems": [],
        "fills": [],
        "runs": [],
    }
    code = 0
    keep = args.keep
    try:
        bench(args, systems, out, doc)
        doc["complete"] = True
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:
        keep = True
        code = 1
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        for system in systems:
            with contextlib.suppress(Exception):
                print(system.logs(), file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        doc["systems"] = [s.describe() for s in systems]
        for system in reversed(systems):
            with contextlib.suppress(Exception):
                system.stop()
        data_fs = filesystem_of(root)
        if keep:
            print(f"data directory kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    doc["machine"] = {**machine_info(), "versions": tool_versions(),
                      "sheep_commit": sheep_commit(), "data_fs": data_fs,
                      "busy_cores_before": before}
    doc["summary"] = report.summarize(doc["runs"])
    doc["targets"] = report.targets(doc["summary"], (doc.get("vdi_rw") or {}).get("summary"))
    others = [r["other_cores"] for r in doc["runs"]]
    if others and statistics.median(others) > OTHER_LOAD_WARNING:
        doc["warnings"] = [f"other work kept a median {statistics.median(others):.2f} "
                           f"(max {max(others):.2f}) cores busy during the runs: every "
                           f"number is lower than on an idle machine"]
    if not doc["complete"]:
        doc.setdefault("warnings", []).append("the run did not finish: the report is partial")
    paths = report.write_all(doc, out)
    print()
    print(paths["markdown"].read_text())
    print(f"wrote {paths['markdown']}, {paths['json']}, {paths['chart']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
