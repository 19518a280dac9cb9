"""dog: the admin CLI, with Sheepdog's command names, over the gRPC control plane."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable

import grpc

from sheep.control import sheep_pb2 as pb
from sheep.control import sheep_pb2_grpc as pb_grpc
from sheep.control.channel import aio_channel
from sheep.errors import SheepError
from sheep.malloc import keep_freed_memory
from sheep.netaddr import host_port
from sheep.oid import DEFAULT_OBJECT_SIZE
from sheep.security import config
from sheep.security.identity import Identity
from sheep.security.pki import PkiError
from sheep.units import format_size, parse_size

from .common import (
    RPC_TIMEOUT,
    DogError,
    Interrupted,
    free_space,
    progress_bar,
    progress_option,
    table,
    when,
)
from .dog_certs import add_certs_commands
from .dog_cluster import add_cluster_commands
from .dog_vdi import add_vdi_commands
from .dog_vm import add_vm_commands
from .output import (
    Parser,
    add_version,
    emit,
    error_code,
    message_dict,
    os_error_line,
    quiet_broken_pipe,
    report_error,
    stdout_closed,
)

DEFAULT_ADDRESS = "127.0.0.1:7000"


def _emit_json(message) -> None:
    emit(message_dict(message))


RECENT_EPOCHS = 10  # what `dog cluster info` shows without --all


async def _node_list(stub: pb_grpc.ControlStub) -> pb.NodeListReply:
    """The nodes in address order (host, then control port): stable from call to call, and
    the numbering `sheep up` uses (its node i listens on BASE_PORT+i). The cluster's own
    order is by node id, which means nothing to a user."""
    reply = await stub.NodeList(pb.Empty(), timeout=RPC_TIMEOUT)
    nodes = sorted(reply.nodes, key=lambda s: (s.node.host, s.node.control_port))
    return pb.NodeListReply(nodes=nodes)


# -- commands ------------------------------------------------------------------------------


async def cluster_format(stub: pb_grpc.ControlStub, args: argparse.Namespace) -> None:
    try:
        object_size = parse_size(args.object_size)
    except ValueError as exc:
        raise DogError(str(exc)) from None
    reply = await stub.FormatCluster(
        pb.FormatRequest(copies=args.copies, object_size=object_size), timeout=RPC_TIMEOUT
    )
    if args.json:
        _emit_json(reply)
    else:
        print(f"cluster {reply.cluster_id} formatted: {reply.copies} copies, "
              f"{format_size(reply.object_size)} objects, epoch {reply.epoch}")


async def cluster_info(stub: pb_grpc.ControlStub, args: argparse.Namespace) -> None:
    """The last RECENT_EPOCHS epochs, or with --all every one since the cluster began."""
    reply = await stub.ClusterInfo(pb.Empty(), timeout=RPC_TIMEOUT)
    if not args.all:
        del reply.history[:-RECENT_EPOCHS]
    if args.json:
        _emit_json(reply)
        return
    print(f"Cluster status: {reply.status}")
    if reply.cluster_id:
        print(f"Cluster id: {reply.cluster_id}")
        print(f"Created: {when(reply.created)}")
        print(f"Copies: {reply.copies}")
        print(f"Object size: {format_size(reply.object_size)}")
        print(f"Health: {reply.health}")
        for warning in reply.warnings:
            print(f"Warning: {warning}")
    print(f"Epoch: {reply.epoch}\n")
    if not args.all and reply.history and reply.history[0].epoch > 1:
        print(f"(the last {len(reply.history)} epochs; --all shows every one)")
    rows = [
        [str(e.epoch), when(e.time), ", ".join(host_port(n.host, n.control_port) for n in e.nodes)]
        for e in reversed(reply.history)
    ]
    print(table(rows, ["Epoch", "Time", "Nodes"]))


async def node_list(stub: pb_grpc.ControlStub, args: argparse.Namespace) -> None:
    reply = await _node_list(stub)
    if args.json:
        _emit_json(reply)
        return
    rows = []
    for i, s in enumerate(reply.nodes):
        n = s.node
        used = format_size(s.used) if s.reachable else "?"
        free = format_size(s.free) if s.reachable else "?"
        rows.append([str(i), n.id[:12], host_port(n.host, n.control_port),
                     host_port(n.host, n.data_port), n.zone or "-", str(n.vnodes), used, free,
                     _disk(s)])
    print(table(rows, ["Idx", "Id", "Control", "Data", "Zone", "Vnodes", "Used", "Free",
                       "Disk"]))


def _disk(s: pb.NodeStats) -> str:
    """How full a node's disk is, and whether that is past its nearfull or full ratio."""
    if not s.reachable:
        return "?"
    state = {"nearfull": " nearfull", "full": " FULL"}.get(s.space, "")
    return f"{s.space_used:.0%}{state}"


