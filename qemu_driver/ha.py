"""HA: every `sheep run` node watches the cluster's VMs and restarts, on itself, an HA VM
(`dog vm create --ha`) that lost its host.

A VM lost its host when it should run (its `vm/want/<name>` record stands: put with the
runtime record at every start, deleted when a run ends on purpose, by `dog vm stop` or the
guest powering off, or by a crash) and has no runtime record (its supervisor's lease ran
out: the host died, stopped, or was cut off). A crashed VM is not restarted: its exit
record says why, and a guest that panicked would most likely panic again.

Every node ranks the live nodes the same way (fewest running VMs first, then the lowest
id; the node that ran it last only if no other is up) and the first one restarts the VM
from the cluster's definition with VmControl.start on itself. If it has not done so after
RETRY_AFTER seconds (its start failed, or it died too), the second one tries, and so on;
the runtime claim (one transaction) keeps two nodes from both running it.

The VDIs' write locks: the dead host's gateway still holds them until their lease runs
out (sheep.vdi.registry.LOCK_TTL), and a gateway offers a VDI locked elsewhere read-only,
which QEMU would refuse. A lock whose holder is the gateway of a node that is no longer
live is broken at once: fencing (sheep/vdi/fence.py) makes the new holder's token the only
one storage nodes take, so that gateway's writes, should its node only have been stopped
or cut off, are refused when it comes back. A lock held by a live node's gateway is waited
for (its client, the old QEMU, died with its host and the connection with it), up to
LOCK_WAIT seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from sheep.cluster.state import NodeInfo
from sheep.control.handle import NodeHandle
from sheep.errors import VdiLocked
from sheep.node.daemon import GATEWAY_HOLDER
from sheep.vdi.manager import VdiManager
from sheep.vdi.registry import LOCK_TTL, VdiRegistry

from .control import VmControl
from .errors import VmError
from .registry import VmRegistry
from .spec import VmRuntime, VmSpec, VmWant

log = logging.getLogger("sheep.vm.ha")

POLL = 2.0  # s between looks at the VMs when etcd says nothing changed
RETRY_AFTER = 30.0  # s a node waits for the one ranked before it to restart a VM
LOCK_WAIT = LOCK_TTL + 5.0  # s a live gateway's lock may take to go


def ranked(nodes: Iterable[NodeInfo], runtimes: Iterable[VmRuntime], last: str
           ) -> list[NodeInfo]:
    """The order in which nodes restart a VM whose host was `last`: the fewest running VMs
    first, then the lowest id; `last` at the end (it may be back, and lost the VM once)."""
    nodes = list(nodes)
    load = {n.node_id: 0 for n in nodes}
    for rt in runtimes:
        if rt.node in load:
            load[rt.node] += 1
    return sorted(nodes, key=lambda n: (n.node_id == last, load[n.node_id], n.node_id))


def lock_node(holder: str) -> str | None:
    """The id prefix of the node whose gateway holds a lock named `holder`; None when a
    gateway does not hold it (dog, a tool)."""
    return holder.removeprefix(GATEWAY_HOLDER) if holder.startswith(GATEWAY_HOLDER) else None


class HaWatcher:
    def __init__(self, node: NodeHandle) -> None:
        self.node = node
        self.me = node.info.node_id
        self.vms = VmRegistry(node.etcd)
        self.locks = VdiRegistry(node.etcd)
        self._orphaned: dict[str, float] = {}  # VM -> since when it has lacked a host
        self._tried: dict[str, float] = {}  # VM -> when this node last tried to restart it
        self._restarting: dict[str, asyncio.Task] = {}

    async def run(self) -> None:
        await self.node.etcd.watch(self._look, poll=POLL, prefix=self.vms.prefix)

    async def _look(self) -> None:
        try:
            await self.check()
        except Exception as exc:  # etcd away, a record half-written: look again later
            log.warning("HA: could not look at the VMs: %s", exc)

    async def check(self) -> None:
        """Restart here each HA VM that lost its host and that this node's turn has come
        for."""
        specs = [s for s in await self.vms.list() if s.ha]
        wants, runtimes = await self.vms.wants(), await self.vms.runtimes()
        orphans = {s.name: (s, wants[s.name]) for s in specs
                   if s.name in wants and s.name not in runtimes}
        for name in set(self._orphaned) - set(orphans):
            del self._orphaned[name]
        if not orphans:
            return
        nodes = await self.node.etcd.live_nodes()
        now = time.monotonic()
        for name, (spec, want) in orphans.items():
            since = self._orphaned.setdefault(name, now)
            order = [n.node_id for n in ranked(nodes, runtimes.values(), want.node)]
            if self.me not in order or name in self._restarting:
                continue
            turn = order.index(self.me) * RETRY_AFTER
            if now - since < turn or now - self._tried.get(name, -RETRY_AFTER) < RETRY_AFTER:
                continue
            self._tried[name] = now
            task = asyncio.ensure_future(self._restart(spec, want, nodes))
            self._restarting[name] = task
            task.add_done_callback(lambda _, name=name: self._restarting.pop(name, None))

    async def _restart(self, spec: VmSpec, want: VmWant, nodes: list[NodeInfo]) -> None:
        began = time.monotonic()
        lost = f"node {want.node[:12]}" if want.node else "a dog's host"
        log.info("vm %s: HA restart here (it lost its host, %s)", spec.name, lost)
        client = self.node.client
        ctl = VmControl(VdiManager(client, VdiRegistry(client.etcd),
                                   holder=f"sheep node {self.me[:8]} vm ha"))
        try:
            await self._free_locks(spec, {n.node_id[:8] for n in nodes})
            # a folder per node: two nodes of one host must not share the VM's sockets
            root = await ctl.run_root() / f"node-{self.me[:8]}"
            rt = await ctl.start(spec.name, run_root=root, tls=self.node.identity,
                                 node=self.me)
        except Exception as exc:
            log.warning("vm %s: HA restart here failed: %s", spec.name, exc)
            return
        log.info("vm %s: HA restart done: pid %d, %.1f s after this node took it on",
                 rt.name, rt.pid, time.monotonic() - began)

    async def _free_locks(self, spec: VmSpec, live: set[str]) -> None:
        """Each disk's write lock free for this node's gateway: broken when a dead node's
        gateway holds it, else waited for."""
        deadline = time.monotonic() + LOCK_WAIT
        for vdi in spec.disks:
            while (info := await self.locks.lock_holder(vdi)) is not None:
                node = lock_node(info.holder)
                if node is not None and node not in live:
                    with contextlib.suppress(VdiLocked):  # it changed hands: look again
                        await self.locks.break_lock(vdi, force=True)
                    log.warning("vm %s: broke the lock of VDI %s held by %s (its node is "
                                "gone; fencing refuses its writes)", spec.name, vdi, info.who)
                    continue
                if time.monotonic() > deadline:
                    raise VmError(f"VDI {vdi!r} is still open for writing by {info.who}")
                await asyncio.sleep(0.5)


async def watch_ha(node: NodeHandle) -> None:
    """The HA watcher of `node`, for NodeOptions.node_tasks (`sheep run` adds it)."""
    await HaWatcher(node).run()
