"""VM definitions and runtime records in etcd, beside the VDI registry:

    vm/defs/<name>     one VmSpec, JSON
    vm/run/<name>      the VmRuntime of a running VM, on its supervisor's lease

Definitions change in transactions guarded by their mod revision (two creators of one name
cannot both win; an edit racing a delete fails rather than resurrecting it). A runtime
record is created only where none exists, so one VM cannot be started twice, from any host.
"""

from __future__ import annotations

from dataclasses import replace

from sheep.cluster.etcd import EtcdCluster

from .errors import NoVm, VmError, VmExists, VmRunning
from .spec import VmRuntime, VmSpec


class VmRegistry:
    def __init__(self, etcd: EtcdCluster) -> None:
        self.etcd = etcd
        self.tx = etcd.client.transactions
        self._defs = etcd.target.key("vm", "defs") + b"/"
        self._run = etcd.target.key("vm", "run") + b"/"

    def def_key(self, name: str) -> bytes:
        return self._defs + name.encode()

    def run_key(self, name: str) -> bytes:
        return self._run + name.encode()

    # -- definitions ----------------------------------------------------------------------

    async def list(self) -> list[VmSpec]:
        kvs = await self.etcd.client.get_prefix(self._defs)
        return sorted((VmSpec.load(kv.value) for kv in kvs), key=lambda s: s.name)

    async def get(self, name: str) -> tuple[VmSpec, int]:
        """The definition and its mod revision (the guard of an update)."""
        kv = await self.etcd.client.get(self.def_key(name))
        if kv is None:
            raise NoVm(f"no VM named {name!r}")
        return VmSpec.load(kv.value), kv.mod_revision

    async def create(self, spec: VmSpec) -> None:
        key = self.def_key(spec.name)
        ok, _ = await self.etcd.client.transaction(
            compare=[self.tx.version(key) == 0], success=[self.tx.put(key, spec.dump())],
            failure=[])
        if not ok:
            raise VmExists(f"VM {spec.name!r} already exists")

    async def update(self, spec: VmSpec, rev: int) -> None:
        key = self.def_key(spec.name)
        ok, _ = await self.etcd.client.transaction(
            compare=[self.tx.mod(key) == rev], success=[self.tx.put(key, spec.dump())],
            failure=[])
        if not ok:
            raise VmError(f"VM {spec.name!r} changed or went away meanwhile; try again")

    async def delete(self, name: str) -> None:
        """Only a stopped VM: the runtime key's absence is part of the transaction."""
        key, run = self.def_key(name), self.run_key(name)
        await self.get(name)
        ok, _ = await self.etcd.client.transaction(
            compare=[self.tx.version(run) == 0, self.tx.version(key) > 0],
            success=[self.tx.delete(key)], failure=[])
        if not ok:
            if await self.runtime(name) is not None:
                raise VmRunning(f"VM {name!r} is running; stop it first (dog vm stop {name})")
            raise NoVm(f"no VM named {name!r}")

    # -- runtime --------------------------------------------------------------------------

    async def runtime(self, name: str) -> VmRuntime | None:
        kv = await self.etcd.client.get(self.run_key(name))
        return VmRuntime.load(kv.value) if kv is not None else None

    async def runtimes(self) -> dict[str, VmRuntime]:
        kvs = await self.etcd.client.get_prefix(self._run)
        return {rt.name: rt for rt in (VmRuntime.load(kv.value) for kv in kvs)}

    async def claim(self, runtime: VmRuntime, lease, extra_ops: list) -> None:
        """Publish `runtime` on `lease` if the VM is defined and not running yet."""
        key, spec = self.run_key(runtime.name), self.def_key(runtime.name)
        ok, _ = await self.etcd.client.transaction(
            compare=[self.tx.version(key) == 0, self.tx.version(spec) > 0],
            success=[self.tx.put(key, runtime.dump(), lease=lease), *extra_ops], failure=[])
        if not ok:
            if await self.runtime(runtime.name) is not None:
                raise VmRunning(f"VM {runtime.name!r} is already running")
            raise NoVm(f"no VM named {runtime.name!r}")

    async def set_disks(self, name: str, disks: tuple[str, ...]) -> None:
        """Record the disks a running VM has now (after a hot-plug), on the same lease."""
        kv = await self.etcd.client.get(self.run_key(name))
        if kv is None:
            return
        rt = VmRuntime.load(kv.value)
        await self.etcd.client.transaction(
            compare=[self.tx.mod(self.run_key(name)) == kv.mod_revision],
            success=[self.tx.put(self.run_key(name), replace(rt, disks=disks).dump(),
                                 lease=kv.lease)],
            failure=[])

    async def forget_runtime(self, name: str) -> None:
        await self.etcd.client.delete(self.run_key(name))
