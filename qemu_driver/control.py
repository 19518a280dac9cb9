"""VM operations as dog (and `sheep up`) run them: define, start, stop, hot-plug, pause,
snapshot, inspect. Definitions come from the cluster; a running VM is driven through its
QMP socket, so operations on a VM's QEMU run on the host that runs it: a sheep node's VM
host service (qemu_driver/host.py) runs this code there for a dog anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from sheep.children import die_with_parent
from sheep.gateway.iscsi.login import Chap
from sheep.netaddr import host_port
from sheep.security.identity import Identity
from sheep.vdi.manager import VdiManager
from sheep.vdi.registry import VdiRecord

from .accel import choose_accel
from .agent import GuestAgent, guest_agent
from .cmdline import (
    DEFAULT_RECONNECT_DELAY,
    RunPaths,
    incoming_tls_args,
    initiator_name,
    qemu_argv,
)
from .errors import BadSpec, ElsewhereError, QemuFailed, VmCrashed, VmError, VmNotRunning
from .gateways import choose_gateway
from .guest import GuestNotBuilt, guest_artifacts
from .migration import DEFAULT_BANDWIDTH, DEFAULT_TIMEOUT, Progress, migrate_out
from .qmp import monitor
from .registry import VmRegistry
from .spec import Gateway, VmExit, VmRuntime, VmSpec
from .supervisor import START_TIMEOUT, user_label, vm_user

STOP_TIMEOUT = 30.0


def default_run_root() -> Path:
    """/run/sheep/vm for root, $XDG_RUNTIME_DIR/sheep/vm otherwise ($SHEEP_VM_RUN_DIR wins);
    each cluster's VMs go in a folder of its own below it (see VmControl.run_root)."""
    if override := os.environ.get("SHEEP_VM_RUN_DIR"):
        return Path(override)
    if os.geteuid() == 0 and Path("/run").is_dir():
        return Path("/run/sheep/vm")
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "sheep" / "vm"
    return Path(f"/tmp/sheep-{os.getuid()}/vm")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class VmStatus:
    spec: VmSpec
    runtime: VmRuntime | None
    state: str  # "stopped", "crashed", or QEMU's run state ("running", "paused"...)
    block: list[dict]  # query-block: the guest's devices and what backs them
    nodes: list[dict] = field(default_factory=list)  # query-named-block-nodes
    agent: bool | None = None  # a guest agent answered; None: not asked (not running here)
    last_exit: VmExit | None = None  # how the last run ended (when none runs now)

    def dump(self) -> bytes:
        """JSON, as the node hosting the VM sends it to dog (qemu_driver/host.py)."""
        return json.dumps({
            "spec": json.loads(self.spec.dump()), "state": self.state, "block": self.block,
            "nodes": self.nodes, "agent": self.agent,
            "runtime": None if self.runtime is None else json.loads(self.runtime.dump()),
            "last_exit": None if self.last_exit is None else json.loads(self.last_exit.dump()),
        }).encode()

    @classmethod
    def load(cls, raw: bytes) -> VmStatus:
        d = json.loads(raw)
        rt, ended = d["runtime"], d["last_exit"]
        return cls(VmSpec.load(json.dumps(d["spec"]).encode()),
                   None if rt is None else VmRuntime.load(json.dumps(rt).encode()),
                   d["state"], d["block"], d["nodes"], d["agent"],
                   None if ended is None else VmExit.load(json.dumps(ended).encode()))


def listed_state(rt: VmRuntime | None, ended: VmExit | None) -> str:
    """A VM's state as the cluster's records tell it: the supervisor's last word on a
    running VM, else how its last run ended."""
    if rt is not None:
        return rt.state
    return ended.state if ended is not None else "stopped"


def probe_kernel(spec: VmSpec) -> Path | None:
    """The kernel the accelerator probe boots: the VM's own, else the demo guest's."""
    if spec.kernel:
        return Path(spec.kernel)
    try:
        return guest_artifacts().kernel
    except GuestNotBuilt:
        return None


