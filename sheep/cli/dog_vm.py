"""`dog vm ...`: VMs whose disks are VDIs, run by QEMU on a sheep node (by default the least
loaded, or `start --on NODE`; qemu_driver/host.py) or, with `start --here`, on the host dog
runs on. Definitions live in the cluster (any node lists them); a running VM is driven
through its QMP socket, by the node hosting it when its runtime record names one (from any
machine that reaches the cluster), else by dog on the host that started it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from qemu_driver import console
from qemu_driver.accel import OVERRIDE
from qemu_driver.control import STOP_TIMEOUT, VmControl, listed_state
from qemu_driver.migrate import describe, migrate
from qemu_driver.migration import DEFAULT_TIMEOUT, Progress
from qemu_driver.remote import (
    ANY,
    HostedVm,
    HostUnreachable,
    NoSuchNode,
    choose_node,
    find_node,
    hosted,
)
from qemu_driver.spec import TRANSPORTS, VmExit, VmRuntime, VmSpec
from sheep.control import sheep_pb2 as pb
from sheep.control import sheep_pb2_grpc as pb_grpc
from sheep.gateway.iscsi.login import Chap
from sheep.netaddr import host_port
from sheep.units import parse_size

from .common import RPC_TIMEOUT, DogError, cluster_manager, table, when
from .output import emit


@contextlib.asynccontextmanager
async def _control(stub: pb_grpc.ControlStub, args: argparse.Namespace
                   ) -> AsyncIterator[VmControl]:
    async with cluster_manager(stub, args, "vm") as m:
        yield VmControl(m)


@contextlib.asynccontextmanager
async def _driver(stub: pb_grpc.ControlStub, args: argparse.Namespace
                  ) -> AsyncIterator[VmControl | HostedVm]:
    """What drives the running VM args.name: the node its runtime record names, else
    VmControl on this host (a VM a dog started here, or not running: VmControl says so)."""
    async with _control(stub, args) as ctl:
        await ctl.vms.get(args.name)
        rt = await ctl.vms.runtime(args.name)
        if rt is None or not rt.node:
            yield ctl
            return
        try:
            node = await find_node(ctl.etcd, rt.node)
        except NoSuchNode:
            raise HostUnreachable(f"VM {args.name!r} runs on node {rt.node[:12]} (host "
                                  f"{rt.host}), which is not up: its VM goes on, but only "
                                  "that node drives it") from None
        async with hosted(node, args.identity) as remote:
            yield remote


def _runtime_dict(rt: VmRuntime | None) -> dict | None:
    return json.loads(rt.dump()) if rt is not None else None


def _exit_dict(ended: VmExit | None) -> dict | None:
    return json.loads(ended.dump()) if ended is not None else None


def _accel(rt: VmRuntime) -> str:
    """The accelerator and why: the probe's word, and the fallback when KVM failed."""
    if rt.fallback:
        return f"{rt.accel} (KVM failed at start: {rt.fallback}; restarted under TCG)"
    return f"{rt.accel} ({rt.accel_reason})" if rt.accel_reason else rt.accel


def _memory(text: str) -> int:
    """MiB: a bare number is MiB (QEMU's -m), or a size with a unit (512M, 1G)."""
    try:
        return int(text) if text.isdigit() else parse_size(text) >> 20
    except ValueError as exc:
        raise DogError(f"memory: {exc}") from None


# -- commands ------------------------------------------------------------------------------


async def vm_create(stub, args) -> None:
    disks = tuple(d for d in args.vdi.split(",") if d)
    kernel = str(Path(args.kernel).resolve()) if args.kernel else ""
    initrd = str(Path(args.initrd).resolve()) if args.initrd else ""
    spec = VmSpec(args.name, disks, memory=_memory(args.memory), cpus=args.cpus,
                  transport=args.transport, kernel=kernel, initrd=initrd, append=args.append,
                  ha=args.ha)
    async with _control(stub, args) as ctl:
        spec = await ctl.create(spec)
    if args.json:
        emit(json.loads(spec.dump()))
    else:
        print(f"VM {spec.name} created: {spec.memory} MiB, {spec.cpus} CPU(s), disks "
              f"{', '.join(spec.disks)} over {spec.transport}{', HA' if spec.ha else ''}")


