"""What every `dog` command module shares: its one error type, the cluster a command acts
on as a client, tables, times and progress bars."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable

from sheep.control import sheep_pb2 as pb
from sheep.control import sheep_pb2_grpc as pb_grpc
from sheep.units import format_size
from sheep.vdi.manager import VdiManager, open_manager

from .output import emit

RPC_TIMEOUT = 15.0


class DogError(Exception):
    """A one-line error for the user (bad input, a refused request): dog exits 1 with it."""


class Interrupted(Exception):
    """A command stopped by SIGINT or SIGTERM, after cleaning up: dog prints what it left
    on one line and exits 130."""


@contextlib.asynccontextmanager
async def cluster_manager(stub: pb_grpc.ControlStub, args: argparse.Namespace, what: str
                          ) -> AsyncIterator[VdiManager]:
    """The cluster of the node -a names, opened as a client of its own (registry in etcd,
    objects over the data plane): bulk work never squeezes through the control plane.
    `what` names the command in lock holders' records."""
    info = await stub.ClusterInfo(pb.Empty(), timeout=RPC_TIMEOUT)
    if not info.cluster_id:
        raise DogError("the cluster is not formatted (dog cluster format)")
    holder = f"dog {what} {args.cmd}"
    async with open_manager(info.etcd, holder=holder,
                            identity=getattr(args, "identity", None)) as manager:
        yield manager


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *rows])


def free_space(nodes) -> int:
    """Free bytes across the reachable nodes (NodeStats), each filesystem once: nodes
    whose data dirs share one filesystem share its free space."""
    free: dict[str, int] = {}
    for i, s in enumerate(nodes):
        if s.reachable:
            free[s.filesystem or f"node {i}"] = s.free
    return sum(free.values())


def progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   default=sys.stderr.isatty(), help="show a progress bar on stderr")


def progress_bar(enabled: bool, what: str, *, objects: bool = False
                 ) -> Callable[[int, int], None] | None:
    """A progress bar on stderr: on a terminal by default, or when --progress asks. It
    counts bytes, or with `objects`, objects."""
    if not enabled:
        return None
    last = [-1]

    def show(done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        if pct == last[0]:
            return
        last[0] = pct
        bar = "#" * (pct // 4)
        amount = (f"{done}/{total} objects" if objects
                  else f"{format_size(done)} / {format_size(total)}")
        sys.stderr.write(f"\r{what} [{bar:<25}] {pct:3d}% {amount}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def print_check_report(report, args: argparse.Namespace) -> None:
    """A check's findings (vdi check, cluster check); exit 1 when anything stays bad."""
    if args.json:
        emit(report.as_dict())
    else:
        for f in report.findings:
            print(f"object {f.oid} on node {f.node[:12]}: {f.problem}"
                  + (" (repaired)" if f.repaired else ""))
        for oid in report.unrepairable:
            print(f"object {oid}: no good copy to repair from")
        print(f"{report.objects} object(s) checked: "
              + ("all replicas present and identical" if report.clean else
                 f"{len(report.findings)} bad replica(s)"))
    if report.unrepairable or any(not f.repaired for f in report.findings):
        raise SystemExit(1)
