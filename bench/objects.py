"""Replicated object I/O against a real 3-node cluster: ops/s, MB/s and latency per shape.

    python -m bench.objects [--seconds S] [--quick] [--json FILE] [--profile] [--secure|--encrypt]

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

This module is the command line; the cluster is launched by sheep/localcluster.py, the
workload is bench/object_workload.py, CPU accounting bench/cpu.py and bench/machine.py,
profiling bench/profiler.py, the report bench/object_report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from sheep.localcluster import LocalCluster
from sheep.oid import data_oid
from sheep.security.identity import Identity

from .machine import busy_cores, filesystem_of
from .object_report import object_machine_info, print_report, write_json
from .object_workload import (
    BENCH_VDI,
    OBJECT_SIZE,
    OBJECTS,
    SHAPES,
    MiB,
    Result,
    Shape,
    object_client,
    prefill,
    run_shape,
    settle,
)
from .profiler import Profiler, find_py_spy

NODES = 3
COPIES = 3
JOIN_TIMEOUT = 60.0


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def start_cluster(cluster: LocalCluster) -> None:
    """Up and formatted (bounded waits), saying how long it took."""
    cluster.start()
    t = time.monotonic()
    cluster.wait_ready(JOIN_TIMEOUT)
    cluster.format(COPIES, OBJECT_SIZE)
    print(f"cluster up and formatted in {time.monotonic() - t:.1f}s "
          f"({NODES} nodes, copies={COPIES}, etcd {cluster.etcd_url})", flush=True)


async def bench(cluster: LocalCluster, args: argparse.Namespace, shapes: list[Shape]
                ) -> list[Result]:
    oids = [data_oid(BENCH_VDI, i) for i in range(OBJECTS)]
    identity = Identity.from_files(cluster.pki.admin) if cluster.pki is not None else None
    async with object_client(cluster.etcd_url, identity,
                             encrypt_loopback=args.encrypt) as client:
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
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    parser.add_argument("--secure", action="store_true",
                        help="nodes with certificates of the cluster's own CA: every "
                             "data-plane connection (this client's as the admin, and the "
                             "nodes' own) is authenticated by mutual TLS, then in the clear "
                             "(loopback links are)")
    parser.add_argument("--encrypt", action="store_true",
                        help="--secure, with every link encrypted too (--encrypt-loopback), "
                             "as links across a network are")
    args = parser.parse_args(argv)
    args.secure = args.secure or args.encrypt
    if args.quick:
        args.seconds = 1.0
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 1.0
    args.shapes = list(SHAPES)
    if args.only:
        unknown = set(args.only) - {s.key for s in SHAPES}
        if unknown:
            parser.error(f"unknown shape(s): {', '.join(sorted(unknown))}")
        args.shapes = [s for s in SHAPES if s.key in args.only]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loop_kind = _install_uvloop()
    signal.signal(signal.SIGTERM, _sigterm)
    before = busy_cores()
    if before > 0.2:
        print(f"warning: {before:.2f} cores are busy with other work before the bench starts",
              flush=True)
    root = Path(tempfile.mkdtemp(prefix="sheep-bench-", dir=args.dir))
    data_fs = filesystem_of(root)
    encrypt = ["--encrypt-loopback"] if args.encrypt else []
    cluster = LocalCluster(root, NODES, prefix="/bench", own_session=True,
                           die_with_parent=True, secure=args.secure,
                           node_extra=lambda _i: encrypt)
    keep = args.keep
    try:
        start_cluster(cluster)
        results = asyncio.run(bench(cluster, args, args.shapes))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        keep = True
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(cluster.logs(), file=sys.stderr)
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

    machine = object_machine_info(loop_kind, before, data_fs)
    config = {"nodes": NODES, "copies": COPIES, "secure": args.secure,
              "encrypt": args.encrypt, "seconds": args.seconds,
              "warmup": args.warmup, "profile": args.profile}
    print_report(results, machine, config)
    if args.json:
        write_json(Path(args.json), results, machine, config)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