async def vm_delete(stub, args) -> None:
    async with _control(stub, args) as ctl:
        await ctl.delete(args.name)
    if args.json:
        emit({"deleted": args.name})
    else:
        print(f"VM {args.name} deleted (its VDIs are kept)")


def _chap(args) -> Chap | None:
    try:
        return Chap.load(args.iscsi_chap_file) if args.iscsi_chap_file else None
    except ValueError as exc:
        raise DogError(f"bad iSCSI CHAP file: {exc}") from None


async def vm_start(stub, args) -> None:
    """On a node (--on, by default any: the least loaded), which shows the disks' gateway
    its own certificate and follows dog's SHEEP_VM_ACCEL; or, --here, on this host."""
    chap = _chap(args)
    if not args.here:
        async with _control(stub, args) as ctl:
            here = (await stub.NodeInfo(pb.Empty(), timeout=RPC_TIMEOUT)).node.id
            node = await choose_node(ctl.etcd, list((await ctl.vms.runtimes()).values()),
                                     args.on or ANY, prefer=here)
        async with hosted(node, args.identity) as remote:
            rt = await remote.start(args.name, chap=chap, reconnect_delay=args.reconnect_delay,
                                    run_root=str(Path(args.run_dir).resolve())
                                    if args.run_dir else "",
                                    accel=os.environ.get(OVERRIDE, ""))
    else:
        async with _control(stub, args) as ctl:
            rt = await ctl.start(args.name,
                                 run_root=Path(args.run_dir) if args.run_dir else None,
                                 reconnect_delay=args.reconnect_delay, chap=chap,
                                 tls=getattr(args, "disk_identity", None))
    if args.json:
        emit(_runtime_dict(rt))
    else:
        gw = rt.gateway
        where = f" on node {rt.node[:12]} (host {rt.host})" if rt.node else ""
        print(f"VM {rt.name} started{where}: pid {rt.pid}, {_accel(rt)}, disks over "
              f"{gw.transport}{'+TLS' if gw.tls else ''} via {host_port(gw.host, gw.port)}; "
              f"console: dog vm console {rt.name}{f' (on {rt.host})' if rt.node else ''}")


async def vm_migrate(stub, args) -> None:
    """Live-migrate a node-hosted VM to another node (qemu_driver/migrate.py)."""
    chap = _chap(args)
    bandwidth = _bandwidth(args.bandwidth)
    async with _control(stub, args) as ctl:
        await ctl.vms.get(args.name)
        target_node = await find_node(ctl.etcd, args.to)
        rt = await ctl.vms.runtime(args.name)
        if rt is None:
            raise DogError(f"VM {args.name!r} is not running")
        if not rt.node:
            raise DogError(f"VM {args.name!r} runs on a dog's host ({rt.host}), not on a "
                           f"node: a VM started with dog vm start --here does not migrate")
        try:
            source_node = await find_node(ctl.etcd, rt.node)
        except NoSuchNode:
            raise HostUnreachable(f"VM {args.name!r} runs on node {rt.node[:12]}, which is "
                                  f"not up: it cannot be migrated") from None
        if target_node.node_id == source_node.node_id:
            raise DogError(f"VM {args.name!r} already runs on node {rt.node[:12]}")
        tty = sys.stderr.isatty()

        def show(p: Progress) -> None:
            print(("\r" if tty else "") + describe(p), end="" if tty else "\n",
                  file=sys.stderr, flush=True)

        async with hosted(source_node, args.identity) as source, \
                hosted(target_node, args.identity) as target:
            try:
                done = await migrate(
                    ctl.vms, args.name, source, target, bandwidth=bandwidth,
                    timeout=args.timeout, progress=show, chap=chap,
                    reconnect_delay=args.reconnect_delay,
                    run_root=str(Path(args.run_dir).resolve()) if args.run_dir else "")
            finally:
                if tty:
                    print(file=sys.stderr)
    if args.json:
        emit({"migrated": args.name, "from": done.source, "to": done.runtime.node,
              "seconds": round(done.seconds, 3), "downtime_ms": done.downtime_ms,
              "switchover_ms": done.switchover_ms, "paused_ms": done.paused_ms,
              "transferred": done.transferred, "runtime": _runtime_dict(done.runtime)})
    else:
        print(f"VM {args.name} migrated from node {done.source[:12]} to node "
              f"{done.runtime.node[:12]} in {done.seconds:.1f} s: the guest was paused "
              f"{done.paused_ms} ms (downtime {done.downtime_ms} ms as QEMU measured it, "
              f"then {done.switchover_ms} ms to take it over), "
              f"{done.transferred >> 20} MiB sent")