async def node_info(stub: pb_grpc.ControlStub, args: argparse.Namespace) -> None:
    reply = await _node_list(stub)
    if args.json:
        _emit_json(reply)
        return
    rows = []
    total_used = 0
    for i, s in enumerate(reply.nodes):
        if not s.reachable:
            rows.append([str(i), "?", "?", "?", "?", "unreachable: " + s.error])
            continue
        size = s.used + s.free
        total_used += s.used
        pct = f"{100 * s.used / size:.0f}%" if size else "-"
        rows.append([str(i), format_size(size), format_size(s.used), format_size(s.free), pct,
                     str(s.objects)])
    total_free = free_space(reply.nodes)  # a filesystem shared by nodes counts once
    total_size = total_used + total_free
    pct = f"{100 * total_used / total_size:.0f}%" if total_size else "-"
    rows.append(["Total", format_size(total_size), format_size(total_used),
                 format_size(total_free), pct, ""])
    print(table(rows, ["Id", "Size", "Used", "Avail", "Use%", "Objects"]))
    _warn_lost(reply)


def lost_blocks(s: pb.NodeStats) -> int:
    """Blocks a node knows to be bad on every replica: found by reads and scrubs since it
    started, and by its recovery of the current epoch."""
    return s.scrub.blocks_lost + s.recovery.lost


def _warn_lost(reply: pb.NodeListReply) -> None:
    """A line per node that knows of lost blocks (they are read errors: never hidden)."""
    for i, s in enumerate(reply.nodes):
        if s.reachable and lost_blocks(s):
            print(f"warning: node {i} ({s.node.id[:12]}) has {lost_blocks(s)} block(s) bad "
                  "on every replica; reads of them fail (dog vdi check lists them)")


async def _per_node_table(stub: pb_grpc.ControlStub, args: argparse.Namespace,
                          header: list[str], row: Callable[[pb.NodeStats], list[str]]
                          ) -> pb.NodeListReply:
    """One row per node of the cluster (`Idx`, `Id`, then `row`'s columns); the nodes'
    stats shown."""
    reply = await _node_list(stub)
    if args.json:
        _emit_json(reply)
        return reply
    rows = []
    for i, s in enumerate(reply.nodes):
        cells = row(s) if s.reachable else ["unreachable"]
        rows.append([str(i), s.node.id[:12], *cells, *[""] * (len(header) - 2 - len(cells))])
    print(table(rows, header))
    return reply


async def node_recovery(stub: pb_grpc.ControlStub, args: argparse.Namespace) -> None:
    def row(s: pb.NodeStats) -> list[str]:
        r = s.recovery
        pct = f"{100 * r.done / r.total:.0f}%" if r.total else "-"
        throttle = f"{format_size(r.throttle)}/s" if r.throttle else "unbounded"
        return [str(r.epoch), r.state, f"{r.done}/{r.total}", pct, f"{r.rate:.1f}/s", throttle,
                str(r.lost)]

    await _per_node_table(stub, args, ["Idx", "Id", "Epoch", "State", "Objects", "Done",
                                       "Rate", "Throttle", "Lost"], row)