class VmControl:
    def __init__(self, manager: VdiManager) -> None:
        self.manager = manager
        self.etcd = manager.client.etcd
        self.vms = VmRegistry(self.etcd)

    # -- definitions ----------------------------------------------------------------------

    async def _check_vdis(self, disks: tuple[str, ...] | list[str]) -> None:
        state = await self.manager.state()
        for vdi in disks:
            state.lookup(vdi)

    async def create(self, spec: VmSpec) -> VmSpec:
        await self._check_vdis(spec.disks)
        for path in (spec.kernel, spec.initrd):
            if path and not Path(path).is_file():
                raise BadSpec(f"{path}: no such file")
        spec = replace(spec, created=time.time())
        await self.vms.create(spec)
        return spec

    async def delete(self, name: str) -> None:
        await self.vms.delete(name)

    # -- runtime lookups ------------------------------------------------------------------

    async def running(self, name: str) -> VmRuntime:
        """The runtime of a VM running on this host (its sockets are only reachable here)."""
        await self.vms.get(name)
        rt = await self.vms.runtime(name)
        if rt is None or rt.pid == 0:
            raise VmNotRunning(f"VM {name!r} is not running")
        if rt.host != socket.gethostname():
            where = f"node {rt.node[:12]} on host {rt.host}" if rt.node else f"host {rt.host}"
            raise ElsewhereError(f"VM {name!r} runs on {where}: run this there")
        return rt

    async def status(self, name: str) -> VmStatus:
        spec, _ = await self.vms.get(name)
        rt = await self.vms.runtime(name)
        if rt is None:
            ended = await self.vms.last_exit(name)
            return VmStatus(spec, None, listed_state(None, ended), [], last_exit=ended)
        if rt.host != socket.gethostname() or rt.pid == 0:
            return VmStatus(spec, rt, rt.state, [])
        try:
            async with monitor(rt.qmp, timeout=5) as mon:
                state, block, nodes = (await mon.status(), await mon.block_devices(),
                                       await mon.named_nodes())
                port_open = await mon.agent_port_open()
        except QemuFailed:
            return VmStatus(spec, rt, "unresponsive", [])
        if state != "running":  # a paused guest's agent cannot answer: not asked
            return VmStatus(spec, rt, state, block, nodes)
        async with _agent_if(port_open, rt) as agent:
            return VmStatus(spec, rt, state, block, nodes, agent=agent is not None)

    async def list(self) -> list[tuple[VmSpec, VmRuntime | None, VmExit | None]]:
        runtimes, exits = await self.vms.runtimes(), await self.vms.exits()
        return [(spec, runtimes.get(spec.name), exits.get(spec.name))
                for spec in await self.vms.list()]

    # -- start / stop ---------------------------------------------------------------------

    async def gateway(self, transport: str, node: str = "") -> Gateway:
        """The gateway a VM's disks go through; `node`: the node hosting the VM."""
        return choose_gateway(await self.etcd.live_nodes(), transport, prefer=node)

    async def run_root(self) -> Path:
        """The default root of this cluster's VMs on this host: two clusters on one host may
        both have a VM `web`. 8 hex digits of the cluster id keep socket paths short."""
        config = await self.etcd.config()
        return default_run_root() / (config.cluster_id[:8] if config else "unformatted")

    async def start(self, name: str, *, run_root: Path | None = None,
                    reconnect_delay: int = DEFAULT_RECONNECT_DELAY,
                    timeout: float = START_TIMEOUT, tied: bool = False,
                    chap: Chap | None = None, tls: Identity | None = None,
                    node: str = "", accel: str = "") -> VmRuntime:
        """Start the VM under a supervisor of its own, which outlives this process (dog
        exits once the VM runs); `tied`: the VM is stopped when this process dies, even of
        SIGKILL (the demo VM of `sheep up`); `chap`: the CHAP user and secret QEMU logs in
        to an iSCSI portal with (required when the portal requires CHAP); `tls`: the
        certificate QEMU's NBD client starts TLS with, wherever the gateway speaks TLS
        (required when it requires TLS); `node`: the id of the sheep node starting it, which
        its runtime record names (qemu_driver/host.py), "" when dog starts it itself;
        `accel`: "kvm" or "tcg" forced by whoever asked for the start (a dog's
        SHEEP_VM_ACCEL, carried to the node), winning over this host's environment."""
        spec, _ = await self.vms.get(name)
        if await self.vms.runtime(name) is not None:
            raise VmError(f"VM {name!r} is already running")
        await self._check_vdis(spec.disks)
        gateway = _with_tls(_with_chap(await self.gateway(spec.transport, node), chap), tls)
        chosen = await asyncio.to_thread(choose_accel, probe_kernel(spec), forced=accel)
        paths = RunPaths((run_root or await self.run_root()) / name)
        _prepare(paths, gateway, chap, tls)
        runtime = VmRuntime(name=name, host=socket.gethostname(), pid=0, supervisor=0,
                            run_dir=str(paths.dir), qmp=str(paths.qmp),
                            console=str(paths.console), console_log=str(paths.console_log),
                            agent=str(paths.agent), accel=chosen.accel, gateway=gateway,
                            disks=spec.disks, accel_reason=chosen.reason, node=node)

        def argv(accelerator: str) -> list[str]:
            return qemu_argv(spec, gateway, paths, accelerator,
                             reconnect_delay=reconnect_delay)

        line = await self._supervise(paths, {
            "runtime": json.loads(runtime.dump()), "argv": argv(chosen.accel),
            "fallback_argv": argv("tcg") if chosen.accel == "kvm" else None}, timeout, tied)
        if line != "ok":
            raise QemuFailed(line)
        rt = await self.vms.runtime(name)
        assert rt is not None
        return rt

    async def _supervise(self, paths: RunPaths, plan: dict, timeout: float,
                         tied: bool = False) -> str:
        """Spawn a supervisor with `plan` and return the line it says once QEMU runs (or
        listens for a migration): "ok..." or why not."""
        target = self.etcd.target
        identity = self.etcd.identity  # an https etcd asks the supervisor for it too
        plan_file = paths.dir / "plan.json"
        plan_file.write_text(json.dumps({
            "etcd": f"{target.url}{target.prefix}",
            "identity": None if identity is None else {
                "ca": str(identity.files.ca), "cert": str(identity.files.cert),
                "key": str(identity.files.key)}, **plan}, indent=1))
        # A plain Popen, not an asyncio child: the supervisor outlives this event loop (and
        # this process), and asyncio's child watcher would complain about it later.
        command = [sys.executable, "-m", "qemu_driver.supervisor", str(plan_file)]
        with open(paths.dir / "supervisor.err", "ab") as err:
            proc = subprocess.Popen(
                die_with_parent(command) if tied else command,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                start_new_session=True)
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(timeout + 15):
                line = (await asyncio.to_thread(proc.stdout.readline)).decode().strip()
        except TimeoutError:
            proc.kill()  # its QEMU, if any, dies with its monitor socket unanswered
            line = f"error: the VM did not start within {timeout + 15:.0f}s"
        finally:
            proc.stdout.close()
        if line == "ok" or line.startswith("ok "):
            return line
        shutil.rmtree(paths.tls, ignore_errors=True)  # no QEMU runs on this copy of the key
        return (line.removeprefix("error: ") or
                f"the VM's supervisor died; see {paths.dir}/supervisor.err")

    # -- live migration -------------------------------------------------------------------

    async def receive(self, name: str, node: str, *, run_root: Path | None = None,
                      reconnect_delay: int = DEFAULT_RECONNECT_DELAY,
                      timeout: float = START_TIMEOUT, chap: Chap | None = None,
                      tls: Identity | None = None) -> tuple[str, Path]:
        """Get ready to take VM `name` in from the node running it: a QEMU like its own,
        with its disks through this node's (`node`'s) gateway, waiting for its state.
        Returns the URI the source is to send it to, and the new QEMU's run directory."""
        spec, _ = await self.vms.get(name)
        rt = await self.vms.runtime(name)
        if rt is None or rt.pid == 0:
            raise VmNotRunning(f"VM {name!r} is not running")
        if rt.node == node:
            raise BadSpec(f"VM {name!r} already runs on node {node[:12]}")
        if not rt.node:
            raise BadSpec(f"VM {name!r} runs on a dog's host ({rt.host}), not on a node: "
                          f"only VMs that nodes host migrate (not dog vm start --here)")
        me = next((n for n in await self.etcd.live_nodes() if n.node_id == node), None)
        if me is None:
            raise VmError(f"node {node[:12]} is not a live member of the cluster")
        gateway = _with_tls(_with_chap(await self.gateway(spec.transport, node), chap), tls)
        if (gateway.host, gateway.port) != (me.host, me.nbd_port if spec.transport == "nbd"
                                            else me.iscsi_port):
            raise BadSpec(f"node {node[:12]} serves no {spec.transport} gateway: a VM it "
                          f"hosts must reach its disks through its own (sheep run "
                          f"--{spec.transport}-port)")
        # by default beside the source's own directory (on its host: both hosts' alike)
        paths = RunPaths((run_root or Path(rt.run_dir).parent) / f"{name}.{node[:8]}")
        _prepare(paths, gateway, chap, tls)
        # the same machine as the source's: its disks as it has them now (hot-plugs too),
        # under its accelerator (a VM's state does not move between KVM and TCG)
        runtime = VmRuntime(name=name, host=socket.gethostname(), pid=0, supervisor=0,
                            run_dir=str(paths.dir), qmp=str(paths.qmp),
                            console=str(paths.console), console_log=str(paths.console_log),
                            agent=str(paths.agent), accel=rt.accel, gateway=gateway,
                            disks=rt.disks, accel_reason=rt.accel_reason, node=node,
                            state="inmigrate")
        argv = [*qemu_argv(replace(spec, disks=rt.disks), gateway, paths, rt.accel,
                           reconnect_delay=reconnect_delay), "-incoming", "defer"]
        if tls is not None:  # a secure cluster: the VM's memory travels under mutual TLS
            write_tls_dir(paths.migration_tls, tls, "server")
            argv += incoming_tls_args(paths)
        line = await self._supervise(paths, {
            "runtime": json.loads(runtime.dump()), "argv": argv,
            "incoming": f"tcp:{host_port(me.host, 0)}", "incoming_tls": tls is not None,
            "source_node": rt.node}, timeout)
        if not line.startswith("ok "):
            raise QemuFailed(line)
        return f"tcp:{host_port(me.host, int(line.split()[1]))}", paths.dir

    async def abort_receive(self, name: str, run_dir: Path) -> str:
        """End the QEMU waiting for VM `name` in `run_dir` (a migration called off), unless
        the VM already runs there; its supervisor then leaves quietly."""
        rt = await self.vms.runtime(name)
        if rt is not None and Path(rt.run_dir) == run_dir:
            raise VmError(f"VM {name!r} was already taken over here: too late to call its "
                          f"migration off")
        paths = RunPaths(run_dir)
        try:
            pid = int(paths.pidfile.read_text())
        except (OSError, ValueError):
            return "nothing was waiting"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await _wait_gone(pid, 10)
        return "the waiting QEMU was ended"

    async def send(self, name: str, uri: str, *, bandwidth: int = DEFAULT_BANDWIDTH,
                   timeout: float = DEFAULT_TIMEOUT, tls: Identity | None = None
                   ) -> AsyncIterator[Progress]:
        """Send VM `name`, running here, to the QEMU waiting at `uri`; its progress.
        `tls`: the certificate QEMU shows the destination (a secure cluster's node's)."""
        rt = await self.running(name)
        paths = RunPaths(Path(rt.run_dir))
        paths.sent.unlink(missing_ok=True)
        if tls is not None:
            write_tls_dir(paths.migration_tls, tls)
        async for progress in migrate_out(rt.qmp, uri, bandwidth=bandwidth, timeout=timeout,
                                          tls_dir=paths.migration_tls if tls else None):
            if progress.status == "completed":
                paths.sent.touch()
            yield progress

    async def stop(self, name: str, *, timeout: float = STOP_TIMEOUT) -> str:
        """ACPI power button, then (after `timeout`) QMP quit, then SIGKILL. How it ended."""
        rt = await self.running(name)
        await self.vms.unwant(name)  # on purpose: HA must not bring it back
        how = "powered off"
        RunPaths(Path(rt.run_dir)).stop_requested.touch()
        with contextlib.suppress(QemuFailed):
            async with monitor(rt.qmp, timeout=5) as mon:
                await mon.powerdown()
        if not await _wait_gone(rt.pid, timeout):
            how = "stopped (the guest ignored the power button)"
            with contextlib.suppress(QemuFailed):
                async with monitor(rt.qmp, timeout=5) as mon:
                    await mon.quit()
            if not await _wait_gone(rt.pid, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rt.pid, signal.SIGKILL)
                await _wait_gone(rt.pid, 10)
                how = "killed"
        await self.wait_stopped(name, 15)
        return how

    async def wait_stopped(self, name: str, timeout: float) -> bool:
        """Until the runtime record is gone (the supervisor saw QEMU exit); a supervisor
        that died with it leaves the record to us."""
        deadline = time.monotonic() + timeout
        while (rt := await self.vms.runtime(name)) is not None:
            if rt.host == socket.gethostname() and not _alive(rt.supervisor):
                await self.vms.forget_runtime(name)
                break
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def wait(self, name: str, timeout: float) -> VmExit | None:
        """Until the VM is stopped; how it ended. VmCrashed when it crashed."""
        await self.vms.get(name)
        if not await self.wait_stopped(name, timeout):
            raise VmError(f"VM {name!r} still runs after {timeout:.0f}s")
        ended = await self.vms.last_exit(name)
        if ended is not None and ended.crashed:
            raise VmCrashed(f"VM {name!r} crashed: {ended.reason}")
        return ended

    # -- running VMs ----------------------------------------------------------------------

    async def pause(self, name: str) -> None:
        async with monitor((await self.running(name)).qmp) as mon:
            await mon.pause()

    async def resume(self, name: str) -> None:
        async with monitor((await self.running(name)).qmp) as mon:
            await mon.resume()

    async def attach(self, name: str, vdi: str) -> None:
        """Hot-plug VDI into the running VM and keep it in the VM's definition."""
        rt = await self.running(name)
        spec, rev = await self.vms.get(name)
        if vdi in rt.disks:
            raise BadSpec(f"VDI {vdi!r} is already attached to VM {name!r}")
        await self._check_vdis([vdi])
        async with monitor(rt.qmp) as mon:
            await mon.hotplug(vdi, rt.gateway, initiator_name(name))
        disks = (*rt.disks, vdi)
        await self.vms.set_disks(name, disks)
        await self.manager.registry.add_user(vdi, vm_user(name), user_label(name), rt.lease)
        if vdi not in spec.disks:
            await self.vms.update(replace(spec, disks=(*spec.disks, vdi)), rev)

    async def detach(self, name: str, vdi: str, *, timeout: float = 30.0) -> None:
        rt = await self.running(name)
        spec, rev = await self.vms.get(name)
        if vdi not in rt.disks:
            raise BadSpec(f"VDI {vdi!r} is not attached to VM {name!r}")
        async with monitor(rt.qmp, timeout=timeout + 5) as mon:
            await mon.unplug(vdi, timeout)
        await self.vms.set_disks(name, tuple(d for d in rt.disks if d != vdi))
        await self.manager.registry.remove_user(vdi, vm_user(name))
        if vdi in spec.disks and len(spec.disks) > 1:
            await self.vms.update(replace(spec, disks=tuple(d for d in spec.disks if d != vdi)),
                                  rev)

    async def snapshot(self, name: str, tag: str) -> tuple[str, list[VdiRecord]]:
        """One consistent snapshot of every disk, all with `tag`: the guest's filesystems
        frozen by its agent when it runs one, else the whole VM paused (QEMU drains its
        I/O first); each VDI's gateway flushes and commits as the snapshot is taken."""
        rt = await self.running(name)
        state = await self.manager.state()
        for vdi in rt.disks:
            if any(r.snapshot and r.tag == tag for r in state.family(vdi)):
                raise BadSpec(f"VDI {vdi!r} already has a snapshot tagged {tag!r}")
        taken: list[VdiRecord] = []
        async with monitor(rt.qmp) as mon, _agent_if(await mon.agent_port_open(), rt) as agent:
            if agent is not None:
                how = "guest filesystems frozen"
                await agent.freeze()
            else:
                how = "VM paused"
                was_running = await mon.status() == "running"
                if was_running:
                    await mon.pause()
            try:
                for vdi in rt.disks:
                    taken.append(await self.manager.snapshot(vdi, tag))
            finally:
                if agent is not None:
                    await agent.thaw()
                elif was_running:
                    await mon.resume()
        return how, taken