def _bandwidth(text: str) -> int:
    """bytes/s from a size per second (100M: 100 MiB/s); "" or 0: the default."""
    try:
        return parse_size(text) if text else 0
    except ValueError as exc:
        raise DogError(f"--bandwidth: {exc}") from None


async def vm_stop(stub, args) -> None:
    async with _driver(stub, args) as ctl:
        how = await ctl.stop(args.name, timeout=args.timeout)
    if args.json:
        emit({"stopped": args.name, "how": how})
    else:
        print(f"VM {args.name} {how}")


async def vm_wait(stub, args) -> None:
    """Until the VM is stopped (its guest powered off, or someone stopped it); an error
    (non-zero exit) when it crashed."""
    async with _control(stub, args) as ctl:
        ended = await ctl.wait(args.name, args.timeout)
    reason = ended.reason if ended is not None else ""
    if args.json:
        emit({"stopped": args.name, "reason": reason})
    else:
        print(f"VM {args.name} is stopped{': ' + reason if reason else ''}")


async def vm_list(stub, args) -> None:
    async with _control(stub, args) as ctl:
        vms = await ctl.list()
    if args.json:
        emit({"vms": [{**json.loads(s.dump()), "state": listed_state(rt, ended),
                        "runtime": _runtime_dict(rt), "last_exit": _exit_dict(ended)}
                       for s, rt, ended in vms]})
        return
    rows = [[s.name, listed_state(rt, ended), (rt.node[:12] or "-") if rt else "-",
             rt.host if rt else "-", str(rt.pid) if rt else "-", rt.accel if rt else "-",
             f"{s.memory}M", str(s.cpus), s.transport, ",".join(rt.disks if rt else s.disks)]
            for s, rt, ended in vms]
    header = ["Name", "State", "Node", "Host", "Pid", "Accel", "Memory", "CPUs", "Transport",
              "Disks"]
    print(table(rows, header))


