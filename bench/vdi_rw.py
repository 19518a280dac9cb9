"""Whole-VDI streaming the way Sheepdog users measure it: `dog vdi write` and `dog vdi read`.

    python -m bench.vdi_rw [--size 1G] [--repeat 3] [--quick] [--json FILE] [--dir DIR]

Brings up a private 3-node cluster (copies=3, no NBD gateway), writes a file of random
bytes of --size, and per repeat: `dog vdi create` a new VDI of that size, then times
`time dog vdi write NAME < file` and `time dog vdi read NAME > file` (wall clock of the
whole command, process start included, as a user's `time` would show), checks that what
came back is what went in (untimed), and deletes the VDI (untimed). Reports MB/s (10^6
bytes/s) of each, the median of the repeats. `python -m bench` runs the same against its
own cluster; this module is also usable alone. Everything started is stopped at the end,
also on Ctrl-C and errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

from sheep.units import format_size, parse_size

from .systems import SheepSystem, dog, dog_binary

MiB = 1 << 20
CHUNK = 4 * MiB


def make_input(path: Path, size: int) -> str:
    """A file of `size` random bytes; returns its xxh3-128 digest."""
    digest = xxhash.xxh3_128()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(CHUNK, left))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _timed_dog(address: str, args: list[str], stdin: Path | None, stdout: Path | None,
               timeout: float) -> float:
    cmd = [dog_binary(), *args, "-a", address]
    with open(stdin or os.devnull, "rb") as fin, open(stdout or os.devnull, "wb") as fout:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdin=fin, stdout=fout, stderr=subprocess.PIPE,
                              timeout=timeout, start_new_session=True)
        elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    return elapsed


def run(address: str, size: int, repeat: int, workdir: Path,
        log: Callable[[str], object] = print) -> list[dict]:
    """Every write and read of every repeat, as dicts (op, repeat, bytes, seconds, MB/s)."""
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "input.raw"
    back = workdir / "output.raw"
    want = make_input(source, size)
    timeout = max(300.0, size / 2e6)  # bounded, but not by a speed we would report
    runs: list[dict] = []
    try:
        for r in range(repeat):
            name = f"vdirw-{r}"
            dog(address, "vdi", "create", name, str(size))
            for op, args, fin, fout in (
                ("write", ["vdi", "write", name], source, None),
                ("read", ["vdi", "read", name], None, back),
            ):
                seconds = _timed_dog(address, args, fin, fout, timeout)
                runs.append({"op": op, "repeat": r, "bytes": size, "seconds": seconds,
                             "mb_per_s": size / seconds / 1e6})
                log(f"  dog vdi {op:<5} {format_size(size):>9}  run {r + 1}/{repeat}: "
                    f"{size / seconds / 1e6:8.1f} MB/s ({seconds:.2f} s)")
            got = file_digest(back)
            if got != want or back.stat().st_size != size:
                raise RuntimeError(f"dog vdi read {name} did not return what was written")
            dog(address, "vdi", "delete", name, timeout=300)
    finally:
        for path in (source, back):
            path.unlink(missing_ok=True)
    return runs


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per op: the median MB/s and seconds over the repeats."""
    out: dict[str, dict] = {}
    for op in ("write", "read"):
        mine = [r for r in runs if r["op"] == op]
        if mine:
            out[op] = {
                "bytes": mine[0]["bytes"],
                "runs": len(mine),
                "mb_per_s": statistics.median(r["mb_per_s"] for r in mine),
                "seconds": statistics.median(r["seconds"] for r in mine),
                "min_mb_per_s": min(r["mb_per_s"] for r in mine),
                "max_mb_per_s": max(r["mb_per_s"] for r in mine),
            }
    return out


def markdown(summary: dict[str, dict]) -> str:
    rows = ["| dog vdi | size | MB/s (median) | seconds | runs (min-max MB/s) |",
            "|---|---:|---:|---:|---|"]
    for op, s in summary.items():
        rows.append(f"| {op} | {format_size(s['bytes'])} | {s['mb_per_s']:,.1f} | "
                    f"{s['seconds']:.2f} | {s['runs']} ({s['min_mb_per_s']:,.1f}-"
                    f"{s['max_mb_per_s']:,.1f}) |")
    return "\n".join(rows)


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vdi_rw", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="bytes per VDI (default 1G)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--quick", action="store_true", help="64 MiB, one run")
    parser.add_argument("--json", metavar="FILE", help="write every run to FILE")
    parser.add_argument("--dir", help="where the cluster's temporary directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory")
    args = parser.parse_args(argv)
    size = 64 * MiB if args.quick else parse_size(args.size)
    repeat = 1 if args.quick else args.repeat
    if size <= 0 or repeat < 1:
        parser.error("--size and --repeat must be positive")

    signal.signal(signal.SIGTERM, _sigterm)
    root = Path(tempfile.mkdtemp(prefix="sheep-bench-vdirw-", dir=args.dir))
    cluster = SheepSystem(root=root / "sheep", size=size, nbd=False)
    keep = args.keep
    try:
        t = time.monotonic()
        cluster.start()
        print(f"cluster up in {time.monotonic() - t:.1f}s (3 nodes, copies=3)", flush=True)
        runs = run(cluster.address, size, repeat, root / "vdi_rw")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        keep = True
        print(f"bench failed: {type(exc).__name__}: {exc}\n{cluster.logs()}", file=sys.stderr)
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

    summary = summarize(runs)
    print()
    print(markdown(summary))
    if args.json:
        doc = {"bench": "vdi_rw", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "config": {"size": size, "repeat": repeat}, "runs": runs, "summary": summary}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
