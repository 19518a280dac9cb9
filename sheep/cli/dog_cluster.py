"""`dog cluster check|gc`: commands over every object of the cluster, run as a client of
the cluster itself (objects over the data plane)."""

from __future__ import annotations

import argparse

from sheep.oid import oid_str
from sheep.units import format_size
from sheep.vdi.check import check_objects, vdi_objects
from sheep.vdi.gc import collect_garbage

from .common import cluster_manager, print_check_report, progress_bar, progress_option
from .output import emit


async def cluster_check(stub, args) -> None:
    """Every replica of every object any VDI or snapshot references (shared ones once)."""
    async with cluster_manager(stub, args, "cluster") as m:
        state = await m.state()
        oids: set[int] = set()
        for rec in state.records.values():
            oids.update(await vdi_objects(m.client, rec))
        config = m.client.view.config
        assert config is not None
        report = await check_objects(m.client, sorted(oids), config.object_size,
                                     repair=args.repair,
                                     progress=progress_bar(args.progress, "check", objects=True))
    print_check_report(report, args)


async def cluster_gc(stub, args) -> None:
    """Remove what deleted VDIs left on nodes that were down when they were deleted."""
    async with cluster_manager(stub, args, "cluster") as m:
        report = await collect_garbage(m.client, m.registry, dry_run=args.dry_run,
                                       progress=progress_bar(args.progress, "gc", objects=True))
        config = m.client.view.config
        object_size = config.object_size if config is not None else 0
    by_vdi = report.by_vdi()
    if args.json:
        emit({"scanned": report.scanned, "garbage": [oid_str(o) for o in report.garbage],
               "removed": report.removed, "dry_run": args.dry_run,
               "deleted_vdis": [{"id": vdi, "objects": n} for vdi, n in by_vdi.items()]})
        return
    if args.verbose:
        for oid in report.garbage:
            print(f"object {oid_str(oid)}: of a deleted VDI, unreferenced"
                  + ("" if args.dry_run else " (removed)"))
    for vdi, count in by_vdi.items():
        print(f"deleted VDI {vdi:#x}: {count} object(s)")
    size = report.data_objects() * object_size  # deleted VDIs' own sizes are gone
    print(f"{report.scanned} object(s) scanned: {len(report.garbage)} garbage "
          f"({report.data_objects()} data objects, up to {format_size(size)}) of "
          f"{len(by_vdi)} deleted VDI(s); "
          + ("nothing removed (--dry-run)" if args.dry_run else f"{report.removed} removed"))


def add_cluster_commands(cluster: argparse._SubParsersAction,
                         common: argparse.ArgumentParser) -> None:
    p = cluster.add_parser("gc", parents=[common],
                           help="remove objects of deleted VDIs left on nodes that were down")
    p.add_argument("--dry-run", action="store_true", help="list the garbage, remove nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per object too")
    progress_option(p)
    p.set_defaults(func=cluster_gc)
    p = cluster.add_parser("check", parents=[common],
                           help="compare every replica of every object; --repair fixes")
    p.add_argument("--repair", action="store_true", help="rewrite bad replicas from good ones")
    progress_option(p)
    p.set_defaults(func=cluster_check)