async def vm_info(stub, args) -> None:
    """QEMU's own word, from the host; the cluster's record when the host does not answer."""
    try:
        async with _driver(stub, args) as ctl:
            st = await ctl.status(args.name)
    except HostUnreachable as exc:
        print(f"dog: {exc}; what the cluster knows:", file=sys.stderr)
        async with _control(stub, args) as ctl:
            st = await ctl.status(args.name)
    blocks = [{"device": b.get("qdev") or b.get("device"),
               "node": (b.get("inserted") or {}).get("node-name"),
               "file": (b.get("inserted") or {}).get("file"),
               "read_only": (b.get("inserted") or {}).get("ro")} for b in st.block]
    if args.json:
        nodes = [{"node": n.get("node-name"), "driver": n.get("drv"), "file": n.get("file"),
                  "read_only": n.get("ro"), "bytes": (n.get("image") or {}).get("virtual-size")}
                 for n in st.nodes]
        emit({**json.loads(st.spec.dump()), "state": st.state,
               "runtime": _runtime_dict(st.runtime), "last_exit": _exit_dict(st.last_exit),
               "guest_agent": st.agent, "block": blocks, "nodes": nodes})
        return
    s, rt, ended = st.spec, st.runtime, st.last_exit
    state = f"{st.state} ({ended.reason})" if ended is not None else st.state
    print(f"Name: {s.name}\nState: {state}\nMemory: {s.memory} MiB\nCPUs: {s.cpus}\n"
          f"Transport: {s.transport}\nDisks: {', '.join(s.disks)}\n"
          f"Boot: {('kernel ' + s.kernel) if s.kernel else 'first disk'}\n"
          f"HA: {'yes (restarted on another node if its host dies)' if s.ha else 'no'}")
    if s.append:
        print(f"Append: {s.append[:120]}{'...' if len(s.append) > 120 else ''}")
    if rt is not None:
        print(f"Host: {rt.host}\nNode: {rt.node or '- (started by dog on its host)'}\n"
              f"Pid: {rt.pid}\nAccelerator: {_accel(rt)}\n"
              f"Gateway: {rt.gateway.transport}{'+TLS' if rt.gateway.tls else ''} "
              f"{host_port(rt.gateway.host, rt.gateway.port)}\n"
              f"Started: {when(rt.started)}\nRun dir: {rt.run_dir}\n"
              f"Console: {rt.console} (log {rt.console_log})\nQMP: {rt.qmp}")
    elif ended is not None:
        on = f"node {ended.node[:12]} on {ended.host}" if ended.node else ended.host
        print(f"Last run: ended {when(ended.at)} on {on} under {ended.accel}"
              f"{f' (after KVM failed: {ended.fallback})' if ended.fallback else ''}")
    if st.agent is not None:
        print(f"Guest agent: {'running' if st.agent else 'none'}")
    for b in blocks:
        print(f"Block: {b['device']} -> {b['file']}{' (read-only)' if b['read_only'] else ''}")


async def vm_console(stub, args) -> None:
    """Through the node that hosts the VM (or, with --log, last hosted it) when its record
    names one; else here, on the host where dog started it."""
    async with _control(stub, args) as ctl:
        st = await ctl.status(args.name)
        root = Path(args.run_dir) if args.run_dir else await ctl.run_root()
        rt = st.runtime
        known = rt or st.last_exit
        node = None
        if known is not None and known.node and not (args.log and args.run_dir):
            try:
                node = await find_node(ctl.etcd, known.node)
            except NoSuchNode:
                raise DogError(f"VM {args.name!r} {'runs' if rt else 'last ran'} on node "
                               f"{known.node[:12]} (host {known.host}), which is not up"
                               ) from None
    if node is not None and (args.log or rt is not None):
        async with hosted(node, args.identity) as host:
            if args.log:
                await host.console_log(args.name, sys.stdout.buffer)
                return
            if os.isatty(0):
                print(f"\r\n[dog: attached to the console on node {node.node_id[:12]}; "
                      "Ctrl-] detaches]\r", file=sys.stderr)
            await host.console(args.name)
        return
    if rt is not None and rt.host != socket.gethostname() and not args.log:
        raise DogError(f"VM {args.name!r} runs on host {rt.host}, started there by dog: "
                       "its console is reachable only there (dog vm console on that host)")
    if rt is None and not args.log:
        raise DogError(f"VM {args.name!r} is not running (--log shows its last output)")
    if args.log:
        sys.stdout.write(console.read_log(_console_log(args, st, root)))
        return
    sys.stdout.write(console.replayable(console.read_log(rt.console_log)[-4096:]))
    sys.stdout.flush()
    if os.isatty(0):
        print("\r\n[dog: attached to the console; Ctrl-] detaches]\r", file=sys.stderr)
    await console.attach(rt.console)


