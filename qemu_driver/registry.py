"""VM definitions and runtime records in etcd, beside the VDI registry:

    vm/defs/<name>     one VmSpec, JSON
    vm/run/<name>      the VmRuntime of a running VM, on its supervisor's lease
    vm/exit/<name>     how its last run ended (VmExit): crashed or stopped, and why
    vm/want/<name>     that it should run (VmWant): put with its runtime record, deleted when
                       the run ends on purpose or crashes; standing without a runtime
                       record, it says the VM lost its host (qemu_driver/ha.py)

Definitions change in transactions guarded by their mod revision (two creators of one name
cannot both win; an edit racing a delete fails rather than resurrecting it). A runtime
record is created only where none exists, so one VM cannot be started twice, from any host;
its create revision names that run: a supervisor changes the record, or ends the run, only
while the record is still the one it created (a run restarted elsewhere is not its).
"""

from __future__ import annotations

import time
from dataclasses import replace

from sheep.cluster import kv as tx
from sheep.cluster.etcd import EtcdCluster
from sheep.cluster.kv import Lease

from .errors import NoVm, VmError, VmExists, VmRunning
from .spec import VmExit, VmRuntime, VmSpec, VmWant


class VmRegistry:
    def __init__(self, etcd: EtcdCluster) -> None:
        self.etcd = etcd
        self.kv = etcd.kv
        self._defs = etcd.target.key("vm", "defs") + b"/"
        self._run = etcd.target.key("vm", "run") + b"/"
        self._exit = etcd.target.key("vm", "exit") + b"/"
        self._want = etcd.target.key("vm", "want") + b"/"
        self.prefix = etcd.target.key("vm") + b"/"

    def def_key(self, name: str) -> bytes:
        return self._defs + name.encode()

    def run_key(self, name: str) -> bytes:
        return self._run + name.encode()

    def exit_key(self, name: str) -> bytes:
        return self._exit + name.encode()

    def want_key(self, name: str) -> bytes:
        return self._want + name.encode()

    # -- definitions ----------------------------------------------------------------------

    async def list(self) -> list[VmSpec]:
        kvs = await self.kv.get_prefix(self._defs)
        return sorted((VmSpec.load(kv.value) for kv in kvs), key=lambda s: s.name)

    async def get(self, name: str) -> tuple[VmSpec, int]:
        """The definition and its mod revision (the guard of an update)."""
        kv = await self.kv.get(self.def_key(name))
        if kv is None:
            raise NoVm(f"no VM named {name!r}")
        return VmSpec.load(kv.value), kv.mod_revision

    async def create(self, spec: VmSpec) -> None:
        key = self.def_key(spec.name)
        ok = await self.kv.transaction(
            compare=[tx.version(key) == 0], success=[tx.put(key, spec.dump())])
        if not ok:
            raise VmExists(f"VM {spec.name!r} already exists")

    async def update(self, spec: VmSpec, rev: int) -> None:
        key = self.def_key(spec.name)
        ok = await self.kv.transaction(
            compare=[tx.mod(key) == rev], success=[tx.put(key, spec.dump())])
        if not ok:
            raise VmError(f"VM {spec.name!r} changed or went away meanwhile; try again")

    async def delete(self, name: str) -> None:
        """Only a stopped VM: the runtime key's absence is part of the transaction."""
        key, run = self.def_key(name), self.run_key(name)
        await self.get(name)
        ok = await self.kv.transaction(
            compare=[tx.version(run) == 0, tx.version(key) > 0],
            success=[tx.delete(key), tx.delete(self.exit_key(name)),
                     tx.delete(self.want_key(name))])
        if not ok:
            if await self.runtime(name) is not None:
                raise VmRunning(f"VM {name!r} is running; stop it first (dog vm stop {name})")
            raise NoVm(f"no VM named {name!r}")

    # -- runtime --------------------------------------------------------------------------

    async def runtime(self, name: str) -> VmRuntime | None:
        kv = await self.kv.get(self.run_key(name))
        return VmRuntime.load(kv.value) if kv is not None else None

    async def runtimes(self) -> dict[str, VmRuntime]:
        kvs = await self.kv.get_prefix(self._run)
        return {rt.name: rt for rt in (VmRuntime.load(kv.value) for kv in kvs)}

    async def claim(self, runtime: VmRuntime, lease: Lease,
                    extra_ops: list[tx.Put | tx.Delete]) -> int:
        """Publish `runtime` on `lease` if the VM is defined and not running yet; the last
        run's exit record goes, and the wish that it run is recorded, in the same
        transaction. The record's create revision: what names this run."""
        key, spec = self.run_key(runtime.name), self.def_key(runtime.name)
        want = VmWant(runtime.node, time.time())
        ok = await self.kv.transaction(
            compare=[tx.version(key) == 0, tx.version(spec) > 0],
            success=[tx.put(key, runtime.dump(), lease=lease),
                     tx.delete(self.exit_key(runtime.name)),
                     tx.put(self.want_key(runtime.name), want.dump()), *extra_ops])
        if not ok:
            if await self.runtime(runtime.name) is not None:
                raise VmRunning(f"VM {runtime.name!r} is already running")
            raise NoVm(f"no VM named {runtime.name!r}")
        return await self._created_on(key, lease)

    async def republish(self, runtime: VmRuntime, lease: Lease,
                        extra_ops: list[tx.Put | tx.Delete]) -> int:
        """Publish `runtime` again on a new `lease` (the old one expired while etcd was
        away), only if no run took its place meanwhile: the new record's create revision,
        0 when the record is someone else's (or the VM was deleted)."""
        key, spec = self.run_key(runtime.name), self.def_key(runtime.name)
        ok = await self.kv.transaction(
            compare=[tx.version(key) == 0, tx.version(spec) > 0],
            success=[tx.put(key, runtime.dump(), lease=lease), *extra_ops])
        return await self._created_on(key, lease) if ok else 0

    async def _created_on(self, key: bytes, lease: Lease) -> int:
        kv = await self.kv.get(key)
        return kv.create_revision if kv is not None and kv.lease == lease.id else 0

    async def own_runtime(self, name: str, run: int) -> VmRuntime | None:
        """The runtime record if it is still run `run`'s (its create revision)."""
        kv = await self.kv.get(self.run_key(name))
        if kv is None or kv.create_revision != run:
            return None
        return VmRuntime.load(kv.value)

    async def update_runtime(self, name: str, lease: Lease | None = None, run: int = 0,
                             **changes) -> VmRuntime | None:
        """Change some fields of a running VM's record, keeping the others (its supervisor
        publishes run states while dog records hot-plugged disks); None when it is gone,
        or (given `run`, a create revision) when it is another run's, or (given the
        supervisor's `lease`) no longer on it: the VM migrated on."""
        key = self.run_key(name)
        for _ in range(20):
            kv = await self.kv.get(key)
            if kv is None or (run and kv.create_revision != run) or \
                    (lease is not None and kv.lease != tx.lease_id(lease)):
                return None
            rt = replace(VmRuntime.load(kv.value), **changes)
            ok = await self.kv.transaction(
                compare=[tx.mod(key) == kv.mod_revision],
                success=[tx.put(key, rt.dump(), lease=lease or kv.lease)])
            if ok:
                return rt
        raise VmError(f"VM {name!r}: its runtime record kept changing; try again")

    async def take_over(self, runtime: VmRuntime, lease: Lease, source: str,
                        extra_ops: list[tx.Put | tx.Delete]) -> tuple[str, int]:
        """Publish `runtime` on `lease` in place of the record of the VM running on node
        `source` (a migration's switch-over), or where none is left (that node died since);
        returns the node it was taken from and the record's create revision (the run's: a
        switch-over does not make a new run). VmRunning when it runs on another node now."""
        key = self.run_key(runtime.name)
        for _ in range(20):
            kv = await self.kv.get(key)
            if kv is None:
                guard, was = tx.version(key) == 0, source
            else:
                was = VmRuntime.load(kv.value).node
                if was != source:
                    raise VmRunning(f"VM {runtime.name!r} runs on node {was[:12]} now, "
                                    f"not on node {source[:12]}")
                guard = tx.mod(key) == kv.mod_revision
            want = tx.put(self.want_key(runtime.name), VmWant(runtime.node, time.time()).dump())
            if await self.kv.transaction(
                    compare=[guard], success=[tx.put(key, runtime.dump(), lease=lease), want,
                                              *extra_ops]):
                return was, await self._created_on(key, lease)
        raise VmError(f"VM {runtime.name!r}: its runtime record kept changing; try again")

    async def set_disks(self, name: str, disks: tuple[str, ...]) -> None:
        """Record the disks a running VM has now (after a hot-plug), on the same lease."""
        await self.update_runtime(name, disks=disks)

    async def forget_runtime(self, name: str) -> None:
        await self.kv.delete(self.run_key(name))

    # -- how the last run ended -----------------------------------------------------------

    async def record_exit(self, name: str, ended: VmExit, run: int = 0) -> bool:
        """Record how run `run` ended, and that the VM need not run any more, if no other
        run took its place: its record is still run `run`'s, or gone with no successor.
        False when another run has the VM (its records are left alone)."""
        key = self.run_key(name)
        ops = [tx.put(self.exit_key(name), ended.dump()), tx.delete(self.want_key(name))]
        for guard in (tx.create(key) == run, tx.version(key) == 0):
            if await self.kv.transaction(compare=[guard], success=ops):
                return True
        return False

    # -- whether it should run ------------------------------------------------------------

    async def wants(self) -> dict[str, VmWant]:
        kvs = await self.kv.get_prefix(self._want)
        return {kv.key[len(self._want):].decode(): VmWant.load(kv.value) for kv in kvs}

    async def unwant(self, name: str) -> None:
        """The VM is being stopped on purpose: HA must not bring it back."""
        await self.kv.delete(self.want_key(name))

    async def last_exit(self, name: str) -> VmExit | None:
        kv = await self.kv.get(self.exit_key(name))
        return VmExit.load(kv.value) if kv is not None else None

    async def exits(self) -> dict[str, VmExit]:
        kvs = await self.kv.get_prefix(self._exit)
        return {kv.key[len(self._exit):].decode(): VmExit.load(kv.value) for kv in kvs}
