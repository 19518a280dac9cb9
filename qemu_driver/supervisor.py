"""The process that keeps a started VM's QEMU company: `dog vm start` spawns it detached.

It claims the VM in etcd on a lease of its own (so two starts cannot both launch QEMU, and
a host that dies takes its VMs' runtime records with it), launches QEMU as its child, says
"ok" (or the error) on its stdout to dog, which then exits, and keeps the lease alive until
QEMU exits, however it exits (powered off by the guest, `dog vm stop`, killed).

It follows QEMU's run state through a monitor of its own (QEMU starts paused and runs only
once the supervisor listens): the state is published in the runtime record, and a QEMU that
stops in `internal-error` (KVM gave up on the guest) or `guest-panicked` (the guest's pvpanic
device) is a crash, never "running": the supervisor ends it and records why. A crash under
KVM within KVM_GRACE of the start is blamed on KVM: the VM runs once more under TCG, and its
runtime record says so. When QEMU is gone, how it ended is written to the VM's exit record
(`vm/exit/<name>`, kept until the next start), and the runtime record and the VDI-user keys
go with the lease: nobody has to clean up after it.

A supervisor whose lease expired (etcd away, or the host stopped or cut off past the TTL)
publishes the VM again only where no other run took its place, and only for a VM without
HA: an HA VM may be restarting on another node already (qemu_driver/ha.py), so its QEMU is
killed at once. A run that lost its record to another leaves that run's records alone:
runtime record, VDI-user keys (the same names), exit record and the wish that it run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from qemu.qmp import EventListener, QMPClient, QMPError

from sheep.children import die_with_parent
from sheep.cluster.etcd import EtcdCluster
from sheep.cluster.state import EtcdTarget
from sheep.output import to_devnull
from sheep.security.identity import Identity
from sheep.vdi import handover
from sheep.vdi.registry import Handover, VdiRegistry

from .cmdline import MIGRATION_AUTHZ_ID, MIGRATION_TLS_ID, RunPaths
from .registry import VmRegistry
from .spec import VmExit, VmRuntime

log = logging.getLogger("sheep.vm.supervisor")

# s; $SHEEP_VM_LEASE_TTL shortens it (tests: an HA restart waits for it to run out)
LEASE_TTL = int(os.environ.get("SHEEP_VM_LEASE_TTL") or 10)
START_TIMEOUT = 30.0
KVM_GRACE = 15.0  # s after the start in which a crash under KVM means: try TCG instead
TICK = LEASE_TTL / 3  # s between run-state checks when QEMU says nothing
QMP_TIMEOUT = 10.0
FINAL_TIMEOUT = 10.0  # s for each last word to etcd once QEMU is gone
TERM_GRACE = 10.0  # s QEMU has to stop after SIGTERM before it is killed
INCOMING_POLL = 0.02  # s between looks at a migration's destination (part of the downtime)
HANDED_OVER_WAIT = 60.0  # s a migrated source waits for its destination to take the VM
SENT_WAIT = 5.0  # s it waits for the sender to read the migration's outcome from QEMU
EVENTS = ("STOP", "RESUME", "GUEST_PANICKED", "SHUTDOWN", "MIGRATION")
CRASH_STATES = ("internal-error", "guest-panicked")
# signals that end QEMU from outside: a crash, but not one to blame on the accelerator
EXTERNAL_SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PANIC_LINE = re.compile(r"Kernel panic - not syncing:[^\r\n]*")
_SHUTDOWNS = {"guest-shutdown": "the guest powered off",
              "host-qmp-quit": "QEMU was told to quit",
              "host-signal": "QEMU was stopped by a signal",
              "host-qmp-system-reset": "QEMU was reset",
              "guest-reset": "the guest rebooted (a VM ends when its guest reboots)"}


def user_label(vm: str) -> str:
    return f"VM {vm} (on {socket.gethostname()}; dog vm stop {vm})"


def vm_user(vm: str) -> str:
    """How a VM is named among a VDI's users in the registry."""
    return f"vm:{vm}"