def _console_log(args, st, root: Path) -> Path:
    """Where the VM's console log is: its run directory as the runtime or the exit record
    has it, else under --run-dir (the root given to `dog vm start`, or the VM's own)."""
    if not args.run_dir:
        known = st.runtime or st.last_exit
        if known is not None and known.run_dir:
            return Path(known.run_dir) / "console.log"
    for path in (root / args.name / "console.log", root / "console.log"):
        if path.is_file():
            return path
    raise DogError(f"no console log of VM {args.name!r} under {root} (on the host that "
                     "ran it; --run-dir names the root it was started with)")


async def vm_attach(stub, args) -> None:
    async with _driver(stub, args) as ctl:
        await ctl.attach(args.name, args.vdi)
    if args.json:
        emit({"vm": args.name, "attached": args.vdi})
    else:
        print(f"VDI {args.vdi} attached to VM {args.name}")


async def vm_detach(stub, args) -> None:
    async with _driver(stub, args) as ctl:
        await ctl.detach(args.name, args.vdi, timeout=args.timeout)
    if args.json:
        emit({"vm": args.name, "detached": args.vdi})
    else:
        print(f"VDI {args.vdi} detached from VM {args.name}")


async def vm_pause(stub, args) -> None:
    async with _driver(stub, args) as ctl:
        await (ctl.pause if args.cmd == "pause" else ctl.resume)(args.name)
    if args.json:
        emit({"vm": args.name, "state": "paused" if args.cmd == "pause" else "running"})
    else:
        print(f"VM {args.name} {'paused' if args.cmd == 'pause' else 'resumed'}")


async def vm_snapshot(stub, args) -> None:
    async with _driver(stub, args) as ctl:
        how, records = await ctl.snapshot(args.name, args.snapshot)
    if args.json:
        emit({"vm": args.name, "tag": args.snapshot, "method": how,
               "snapshots": [{"name": r.name, "tag": r.tag, "id": r.id} for r in records]})
    else:
        print(f"VM {args.name}: {', '.join(r.label for r in records)} taken ({how})")


# -- parser --------------------------------------------------------------------------------