async def node_recovery_throttle(stub: pb_grpc.ControlStub, args: argparse.Namespace) -> None:
    """Set the bound on every node: recovery competes with client I/O on all of them."""
    try:
        rate = parse_size(args.rate) if args.rate not in ("0", "off", "none") else 0
    except ValueError as exc:
        raise DogError(str(exc)) from None
    reply = await _node_list(stub)
    for s in reply.nodes:
        address = host_port(s.node.host, s.node.control_port)
        async with aio_channel(address, args.identity) as channel:
            await pb_grpc.ControlStub(channel).SetRecoveryThrottle(
                pb.ThrottleRequest(bytes_per_second=rate), timeout=RPC_TIMEOUT)
    what = f"{format_size(rate)}/s" if rate else "unbounded"
    if args.json:
        print(json.dumps({"throttle": rate, "nodes": len(reply.nodes)}))
    else:
        print(f"recovery throttle set to {what} on {len(reply.nodes)} node(s)")


async def node_scrub(stub: pb_grpc.ControlStub, args: argparse.Namespace) -> None:
    def row(s: pb.NodeStats) -> list[str]:
        c = s.scrub
        last = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.finished))
                if c.finished else "never")
        return [c.state, f"{c.done}/{c.total}", str(c.bad_blocks), str(c.repaired),
                f"{c.diverged}/{c.reconciled}", str(c.passes), last, str(lost_blocks(s))]

    reply = await _per_node_table(stub, args, ["Idx", "Id", "State", "Objects", "Bad",
                                               "Repaired", "Diverged/fixed", "Passes",
                                               "Last pass", "Lost"], row)
    if not args.json:
        _warn_lost(reply)


async def node_scrub_start(stub: pb_grpc.ControlStub, args: argparse.Namespace) -> None:
    """Start a pass on every node; with --wait, follow it to the end."""
    reply = await _node_list(stub)
    before = {s.node.id: s.scrub.passes for s in reply.nodes if s.reachable}
    for s in reply.nodes:
        address = host_port(s.node.host, s.node.control_port)
        async with aio_channel(address, args.identity) as channel:
            await pb_grpc.ControlStub(channel).StartScrub(pb.Empty(), timeout=RPC_TIMEOUT)
    if not args.wait:
        if args.json:
            print(json.dumps({"started": len(reply.nodes)}))
        else:
            print(f"scrub started on {len(reply.nodes)} node(s)")
        return
    show = progress_bar(args.progress, "scrub", objects=True)
    while True:
        reply = await _node_list(stub)
        mine = [s for s in reply.nodes if s.node.id in before]
        finished = all(s.scrub.passes > before[s.node.id] and s.scrub.state == "idle"
                       for s in mine)
        done = sum(s.scrub.done for s in mine)
        total = sum(s.scrub.total for s in mine)
        if show is not None and (total or finished):  # a pass lists its objects first
            show(total if finished else done, total)
        if finished:
            break
        await asyncio.sleep(0.5)
    bad = sum(s.scrub.bad_blocks for s in mine)
    repaired = sum(s.scrub.repaired for s in mine)
    diverged = sum(s.scrub.diverged for s in mine)
    reconciled = sum(s.scrub.reconciled for s in mine)
    lost = sum(lost_blocks(s) for s in mine)
    if args.json:
        print(json.dumps({"objects": total, "bad_blocks": bad, "repaired": repaired,
                          "diverged": diverged, "reconciled": reconciled, "lost": lost}))
    else:
        print(f"scrubbed {total} object(s) on {len(mine)} node(s): {bad} bad block(s), "
              f"{repaired} repaired; {diverged} object(s) with unlike replicas, "
              f"{reconciled} replica(s) reconciled; {lost} block(s) lost")