def _prepare(paths: RunPaths, gateway: Gateway, chap: Chap | None,
             tls: Identity | None) -> None:
    """A VM's run directory, ready for its QEMU: no socket of a last run left, and the
    secrets QEMU reads from files."""
    paths.dir.mkdir(parents=True, exist_ok=True)
    for stale in (paths.qmp, paths.events, paths.console, paths.agent, paths.stop_requested,
                  paths.sent):
        stale.unlink(missing_ok=True)
    if len(str(paths.console)) > 100:
        raise BadSpec(f"run directory {paths.dir} is too long for unix sockets")
    if chap is not None and gateway.chap_user:
        _write_secret(paths.chap_secret, chap.secret)
    if tls is not None and gateway.tls:
        write_tls_dir(paths.tls, tls)


def _agent_if(port_open: bool, rt: VmRuntime
              ) -> contextlib.AbstractAsyncContextManager[GuestAgent | None]:
    """The guest agent when the guest holds its port open, else None at once."""
    return guest_agent(rt.agent) if port_open else contextlib.nullcontext(None)


async def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def _with_chap(gateway: Gateway, chap: Chap | None) -> Gateway:
    """The gateway QEMU logs in to with `chap`; a portal that requires CHAP without one
    is refused here, in one line, rather than by QEMU's login failing later."""
    if gateway.transport != "iscsi":
        return gateway
    if chap is None:
        if gateway.chap_required:
            raise VmError(f"the iSCSI portal at {host_port(gateway.host, gateway.port)} "
                          "requires CHAP: give dog vm start --iscsi-chap-file FILE "
                          "(USER:SECRET, mode 600)")
        return gateway
    return replace(gateway, chap_user=chap.user)


