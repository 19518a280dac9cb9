"""The process that keeps a started VM's QEMU company: `dog vm start` spawns it detached.

It claims the VM in etcd on a lease of its own (so two starts cannot both launch QEMU, and
a host that dies takes its VMs' runtime records with it), launches QEMU as its child, says
"ok" (or the error) on its stdout to dog, which then exits, and keeps the lease alive until
QEMU exits, however it exits (powered off by the guest, `dog vm stop`, killed). Then the
runtime record and the VDI-user keys go with the lease: nobody has to clean up after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

from sheep.cluster.etcd import EtcdCluster
from sheep.cluster.state import EtcdTarget
from sheep.vdi.registry import VdiRegistry

from .cmdline import RunPaths
from .registry import VmRegistry
from .spec import VmRuntime

log = logging.getLogger("sheep.vm.supervisor")

LEASE_TTL = 10
START_TIMEOUT = 30.0


def user_label(vm: str) -> str:
    return f"VM {vm} (on {socket.gethostname()}; dog vm stop {vm})"


def user_keys(vdis: VdiRegistry, vm: str, disks: tuple[str, ...]) -> list[bytes]:
    return [vdis.user_key(vdi, f"vm:{vm}") for vdi in disks]


def _die_with_parent(argv: list[str]) -> list[str]:
    """QEMU gets SIGTERM (a clean shutdown) if its supervisor dies: a VM nobody tracks
    would keep writing to VDIs the cluster believes free (a rollback would be allowed).
    Through setpriv, not a preexec_fn: forking a process that runs gRPC (aetcd) without
    exec'ing at once trips gRPC's fork handlers, which abort the child."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


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


def _tail(path: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    return ""


async def supervise(plan: dict, report) -> int:
    etcd = EtcdCluster(EtcdTarget.parse(plan["etcd"]))
    await etcd.connect()
    vms, vdis = VmRegistry(etcd), VdiRegistry(etcd)
    runtime = VmRuntime.load(json.dumps(plan["runtime"]).encode())
    paths = RunPaths(Path(runtime.run_dir))
    lease = await etcd.client.lease(LEASE_TTL)
    runtime = replace(runtime, supervisor=os.getpid(), lease=lease.id)
    label = user_label(runtime.name).encode()
    try:
        await vms.claim(runtime, lease, [etcd.client.transactions.put(k, label, lease=lease)
                                         for k in user_keys(vdis, runtime.name, runtime.disks)])
    except Exception as exc:
        report(f"error: {exc}")
        await etcd.close()
        return 1
    proc = None
    try:
        with open(paths.qemu_log, "ab") as qlog:
            proc = await asyncio.create_subprocess_exec(
                *_die_with_parent(plan["argv"]), stdin=asyncio.subprocess.DEVNULL,
                stdout=qlog, stderr=qlog)
        await _wait_socket(paths.qmp, proc, START_TIMEOUT)
        runtime = replace(runtime, pid=proc.pid, started=time.time())
        await etcd.client.put(vms.run_key(runtime.name), runtime.dump(), lease=lease)
        paths.pidfile.write_text(f"{proc.pid}\n")
    except Exception as exc:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(Exception):
            await lease.revoke()
        report(f"error: {exc}: {_tail(paths.qemu_log)}")
        await etcd.close()
        return 1
    report("ok")
    log.info("VM %s: QEMU pid %d", runtime.name, proc.pid)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, proc.terminate)
    waiter = asyncio.ensure_future(proc.wait())
    while not waiter.done():
        await asyncio.wait([waiter], timeout=LEASE_TTL / 3)
        try:
            reply = await lease.refresh()
            if reply.TTL <= 0:  # etcd was away too long: publish again on a new lease
                lease = await etcd.client.lease(LEASE_TTL)
                runtime = replace(runtime, lease=lease.id)
                await etcd.client.put(vms.run_key(runtime.name), runtime.dump(), lease=lease)
                for key in user_keys(vdis, runtime.name, runtime.disks):
                    await etcd.client.put(key, label, lease=lease)
        except Exception as exc:
            log.warning("lease refresh failed: %s", exc)
    log.info("VM %s: QEMU exited with status %s", runtime.name, proc.returncode)
    (paths.dir / "exit-status").write_text(f"{proc.returncode}\n")
    with contextlib.suppress(Exception):
        # the user keys of hot-plugged disks are on the lease too
        current = await vms.runtime(runtime.name)
        await lease.revoke()
        if current is not None:
            for key in user_keys(vdis, runtime.name, current.disks):
                await etcd.client.delete(key)
    await etcd.close()
    return 0


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
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    return asyncio.run(supervise(plan, report))


if __name__ == "__main__":
    sys.exit(main())