# -- argument parsing ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-a", "--address", default=None,
        help=f"control address of any node (HOST:PORT; default $SHEEP_ADDRESS, else the "
             f"config file's, else {DEFAULT_ADDRESS})",
    )
    common.add_argument(
        "--config", default=None, metavar="FILE",
        help=f"the cluster's address and dog's certificate (default ${config.ENV}, else "
             f"{config.DEFAULT} if there: the file `sheep up` writes; '{config.NONE}': none)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = Parser(prog="dog", description="sheep cluster administration")
    add_version(parser)
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{cluster,node,vdi,vm}")

    cluster = kinds.add_parser("cluster", help="cluster-wide operations").add_subparsers(
        dest="cmd", required=True)
    fmt = cluster.add_parser("format", parents=[common], help="format the cluster")
    fmt.add_argument("-c", "--copies", type=int, default=3, help="replicas per object")
    fmt.add_argument("--object-size", default=format_size(DEFAULT_OBJECT_SIZE),
                     help="data object size (power of two; default %(default)s)")
    fmt.set_defaults(func=cluster_format)
    info = cluster.add_parser("info", parents=[common], help="status, epochs, copies")
    info.add_argument("--all", action="store_true",
                      help=f"every epoch since the cluster began (default: the last "
                           f"{RECENT_EPOCHS})")
    info.set_defaults(func=cluster_info)
    add_cluster_commands(cluster, common)
    add_certs_commands(cluster, common)

    node = kinds.add_parser("node", help="storage nodes").add_subparsers(dest="cmd", required=True)
    node.add_parser("list", parents=[common], help="list nodes").set_defaults(func=node_list)
    node.add_parser("info", parents=[common], help="space used per node").set_defaults(
        func=node_info)
    recovery = node.add_parser("recovery", parents=[common],
                               help="recovery progress per node (set-throttle bounds it)")
    recovery.set_defaults(func=node_recovery)
    rec_cmds = recovery.add_subparsers(dest="rec_cmd")
    throttle = rec_cmds.add_parser("set-throttle", parents=[common],
                                   help="bound recovery reads per node (BYTES/S, 0 = off)")
    throttle.add_argument("rate", help="bytes per second (50M), or 0 / off for unbounded")
    throttle.set_defaults(func=node_recovery_throttle)
    scrub = node.add_parser("scrub", parents=[common],
                            help="checksum scrub progress per node (start runs a pass now)")
    scrub.set_defaults(func=node_scrub)
    start = scrub.add_subparsers(dest="scrub_cmd").add_parser(
        "start", parents=[common], help="scrub every node now")
    start.add_argument("--wait", action="store_true", help="follow the pass to its end")
    progress_option(start)
    start.set_defaults(func=node_scrub_start)
    add_vdi_commands(kinds, common)
    add_vm_commands(kinds, common)
    return parser


async def _run(args: argparse.Namespace, func: Callable) -> None:
    # SIGTERM cancels the command as Ctrl-C does, so that it cleans up (an import deletes
    # the VDI it created) instead of dying on the spot
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    if getattr(args, "offline", False):
        await func(None, args)
        return
    async with aio_channel(args.address, args.identity) as channel:
        await func(pb_grpc.ControlStub(channel), args)


def _resolve_config(args: argparse.Namespace) -> None:
    """args.address and args.identity (and args.disk_identity, for the disks of VMs),
    from -a, $SHEEP_ADDRESS and the config file."""
    found = config.load_config(config.find_config(args.config), DEFAULT_ADDRESS)
    args.identity = found.identity
    args.disk_identity = found.disk_identity
    args.address = args.address or os.environ.get("SHEEP_ADDRESS") or found.address


def main(argv: list[str] | None = None) -> int:
    """Every failure a user can cause ends in one line on stderr (JSON under --json), never
    a traceback; a reader that stops reading (`| head`) ends dog quietly."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        _resolve_config(args)
    except PkiError as exc:
        return report_error("dog", str(exc), "bad_config", args.json)
    try:
        asyncio.run(_run(args, args.func))
    except Interrupted as exc:  # a cancelled import says what it undid
        report_error("dog", str(exc), "interrupted", args.json)
        return 130
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    except (DogError, SheepError, grpc.aio.AioRpcError, OSError) as exc:
        if isinstance(exc, BrokenPipeError) and stdout_closed():
            return quiet_broken_pipe()
        return report_error("dog", _error_line(exc, args.address, args.identity),
                            error_code(exc), args.json)
    return 0


def _error_line(exc: Exception, address: str, identity: Identity | None) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        if error_code(exc) == "unreachable":
            hint = ("" if identity is not None else
                    f" (a secure cluster needs dog's certificate: --config FILE or "
                    f"${config.ENV})")
            return f"cannot reach sheep at {address}: {exc.details()}{hint}"
        return exc.details() or exc.code().name
    if isinstance(exc, OSError):
        return os_error_line(exc)
    return str(exc)

if __name__ == "__main__":
    sys.exit(main())