def _with_tls(gateway: Gateway, tls: Identity | None) -> Gateway:
    """The gateway QEMU starts TLS with, when it can: an NBD gateway that speaks TLS
    (`require`, or `allow`: encrypted is better) and a certificate to show it. A gateway
    that requires TLS without a certificate is refused here, in one line, rather than by
    QEMU's handshake failing later."""
    if gateway.transport != "nbd" or gateway.tls_mode not in ("require", "allow"):
        return gateway
    if tls is None:
        if gateway.tls_mode == "require":
            raise VmError(f"the NBD gateway at {host_port(gateway.host, gateway.port)} "
                          "requires TLS: dog needs a certificate of the cluster (its config "
                          "file: --config, $SHEEP_CONFIG or ./var/dog.conf)")
        return gateway
    return replace(gateway, tls=True)


def write_tls_dir(where: Path, tls: Identity, endpoint: str = "client") -> None:
    """`tls`'s CA, certificate and key as QEMU's tls-creds-x509 (of `endpoint`, client or
    server) reads them: copies (the identity's own files may sit where QEMU's names do
    not), the directory 0700 and the key 0600 from their first byte."""
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(where, 0o700)
    (where / "ca-cert.pem").write_bytes(tls.ca_pem)
    (where / f"{endpoint}-cert.pem").write_bytes(tls.cert_pem)
    _write_secret(where / f"{endpoint}-key.pem", tls.key_pem)


def _write_secret(path: Path, secret: bytes) -> None:
    """`secret` alone in `path`, readable by its owner only from the first byte on."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