async def _wait_socket(path: Path, proc: asyncio.subprocess.Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"QEMU exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"QEMU did not open its monitor within {timeout:.0f}s")
        await asyncio.sleep(0.05)


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")
    return ""


def _tail(path: Path, lines: int = 3) -> str:
    return " | ".join(_read(path).strip().splitlines()[-lines:])


def _panic_line(console_log: Path) -> str:
    found = _PANIC_LINE.findall(_read(console_log)[-65536:])
    return found[-1].strip() if found else ""


@dataclass(frozen=True)
class Ending:
    """How one QEMU process ended."""

    crashed: bool
    reason: str
    status: int | None
    external: bool = False  # ended from outside (a stop, a kill): not the accelerator's fault


class QemuRun:
    """One QEMU process: launched paused, let run once its events are followed, ended by a
    crash state, and judged by how it exited."""

    def __init__(self, argv: list[str], paths: RunPaths) -> None:
        self.argv, self.paths = argv, paths
        self.proc: asyncio.subprocess.Process | None = None
        self.client = QMPClient("sheep-supervisor")
        self.listener = EventListener(EVENTS)
        self.launched = 0.0
        self.crash = ""  # why it crashed, once a crash state was seen
        self.shutdown = ""  # the reason of QEMU's SHUTDOWN event

    async def launch(self, timeout: float, *, incoming: str = "", tls: bool = False) -> None:
        """`incoming`: the URI to wait for the VM's state on (a migration's destination):
        the guest stays paused until its supervisor lets it run; `tls`: under mutual TLS
        (incoming_tls_args)."""
        with open(self.paths.qemu_log, "ab") as qlog:
            self.proc = await asyncio.create_subprocess_exec(
                # QEMU gets SIGTERM (a clean shutdown) if its supervisor dies: a VM nobody
                # tracks would keep writing to VDIs the cluster believes free
                *die_with_parent(self.argv), stdin=asyncio.subprocess.DEVNULL,
                stdout=qlog, stderr=qlog)
        await _wait_socket(self.paths.events, self.proc, timeout)
        async with asyncio.timeout(QMP_TIMEOUT):
            await self.client.connect(str(self.paths.events))
        self.client.register_listener(self.listener)
        if incoming:
            if tls:
                await self._execute("migrate-set-parameters", {
                    "tls-creds": MIGRATION_TLS_ID, "tls-authz": MIGRATION_AUTHZ_ID})
            await self._execute("migrate-incoming", {"uri": incoming})
        else:
            await self._execute("cont")
        self.launched = time.monotonic()

    async def incoming_port(self) -> int:
        """The port QEMU listens for the migration on (it was asked for any free one)."""
        reply = await self._execute("query-migrate")
        assert isinstance(reply, dict)
        return int(reply["socket-address"][0]["port"])

    async def incoming_done(self) -> bool:
        """Until the migration came in: True when QEMU holds the whole VM, paused; False
        when QEMU exited instead (the migration failed or was called off)."""
        assert self.proc is not None
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            while not exited.done():
                if (state := await self._state()) not in ("inmigrate", "unresponsive"):
                    return state == "paused"
                await asyncio.wait([exited], timeout=INCOMING_POLL)
            return False
        finally:
            exited.cancel()

    async def resume(self) -> None:
        await self._execute("cont")

    async def _execute(self, command: str, arguments: dict | None = None) -> object:
        async with asyncio.timeout(QMP_TIMEOUT):
            return await self.client.execute(command, arguments)

    async def _state(self) -> str:
        """QEMU's run state; "unresponsive" when its monitor does not answer in time."""
        try:
            reply = await self._execute("query-status")
        except (QMPError, TimeoutError, OSError):
            return "unresponsive"
        assert isinstance(reply, dict)
        return str(reply["status"])

    def terminate(self) -> None:
        """SIGTERM, then SIGKILL after TERM_GRACE: QEMU drains its disks before it exits,
        and a disk whose gateway died with us would hold it for the reconnect delay."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            asyncio.get_running_loop().call_later(TERM_GRACE, self._kill)

    def _kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            log.warning("QEMU did not stop within %.0fs of SIGTERM: killed", TERM_GRACE)
            self.proc.kill()

    async def end(self) -> None:
        """Quit QEMU, killed if it does not go within QMP_TIMEOUT; idempotent."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(QMPError, TimeoutError, OSError):
                await self._execute("quit")
            try:
                async with asyncio.timeout(QMP_TIMEOUT):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(Exception):
            await self.client.disconnect()

    async def follow(self, on_state) -> Ending:
        """Until QEMU exits: each event, and every TICK, checks its run state and passes a
        change to `on_state`; a crash state ends QEMU."""
        assert self.proc is not None
        exited = asyncio.ensure_future(self.proc.wait())
        last = ""
        while not exited.done():
            event = asyncio.ensure_future(self.listener.get())
            await asyncio.wait([exited, event], timeout=TICK,
                               return_when=asyncio.FIRST_COMPLETED)
            if event.done():
                if (got := event.result())["event"] == "SHUTDOWN":
                    self.shutdown = str(got.get("data", {}).get("reason", ""))
            else:
                event.cancel()
            if exited.done():
                break
            state = await self._state()
            if state != last and self.proc.returncode is None:
                last = state
                await on_state(state)
            if state in CRASH_STATES and not self.crash:
                self.crash = self._crash_reason(state)
                log.warning("QEMU crashed: %s", self.crash)
                await self.end()
        await self.end()
        return self._ending(self.proc.returncode)

    def _crash_reason(self, state: str) -> str:
        if state == "guest-panicked":
            panic = _panic_line(self.paths.console_log)
            return f"the guest kernel panicked{': ' + panic if panic else ''} (pvpanic)"
        return f"QEMU stopped the guest in state {state}: {_tail(self.paths.qemu_log, 2)}"

    def _ending(self, status: int | None) -> Ending:
        if self.crash:
            return Ending(True, self.crash, status)
        if self.paths.stop_requested.exists():
            return Ending(False, "stopped by dog vm stop", status, external=True)
        if status is not None and status < 0:
            sig = signal.Signals(-status)
            external = sig in EXTERNAL_SIGNALS
            detail = "" if external else f": {_tail(self.paths.qemu_log, 2)}"
            return Ending(True, f"QEMU was killed by {sig.name}{detail}", status, external)
        if status:
            return Ending(True, f"QEMU exited with status {status}: "
                                f"{_tail(self.paths.qemu_log, 2)}", status)
        if self.shutdown == "guest-reset" and (panic := _panic_line(self.paths.console_log)):
            return Ending(True, f"the guest kernel panicked: {panic}", status)
        how = self.shutdown or "status 0"
        return Ending(False, _SHUTDOWNS.get(self.shutdown, f"QEMU exited ({how})"), status)


class Supervisor:
    def __init__(self, plan: dict, report) -> None:
        self.plan, self.report = plan, report
        files = plan.get("identity")  # the starter's certificate, for an https etcd
        identity = Identity.load(files["ca"], files["cert"], files["key"]) if files else None
        self.etcd = EtcdCluster(EtcdTarget.parse(plan["etcd"]), identity=identity)
        self.runtime = VmRuntime.load(json.dumps(plan["runtime"]).encode())
        self.paths = RunPaths(Path(self.runtime.run_dir))
        self.label = user_label(self.runtime.name)
        self.vms = self.vdis = None
        self.lease = None
        self.qemu: QemuRun | None = None
        self.reported = False
        self.incoming: str = plan.get("incoming", "")  # a migration's destination: its URI
        self.migrated = False  # the VM went on to another node: its records are not ours
        self.state = ""  # QEMU's run state, as last seen
        self.handovers: dict[str, Handover] = {}  # incoming: the disks' lock handovers
        self._handing_over: asyncio.Future[None] | None = None
        # the runtime record's create revision: which run is ours (0: none yet, or it is a
        # migration's destination still waiting; a switch-over keeps the revision, so a
        # migrated source also checks its lease is still the record's)
        self.run_rev = 0
        self.ha = False
        self.superseded = ""  # why this run gave the VM up (another run may have it)

    async def run(self) -> int:
        await self.etcd.connect()
        self.vms, self.vdis = VmRegistry(self.etcd), VdiRegistry(self.etcd)
        self.lease = await self.etcd.lease(LEASE_TTL)
        self.runtime = replace(self.runtime, supervisor=os.getpid(), lease=self.lease.id)
        try:
            if self.incoming:
                # the destination of a migration: the VM runs at its source, which holds
                # its record; this node's gateway may take its disks' locks over
                for vdi in self.runtime.disks:
                    self.handovers[vdi] = await handover.offer(
                        self.vdis, vdi, self.runtime.node, self.runtime.name, self.lease)
            else:
                self.run_rev = await self.vms.claim(self.runtime, self.lease, self._user_ops())
            self.ha = (await self.vms.get(self.runtime.name))[0].ha
        except Exception as exc:
            self._report(f"error: {exc}")
            await self.etcd.close()
            return 1
        self.paths.stop_requested.unlink(missing_ok=True)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._terminate)
        keepalive = asyncio.ensure_future(self._keepalive())
        try:
            ending = await (self._run_incoming() if self.incoming else self._run_qemu())
        finally:
            keepalive.cancel()
            # QEMU's last run is over (a TCG restart needed them): no copy of the key stays
            shutil.rmtree(self.paths.tls, ignore_errors=True)
        log.info("VM %s: %s", self.runtime.name, ending.reason)
        if self.superseded:
            log.warning("VM %s: given up (%s); its records are left to its next run",
                        self.runtime.name, self.superseded)
        elif self.run_rev and not self.migrated:
            await self._last_words(ending)
        else:  # the VM runs elsewhere: nothing of its records is ours to touch
            with contextlib.suppress(Exception):
                async with asyncio.timeout(FINAL_TIMEOUT):
                    await self.lease.revoke()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(FINAL_TIMEOUT):
                await self.etcd.close()
        return 0 if self.reported else 1

    def _user_ops(self) -> list:
        return [self.vdis.add_user_op(vdi, vm_user(self.runtime.name), self.label, self.lease)
                for vdi in self.runtime.disks]

    async def _last_words(self, ending: Ending) -> None:
        """How the run ended, and its records gone: only while they are this run's."""
        # bounded: an etcd that died with its cluster (sheep up killed) must not keep us
        with contextlib.suppress(Exception):
            async with asyncio.timeout(FINAL_TIMEOUT):
                await self.vms.record_exit(self.runtime.name, VmExit(
                    "crashed" if ending.crashed else "stopped", ending.reason, ending.status,
                    time.time(), self.runtime.host, self.runtime.accel, self.runtime.fallback,
                    self.runtime.run_dir, self.runtime.node), self.run_rev)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(FINAL_TIMEOUT):
                # the user keys of hot-plugged disks are on the lease too
                current = await self.vms.own_runtime(self.runtime.name, self.run_rev)
                await self.lease.revoke()
                if current is not None:
                    for vdi in current.disks:
                        await self.vdis.remove_user(vdi, vm_user(self.runtime.name))

    async def _run_incoming(self) -> Ending:
        """The destination of a migration: QEMU waits for the VM's state; once it all came
        in (the source stopped the guest), this supervisor takes the VM's runtime record
        and lets the guest run here. A migration that fails ends QEMU, and the VM runs on
        at its source, untouched."""
        self.qemu = qemu = QemuRun(self.plan["argv"], self.paths)
        try:
            try:
                await qemu.launch(START_TIMEOUT, incoming=self.incoming,
                                  tls=self.plan.get("incoming_tls", False))
            finally:  # QEMU read it at its start
                shutil.rmtree(self.paths.migration_tls, ignore_errors=True)
            port = await qemu.incoming_port()
        except Exception as exc:
            await qemu.end()
            reason = f"{exc}: {_tail(self.paths.qemu_log)}"
            self._report(f"error: {reason}")
            return Ending(True, reason, qemu.proc.returncode if qemu.proc else None)
        self.paths.pidfile.write_text(f"{qemu.proc.pid}\n")
        self._report(f"ok {port}")
        if not await qemu.incoming_done():
            await qemu.end()
            return Ending(False, "the migration to here did not complete", qemu.proc.returncode)
        came_in = time.monotonic()
        try:
            for vdi, offered in self.handovers.items():
                await handover.make_ready(self.vdis, vdi, offered, self.lease)
            source, self.run_rev = await self.vms.take_over(
                replace(self.runtime, pid=qemu.proc.pid, started=time.time(), state="running"),
                self.lease, self.plan["source_node"], self._user_ops())
            await qemu.resume()
        except Exception as exc:
            log.error("VM %s: cannot take the VM over after its migration: %s",
                      self.runtime.name, exc)
            await qemu.end()
            return Ending(True, f"taking the VM over failed: {exc}", qemu.proc.returncode)
        switchover_ms = round(1000 * (time.monotonic() - came_in))
        self.runtime = replace(self.runtime, pid=qemu.proc.pid, state="running")
        await self._publish(extra={**self.runtime.extra, "migrated_from": source,
                                   "switchover_ms": switchover_ms})
        log.info("VM %s: migrated here from node %s (switch-over %d ms); QEMU pid %d",
                 self.runtime.name, source[:12], switchover_ms, qemu.proc.pid)
        return await qemu.follow(self._on_state)

    async def _hand_over(self) -> None:
        """A source whose migration completed: once the destination took the VM's record,
        QEMU (paused for good) ends, and this supervisor with it, leaving the VM's records
        to the destination. Until then (or if the destination never does, and dog lets the
        guest run here again) nothing changes."""
        deadline = time.monotonic() + HANDED_OVER_WAIT
        sent_by = time.monotonic() + SENT_WAIT
        while time.monotonic() < deadline and self.state == "postmigrate":
            # the sender reads QEMU's report of the migration (its downtime) first
            if not self.paths.sent.exists() and time.monotonic() < sent_by:
                await asyncio.sleep(0.05)
                continue
            with contextlib.suppress(Exception):
                rt = await self.vms.runtime(self.runtime.name)
                if rt is None or rt.lease != self.lease.id:
                    self.migrated = True
                    log.info("VM %s: migrated to node %s", self.runtime.name,
                             rt.node[:12] if rt else "?")
                    assert self.qemu is not None
                    await self.qemu.end()
                    return
            await asyncio.sleep(0.1)

    def _report(self, line: str) -> None:
        if not self.reported:
            self.reported = line == "ok" or line.startswith("ok ")
            self.report(line)

    def _terminate(self) -> None:
        if self.qemu is not None:
            self.qemu.terminate()

    async def _publish(self, **changes) -> None:
        self.runtime = replace(self.runtime, **changes)
        if not self.run_rev or self.migrated:
            return
        with contextlib.suppress(Exception):
            current = await self.vms.update_runtime(self.runtime.name, self.lease,
                                                    self.run_rev, **changes)
            if current is not None:
                self.runtime = current

    async def _on_state(self, state: str) -> None:
        log.info("VM %s: %s", self.runtime.name, state)
        self.state = state
        await self._publish(state=state)
        if state == "postmigrate":
            self._handing_over = asyncio.ensure_future(self._hand_over())

    async def _run_qemu(self) -> Ending:
        """QEMU under the chosen accelerator; under TCG once more when KVM fails early."""
        attempts = [(self.runtime.accel, self.plan["argv"])]
        if self.plan.get("fallback_argv"):
            attempts.append(("tcg", self.plan["fallback_argv"]))
        for i, (accel, argv) in enumerate(attempts):
            last = i == len(attempts) - 1
            self.qemu = qemu = QemuRun(argv, self.paths)
            try:
                await qemu.launch(START_TIMEOUT)
            except Exception as exc:
                await qemu.end()
                reason = f"{exc}: {_tail(self.paths.qemu_log)}"
                if not last and not self.paths.stop_requested.exists():
                    await self._fall_back(reason)
                    continue
                self._report(f"error: {reason}")
                return Ending(True, reason, qemu.proc.returncode if qemu.proc else None)
            await self._publish(pid=qemu.proc.pid, started=time.time(), state="running",
                                accel=accel)
            self.paths.pidfile.write_text(f"{qemu.proc.pid}\n")
            self._report("ok")
            log.info("VM %s: QEMU pid %d under %s", self.runtime.name, qemu.proc.pid, accel)
            ending = await qemu.follow(self._on_state)
            early = time.monotonic() - qemu.launched < KVM_GRACE
            if ending.crashed and early and not ending.external and not last:
                await self._fall_back(ending.reason)
                continue
            return ending
        raise AssertionError("not reached: the last attempt returns")

    async def _fall_back(self, reason: str) -> None:
        log.warning("VM %s: KVM failed at start (%s); starting it under TCG",
                    self.runtime.name, reason)
        await self._publish(fallback=reason, state="starting", accel="tcg", pid=0)

    async def _keepalive(self) -> None:
        refreshed = time.monotonic()
        while not self.superseded:
            await asyncio.sleep(TICK)
            try:
                if await self.lease.refresh() > 0:
                    refreshed = time.monotonic()
                else:
                    await self._lease_lost()
            except Exception as exc:
                log.warning("lease refresh failed: %s", exc)
                if self.ha and time.monotonic() - refreshed > LEASE_TTL:
                    # cut off from etcd past the TTL: HA may restart the VM elsewhere
                    self._give_up(f"no word from etcd for {LEASE_TTL} s")

    async def _lease_lost(self) -> None:
        """The lease ran out (etcd away, or this host stopped past the TTL): publish the
        VM again on a new lease where no other run took its place; an HA VM is given up
        (another node may be restarting it now, its disks' locks broken)."""
        if self.ha:
            self._give_up("its lease expired: HA restarts it on another node")
            return
        if not self.run_rev or self.migrated:  # its disks' handovers went with the lease
            self._give_up("its lease expired during a migration")
            return
        lease = await self.etcd.lease(LEASE_TTL)
        self.runtime = replace(self.runtime, lease=lease.id)
        old, self.lease = self.lease, lease
        rev = await self.vms.republish(self.runtime, lease, self._user_ops())
        if rev:
            self.run_rev = rev
            log.warning("VM %s: its lease %x expired; published again", self.runtime.name,
                        old.id)
        else:
            with contextlib.suppress(Exception):
                await lease.revoke()
            self._give_up("its lease expired and another run has the VM")

    def _give_up(self, why: str) -> None:
        """Kill QEMU now: the VM runs (or is about to) elsewhere, and a second copy of it
        must not write a byte more."""
        self.superseded = why
        log.warning("VM %s: %s; killing QEMU", self.runtime.name, why)
        if self.qemu is not None and self.qemu.proc is not None \
                and self.qemu.proc.returncode is None:
            self.qemu.proc.kill()


def main() -> int:
    plan_path = Path(sys.argv[1])
    plan = json.loads(plan_path.read_text())
    run_dir = Path(plan["runtime"]["run_dir"])
    logging.basicConfig(filename=run_dir / "supervisor.log", level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    out = sys.stdout

    def report(line: str) -> None:
        """One line to dog, then stdout goes quiet: dog exits and the pipe closes."""
        with contextlib.suppress(OSError):
            out.write(line + "\n")
            out.flush()
        to_devnull(1)

    return asyncio.run(Supervisor(plan, report).run())


if __name__ == "__main__":
    sys.exit(main())