def add_vm_commands(kinds: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    vm = kinds.add_parser("vm", help="QEMU virtual machines on VDIs").add_subparsers(
        dest="cmd", required=True)

    def cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        p = vm.add_parser(name, parents=[common], help=help)
        p.add_argument("name", help="the VM's name")
        p.set_defaults(func=func)
        return p

    p = cmd("create", vm_create, "define a VM (kept in the cluster)")
    p.add_argument("--vdi", required=True, help="VDI[,VDI...]: its disks, /dev/vda first")
    p.add_argument("--memory", default="256", help="MiB, or a size (512M, 1G)")
    p.add_argument("--cpus", type=int, default=1, help="virtual CPUs")
    p.add_argument("--kernel", help="boot this kernel (default: boot from the first disk)")
    p.add_argument("--initrd", help="the initramfs of --kernel")
    p.add_argument("--append", default="", help="the kernel command line")
    p.add_argument("--transport", choices=TRANSPORTS, default="nbd",
                   help="how QEMU reaches the disks (default %(default)s)")
    p.add_argument("--ha", action="store_true",
                   help="high availability: when the node hosting the running VM dies, "
                        "another node restarts it (dog vm stop, or the guest powering off, "
                        "stops it for good)")
    cmd("delete", vm_delete, "forget a stopped VM (its VDIs stay)")
    p = cmd("start", vm_start, "start QEMU for the VM on a node (by default the least "
                               "loaded) or, with --here, on this host")
    p.epilog = ("The accelerator is KVM when a probe proves it runs a real guest on the "
                "host that runs the VM, else TCG; SHEEP_VM_ACCEL=kvm or SHEEP_VM_ACCEL=tcg "
                "overrides the probe: dog's (carried to the node that runs the VM, where it "
                "wins over the node's own environment), else the node's. Over NBD, QEMU "
                "starts TLS wherever the gateway speaks it, with the node's own certificate "
                "(with --here, the client certificate dog's config names, else dog's own); a "
                "gateway that requires TLS refuses a start without one.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--on", metavar="NODE", default="",
                       help="the node that runs it: its id as dog node list --json gives it "
                            "(or the first digits), or 'any' (the default): the one hosting "
                            "the fewest VMs (the node dog talks to among equals); the node "
                            "starts QEMU and drives it from then on, and shows the disks' "
                            "gateway its own certificate")
    where.add_argument("--here", action="store_true",
                       help="run QEMU on this host instead, driven from here by dog "
                            "(such a VM does not migrate)")
    p.add_argument("--run-dir", help="the root of the VM's directory of sockets and logs, on "
                                     "the host that runs it (a relative path is resolved "
                                     "here; default /run/sheep/vm/CLUSTER, or under "
                                     "$XDG_RUNTIME_DIR for other users)")
    p.add_argument("--reconnect-delay", type=int, default=60,
                   help="seconds QEMU holds guest I/O while its NBD gateway is away")
    p.add_argument("--iscsi-chap-file", default="", metavar="FILE",
                   help="QEMU logs in to the iSCSI portal with the CHAP user and secret in "
                        "FILE (USER:SECRET, mode 600; the portal's --iscsi-chap-file); "
                        "required when the portal requires CHAP")
    p = cmd("migrate", vm_migrate, "live-migrate a running VM to another node")
    p.epilog = ("The destination node starts a QEMU like the VM's, its disks through its own "
                "gateway; the source sends the VM's memory while the guest runs (pre-copy; "
                "a guest that dirties memory faster than it is sent is slowed down until it "
                "converges), then stops it for the last round. The disks' write locks pass "
                "to the destination at its first I/O, fenced: the source can no longer write. "
                "A migration that fails leaves the VM running at its source.")
    p.add_argument("--to", required=True, metavar="NODE",
                   help="the destination node: its id as dog node list --json gives it (or "
                        "the first digits)")
    p.add_argument("--bandwidth", default="", metavar="SIZE",
                   help="bytes per second at most (100M: 100 MiB/s; default 1G)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds before a migration that has not completed is called off "
                        "(default %(default).0f)")
    p.add_argument("--run-dir", help="the root of the VM's directory on the destination "
                                     "(as for dog vm start)")
    p.add_argument("--reconnect-delay", type=int, default=60,
                   help="seconds the destination's QEMU holds guest I/O while its gateway "
                        "is away")
    p.add_argument("--iscsi-chap-file", default="", metavar="FILE",
                   help="the CHAP user and secret the destination's QEMU logs in to its "
                        "portal with (as for dog vm start)")
    p = cmd("stop", vm_stop, "ACPI power-off, killed after --timeout")
    p.add_argument("--timeout", type=float, default=STOP_TIMEOUT,
                   help="seconds the guest has to power off before QEMU is told to quit")
    p = cmd("wait", vm_wait, "wait until the VM is stopped (non-zero if it crashed)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait at most")
    vm.add_parser("list", parents=[common], help="every VM of the cluster").set_defaults(
        func=vm_list, name=None)
    cmd("info", vm_info, "definition, state, accelerator, block devices")
    p = cmd("console", vm_console, "attach to the serial console (Ctrl-] detaches)")
    p.add_argument("--log", action="store_true", help="print the console's output and exit")
    p.add_argument("--run-dir", help="with --log: where to look on this host (the root given "
                                     "to dog vm start, or the VM's own directory); by "
                                     "default where the VM last ran, through its node")
    for name, func, help in (("attach", vm_attach, "hot-plug a VDI into a running VM"),
                             ("detach", vm_detach, "hot-unplug a VDI from a running VM")):
        p = cmd(name, func, help)
        p.add_argument("vdi", help="the VDI to hot-plug or unplug")
        if name == "detach":
            p.add_argument("--timeout", type=float, default=30.0,
                           help="seconds the guest has to release the disk")
    cmd("pause", vm_pause, "pause a running VM")
    cmd("resume", vm_pause, "resume a paused VM")
    p = cmd("snapshot", vm_snapshot, "snapshot every disk of a VM consistently")
    p.add_argument("-s", "--snapshot", metavar="TAG", required=True)
