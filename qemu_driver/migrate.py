"""`dog vm migrate`: the order of a live migration between two nodes' VM hosts.

1. The destination node gets ready: a QEMU like the source's, its disks through its own
   gateway (offered writable: their locks are being handed over, sheep/vdi/handover.py),
   waiting for the VM's state on a port of its own.
2. The source node sends the VM (pre-copy, auto-converge) and reports its progress.
   QEMU stops the guest for the last round, drains and flushes its disks, and sends the
   rest: the migration is complete.
3. The destination's supervisor then takes the VM's runtime record and lets the guest run;
   the guest's first I/O there takes each disk's lock over, fenced, so the source can no
   longer write. The source's supervisor sees its record gone and ends its QEMU.

A migration that fails before it completes (the destination dies, the network is cut, it
does not converge in time) is called off at both ends: the guest runs on at the source,
which never gave up its locks. One whose destination does not take the VM in time after
completing has the source let the guest run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from sheep.gateway.iscsi.login import Chap

from .migration import MigrationFailed, Progress
from .registry import VmRegistry
from .remote import HostedVm
from .spec import VmRuntime

SWITCH_TIMEOUT = 30.0  # s the destination has to take the VM once it all came in


@dataclass(frozen=True)
class Migrated:
    """A migration done, as dog reports it."""

    runtime: VmRuntime  # the VM's record on the destination
    source: str  # node id
    seconds: float  # from dog's first request to the guest running at the destination
    downtime_ms: int  # QEMU's: the guest stopped at the source until the state was sent
    switchover_ms: int  # the destination's: from the state received to the guest running
    transferred: int  # bytes of RAM sent

    @property
    def paused_ms(self) -> int:
        """How long the guest did not run: QEMU's downtime and the switch-over."""
        return self.downtime_ms + self.switchover_ms


async def migrate(vms: VmRegistry, name: str, source: HostedVm, target: HostedVm, *,
                  bandwidth: int, timeout: float, progress: Callable[[Progress], None],
                  run_root: str = "", reconnect_delay: int = 0,
                  chap: Chap | None = None) -> Migrated:
    """Move running VM `name` from `source` to `target` (`run_root`, `reconnect_delay`
    and `chap` are the destination QEMU's, as for dog vm start)."""
    started = time.monotonic()
    uri = await target.receive(name, run_root=run_root, reconnect_delay=reconnect_delay,
                               chap=chap)
    last: Progress | None = None
    try:
        async for last in source.send(name, uri, bandwidth=bandwidth, timeout=timeout):
            progress(last)
    except BaseException:
        with contextlib.suppress(Exception):
            await target.abort_receive(name)
        raise
    if last is None or last.status != "completed":
        raise MigrationFailed("the source ended the migration without completing it")
    rt = await _taken_over(vms, name, target.node.node_id)
    if rt is None:
        with contextlib.suppress(Exception):
            await target.abort_receive(name)
        with contextlib.suppress(Exception):
            await source.resume(name)
        raise MigrationFailed(f"node {target.node.node_id[:12]} did not take VM {name!r} "
                              f"over within {SWITCH_TIMEOUT:.0f}s of receiving it: it runs "
                              f"on at node {source.node.node_id[:12]}")
    switchover = int(rt.extra.get("switchover_ms", 0))
    return Migrated(rt, source.node.node_id, time.monotonic() - started, last.downtime_ms,
                    switchover, last.transferred)


async def _taken_over(vms: VmRegistry, name: str, node: str) -> VmRuntime | None:
    deadline = time.monotonic() + SWITCH_TIMEOUT
    while time.monotonic() < deadline:
        rt = await vms.runtime(name)
        # its supervisor publishes how long the switch-over took right after it
        if rt is not None and rt.node == node and "switchover_ms" in rt.extra:
            return rt
        await asyncio.sleep(0.05)
    return None


def describe(p: Progress) -> str:
    """One line of progress."""
    mib = 1 << 20
    line = (f"{p.status}: {p.percent:5.1f}% of {p.total // mib} MiB, "
            f"{p.transferred // mib} MiB sent, {p.mbps:.0f} Mbit/s")
    if p.iterations > 1:
        line += f", round {p.iterations}"
    if p.throttle:
        line += f", guest slowed {p.throttle}%"
    return line

