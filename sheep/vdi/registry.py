"""The VDI registry in etcd: names, ids, the snapshot tree, write locks, holder requests.

Every change is one etcd transaction guarded by the mod revision of each record it touches,
so concurrent admins (two creators of one name, a delete racing a snapshot) cannot both win:
the loser re-reads and retries or gets a clear error. Layout under the cluster prefix:

    vdi/next_id            the next VDI id to hand out
    vdi/ids/<id>           one VdiRecord (working VDI or snapshot) per id, JSON
    vdi/names/<name>       the family: which id is the name's working VDI (0: none)
    vdi/locks/<name>       the writer's lock, attached to its lease; the revision that
                           created it is the holder's fencing token
    vdi/fences/<id>        the highest fencing token of a holder of VDI <id>: storage nodes
                           refuse writes with a lower one (sheep/node/fences.py)
    vdi/requests/<name>/*  requests to the lock holder (a snapshot of a VDI in use)
    vdi/replies/<id>       the holder's answers
    vdi/users/<name>/<who> who uses the VDI beyond a lock (a running VM), on the user's lease
    vdi/retired/<id>       a deleted VDI's id (when): its leftover objects are garbage (gc.py)
    vdi/nbd-allow/<name>   the certificate names that may attach the family over NBD (JSON
                           list); none: any client certificate of the cluster
    vdi/handover/<name>    a gateway that may take the lock over at a live migration
                           (handover.py), on the destination supervisor's lease
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

from sheep.clock import SYSTEM, Clock
from sheep.cluster import kv as tx
from sheep.cluster.etcd import EtcdCluster
from sheep.cluster.kv import Lease
from sheep.errors import ClusterError, NoVdi, VdiLocked
from sheep.oid import MAX_VDI_ID, inode_oid

from .inode import InodeHeader, make_ref

log = logging.getLogger(__name__)

LOCK_TTL = 10


class HolderGone(ClusterError):
    """the lock holder a request was sent to let go of the lock without answering"""


@dataclass(frozen=True)
class VdiRecord:
    id: int
    name: str
    size: int
    copies: int
    block_size: int
    created: float
    parent: int = 0
    tag: str = ""
    snapshot: bool = False
    snap_time: float = 0.0
    serial: int = 0  # the id the disk was created with; 0 in records older than the field
    incomplete: bool = False  # an import into it has not finished (or was interrupted)

    @property
    def disk_serial(self) -> int:
        """The disk's identity for life (its SCSI serial and NAA id): the id it was created
        with, kept by every snapshot and rollback, while each snapshot is known by its own
        id. A record from before `serial` existed uses its id."""
        return self.serial or self.id

    @property
    def ref(self) -> int:
        """This VDI's owner ref, as its objects appear in owner tables."""
        return make_ref(self.id, self.copies)

    @property
    def inode_oid(self) -> int:
        return inode_oid(self.id, self.copies)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.tag}" if self.snapshot else self.name

    def header(self) -> InodeHeader:
        return InodeHeader(self.id, self.name, self.tag, self.parent, self.size, self.copies,
                           self.block_size, self.created, self.snapshot, self.snap_time)

    def dump(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def load(cls, raw: bytes) -> VdiRecord:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class LockInfo:
    name: str
    holder: str
    host: str
    pid: int
    since: float

    def dump(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def load(cls, name: str, raw: bytes) -> LockInfo:
        data = json.loads(raw)
        data["name"] = name
        return cls(**data)

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    def holder_alive(self) -> bool:
        """Whether the holder may still be writing. Only a holder on this host can be seen
        to be gone (its pid no longer runs); one elsewhere renews its lease, so it counts
        as alive."""
        if not self.here:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # runs, as another user
            return True
        return True

    @property
    def who(self) -> str:
        """The holder, its pid and host."""
        return f"{self.holder} (pid {self.pid} on {self.host})"

    def refusal(self) -> str:
        """Why a writer cannot have the VDI, and what the user can do about it: a live
        holder must be stopped (breaking its lock needs --force); a dead one's lock goes
        away with its lease, or `lock unlock` breaks it now."""
        lead = f"VDI {self.name!r} is open for writing by {self.who}"
        if self.holder_alive():
            return (f"{lead}, which is running: stop it first ('dog vdi lock unlock "
                    f"--force {self.name}' breaks its lock, and it stops writing)")
        return (f"{lead}, which is gone: its lock expires within {LOCK_TTL} s, or "
                f"'dog vdi lock unlock {self.name}' breaks it now")


@dataclass(frozen=True)
class Handover:
    """Who may take a VDI's lock over from whom (handover.py)."""

    node: str  # the node whose gateway may take the lock over
    token: int  # the token of the lock it breaks (0: the VDI was not locked)
    vm: str = ""
    ready: bool = False  # the switch-over came: the next I/O takes the lock over

    def dump(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def load(cls, raw: bytes) -> Handover:
        data = json.loads(raw)
        return cls(str(data["node"]), int(data["token"]), str(data.get("vm", "")),
                   bool(data.get("ready", False)))


@dataclass
class RegistryState:
    """One consistent read of the whole registry (a single etcd range read)."""

    records: dict[int, VdiRecord] = field(default_factory=dict)
    record_revs: dict[int, int] = field(default_factory=dict)
    working: dict[str, int] = field(default_factory=dict)  # family name -> working id (0)
    family_revs: dict[str, int] = field(default_factory=dict)
    locks: dict[str, LockInfo] = field(default_factory=dict)
    handovers: dict[str, Handover] = field(default_factory=dict)
    nbd_allow: dict[str, frozenset[str]] = field(default_factory=dict)  # family -> names

    def family(self, name: str) -> list[VdiRecord]:
        """The name's snapshots, oldest first, then its working VDI if it has one."""
        members = [r for r in self.records.values() if r.name == name]
        return sorted(members, key=lambda r: (not r.snapshot, r.snap_time, r.id))

    def lookup(self, name: str, tag: str | None = None) -> VdiRecord:
        if name not in self.working:
            raise NoVdi(f"no VDI named {name!r}")
        if tag is None:
            working = self.records.get(self.working[name])
            if working is None:
                raise NoVdi(f"VDI {name!r} has only snapshots (roll back or clone one)")
            return working
        for rec in self.records.values():
            if rec.name == name and rec.snapshot and rec.tag == tag:
                return rec
        raise NoVdi(f"VDI {name!r} has no snapshot tagged {tag!r}")

    def children(self, vdi_id: int) -> list[VdiRecord]:
        return sorted((r for r in self.records.values() if r.parent == vdi_id),
                      key=lambda r: r.id)


class Change:
    """One registry transaction: every record it writes or deletes is guarded by the mod
    revision it had when `state` was read."""

    def __init__(self, state: RegistryState, registry: VdiRegistry) -> None:
        self._state = state
        self._reg = registry
        self._guards: dict[bytes, int] = {}
        self._compare: list[tx.Compare] = []
        self._ops: list[tx.Put | tx.Delete] = []

    def _guard(self, key: bytes, rev: int) -> None:
        self._guards.setdefault(key, rev)

    def require(self, record: VdiRecord) -> Change:
        """Fail the transaction if `record` changed or went away meanwhile."""
        self._guard(self._reg.record_key(record.id), self._state.record_revs.get(record.id, 0))
        return self

    def put_record(self, record: VdiRecord) -> Change:
        self._guard(self._reg.record_key(record.id), self._state.record_revs.get(record.id, 0))
        self._ops.append(tx.put(self._reg.record_key(record.id), record.dump()))
        return self

    def held(self, lock: VdiLock) -> Change:
        """Fail the transaction unless `lock` is still held: a holder paused past its
        lease must not change the registry after a new holder read it."""
        self._compare.append(tx.create(self._reg.lock_key(lock.name)) == lock.token)
        return self

    def delete_record(self, record: VdiRecord) -> Change:
        self.require(record)
        self._ops.append(tx.delete(self._reg.record_key(record.id)))
        self._ops.append(tx.delete(self._reg.fence_key(record.id)))
        self._ops.append(tx.put(self._reg.retired_key(record.id),
                                          str(time.time()).encode()))
        return self

    def put_family(self, name: str, working: int) -> Change:
        key = self._reg.family_key(name)
        self._guard(key, self._state.family_revs.get(name, 0))
        self._ops.append(tx.put(key, json.dumps({"working": working}).encode()))
        return self

    def delete_family(self, name: str) -> Change:
        key = self._reg.family_key(name)
        self._guard(key, self._state.family_revs.get(name, 0))
        self._ops.append(tx.delete(key))
        self._ops.append(tx.delete(self._reg.nbd_allow_key(name)))  # a new VDI starts open
        return self

    async def commit(self) -> bool:
        compare = [tx.mod(key) == rev for key, rev in self._guards.items()] + self._compare
        return await self._reg.kv.transaction(compare=compare, success=self._ops)


class HeldLease:
    """An etcd lease refreshed until released: the keys put on it vanish with their holder
    (a process that dies or stalls past the TTL), never linger after it.

    If the lease goes away (the holder stalled past the TTL, or an admin revoked it),
    `lost` is set. It is refreshed every third of its TTL, timed by `clock`.
    """

    def __init__(self, lease: Lease, ttl: int, what: str, *, clock: Clock = SYSTEM) -> None:
        self.lost = asyncio.Event()
        self._lease = lease
        self._ttl = ttl
        self._what = what
        self._clock = clock
        self._task = asyncio.ensure_future(self._keep_alive())

    async def _still_held(self, ttl: int) -> bool:
        return ttl > 0

    async def _keep_alive(self) -> None:
        while True:
            await self._clock.sleep(self._ttl / 3)
            try:
                ttl = await self._lease.refresh()
                if not await self._still_held(ttl):
                    log.warning("%s was lost", self._what)
                    self.lost.set()
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd briefly away: the lease has slack until the TTL
                log.warning("refreshing %s failed: %s", self._what, exc)

    async def release(self) -> None:
        """Revoking the lease deletes its keys with it, and never a newer holder's key
        (that one hangs on its own lease)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(Exception):
            await self._lease.revoke()


class VdiLock(HeldLease):
    """A held write lock: an etcd key on our own lease, refreshed until released.

    If the lease or the key goes away (an admin broke the lock), `lost` is set: the holder
    must stop writing, because someone else may now. `token` is the etcd revision that
    created the key: every later holder's is larger, and the holder's writes carry it so
    that storage nodes refuse them once a newer holder fenced the VDI (fence.py).
    """

    def __init__(self, registry: VdiRegistry, name: str, lease: Lease, ttl: int,
                 token: int) -> None:
        self.name = name
        self.token = token
        self._reg = registry
        super().__init__(lease, ttl, f"the lock on VDI {name} (further writes refused)",
                         clock=registry.clock)

    async def _still_held(self, ttl: int) -> bool:
        kv = await self._reg.kv.get(self._reg.lock_key(self.name))
        return ttl > 0 and kv is not None and kv.lease == self._lease.id


class VdiRegistry:
    """`clock` times lease refreshes and waits for a lock holder's answer: tests pass a
    fake one (sheep/clock.py)."""

    def __init__(self, etcd: EtcdCluster, *, clock: Clock = SYSTEM) -> None:
        self.etcd = etcd
        self.kv = etcd.kv
        self.clock = clock
        self._root = etcd.target.key("vdi")

    # -- keys -----------------------------------------------------------------------------

    def _key(self, *parts: str) -> bytes:
        return self._root + ("/" + "/".join(parts)).encode()

    def record_key(self, vdi_id: int) -> bytes:
        return self._key("ids", f"{vdi_id:08x}")

    def retired_key(self, vdi_id: int) -> bytes:
        return self._key("retired", f"{vdi_id:08x}")

    def family_key(self, name: str) -> bytes:
        return self._key("names", name)

    def nbd_allow_key(self, name: str) -> bytes:
        return self._key("nbd-allow", name)

    def fence_key(self, vdi_id: int) -> bytes:
        return self._key("fences", f"{vdi_id:08x}")

    def handover_key(self, name: str) -> bytes:
        return self._key("handover", name)

    def lock_key(self, name: str) -> bytes:
        return self._key("locks", name)

    def user_key(self, name: str, user: str) -> bytes:
        return self._key("users", name, user)

    def add_user_op(self, name: str, user: str, label: str, lease: Lease) -> tx.Put:
        """The transaction operation that records `user` of VDI `name` on `lease` (gone
        with its holder), for a transaction of the caller's (a VM's claim)."""
        return tx.put(self.user_key(name, user), label.encode(), lease=lease)

    async def add_user(self, name: str, user: str, label: str, lease: Lease) -> None:
        await self.kv.put(self.user_key(name, user), label.encode(), lease=lease)

    async def remove_user(self, name: str, user: str) -> None:
        await self.kv.delete(self.user_key(name, user))

    # -- reads ----------------------------------------------------------------------------

    async def load(self) -> RegistryState:
        state = RegistryState()
        ids, names, locks = self._key("ids", ""), self._key("names", ""), self._key("locks", "")
        allow, handovers = self.nbd_allow_key(""), self.handover_key("")
        for kv in await self.kv.get_prefix(self._root + b"/"):
            key = kv.key
            if key.startswith(ids):
                rec = VdiRecord.load(kv.value)
                state.records[rec.id] = rec
                state.record_revs[rec.id] = kv.mod_revision
            elif key.startswith(names):
                name = key[len(names):].decode()
                state.working[name] = json.loads(kv.value)["working"]
                state.family_revs[name] = kv.mod_revision
            elif key.startswith(locks):
                name = key[len(locks):].decode()
                state.locks[name] = LockInfo.load(name, kv.value)
            elif key.startswith(allow):
                state.nbd_allow[key[len(allow):].decode()] = frozenset(json.loads(kv.value))
            elif key.startswith(handovers):
                state.handovers[key[len(handovers):].decode()] = Handover.load(kv.value)
        return state

    async def set_nbd_allow(self, name: str, names: frozenset[str] | None) -> None:
        """Who may attach VDI `name` (and its snapshots) over NBD, by certificate name;
        None: any client certificate of the cluster. Written only while the family is
        the one read (a VDI deleted meanwhile gets no list)."""
        op = (tx.delete(self.nbd_allow_key(name)) if names is None
              else tx.put(self.nbd_allow_key(name), json.dumps(sorted(names)).encode()))
        for _ in range(5):
            state = await self.load()
            if name not in state.working:
                raise NoVdi(f"no VDI named {name!r}")
            guard = tx.mod(self.family_key(name)) == state.family_revs[name]
            if await self.kv.transaction(compare=[guard], success=[op]):
                return
        raise ClusterError(f"VDI {name!r} kept changing; try again")

    async def retired(self) -> set[int]:
        """The ids of every VDI deleted since the cluster was formatted."""
        prefix = self._key("retired", "")
        return {int(kv.key[len(prefix):], 16)
                for kv in await self.kv.get_prefix(prefix)}

    async def is_live(self, vdi_id: int) -> bool:
        return await self.kv.get(self.record_key(vdi_id)) is not None

    async def record_use(self, label: str, user: str, description: str, *,
                         ttl: int = LOCK_TTL) -> HeldLease:
        """Record that `user` reads `label` (NAME or NAME@TAG) until the returned lease is
        released or its holder dies: a reader holds no lock, yet a delete must not pull
        the blocks from under it."""
        lease = await self.etcd.lease(ttl)
        await self.add_user(label, user, description, lease)
        return HeldLease(lease, ttl, f"the record of {description} reading {label}",
                         clock=self.clock)

    async def users(self, label: str) -> list[str]:
        """What uses `label` (NAME or NAME@TAG) beyond a write lock, one description each:
        a VM keeps using its disk across gateway restarts, when no lock may be held for a
        while, and a reader holds no lock at all."""
        kvs = await self.kv.get_prefix(self._key("users", label, ""))
        return sorted(kv.value.decode() for kv in kvs)

    def change(self, state: RegistryState) -> Change:
        return Change(state, self)

    async def allocate_id(self) -> int:
        """A VDI id never handed out before: ids are not reused, so an object named by a
        deleted VDI's id can only be a leftover of that VDI."""
        key = self._key("next_id")
        for _ in range(1000):
            kv = await self.kv.get(key)
            current = int(kv.value) if kv is not None else 1
            if current > MAX_VDI_ID:
                raise ClusterError("VDI ids are exhausted")
            ok = await self.kv.transaction(
                compare=[tx.mod(key) == (kv.mod_revision if kv is not None else 0)],
                success=[tx.put(key, str(current + 1).encode())])
            if ok:
                return current
            await self.clock.sleep(0.001)
        raise ClusterError("could not allocate a VDI id: too much contention")

    # -- locks ----------------------------------------------------------------------------

    async def acquire_lock(self, name: str, holder: str, *, ttl: int = LOCK_TTL) -> VdiLock:
        lease = await self.kv.lease(ttl)
        info = LockInfo(name, holder, socket.gethostname(), os.getpid(), time.time())
        key = self.lock_key(name)
        ok = await self.kv.transaction(
            compare=[tx.version(key) == 0],
            success=[tx.put(key, info.dump(), lease=lease)])
        if not ok:
            with contextlib.suppress(Exception):
                await lease.revoke()
            kv = await self.kv.get(key)
            raise VdiLocked(LockInfo.load(name, kv.value).refusal() if kv is not None
                            else f"VDI {name!r} is open for writing by another writer")
        kv = await self.kv.get(key)
        if kv is None or kv.lease != lease.id:  # broken at once: as if never held
            with contextlib.suppress(Exception):
                await lease.revoke()
            raise VdiLocked(f"the lock on VDI {name!r} was broken as it was taken")
        return VdiLock(self, name, lease, ttl, kv.create_revision)

    async def record_fence(self, lock: VdiLock, vdi_id: int) -> None:
        """Record in etcd that VDI `vdi_id` has a holder with `lock`'s token, while the lock
        is still held: a node that starts (or joins) later reads it before it serves."""
        ok = await self.kv.transaction(
            compare=[tx.create(self.lock_key(lock.name)) == lock.token],
            success=[tx.put(self.fence_key(vdi_id), str(lock.token).encode())])
        if not ok:
            raise VdiLocked(f"the write lock on VDI {lock.name!r} was lost")

    def fences_prefix(self) -> bytes:
        return self._key("fences", "")

    async def fences(self) -> dict[int, int]:
        """Every VDI id's highest fencing token, as recorded in etcd."""
        prefix = self.fences_prefix()
        return {int(kv.key[len(prefix):], 16): int(kv.value)
                for kv in await self.kv.get_prefix(prefix)}

    async def lock_holder(self, name: str) -> LockInfo | None:
        kv = await self.kv.get(self.lock_key(name))
        return LockInfo.load(name, kv.value) if kv is not None else None

    async def break_lock(self, name: str, *, force: bool = False) -> LockInfo | None:
        """Break `name`'s lock; returns whose it was, or None if it was not locked. A live
        holder's lock (see LockInfo.holder_alive) is broken only with `force`: its writer
        would stop in the middle of its work. Only the lock that was checked is deleted,
        never one a new holder took meanwhile."""
        key = self.lock_key(name)
        kv = await self.kv.get(key)
        if kv is None:
            return None
        info = LockInfo.load(name, kv.value)
        if not force and info.holder_alive():
            raise VdiLocked(f"VDI {name!r} is locked by {info.who}, which is running; "
                            f"--force breaks the lock anyway, and that writer stops")
        ok = await self.kv.transaction(
            compare=[tx.mod(key) == kv.mod_revision],
            success=[tx.delete(key)])
        if not ok:
            raise VdiLocked(f"the lock on VDI {name!r} changed hands meanwhile; look again "
                            f"(dog vdi lock list)")
        return info

    # -- requests to the lock holder ----------------------------------------------------

    async def ask_holder(self, name: str, request: dict, timeout: float = 30.0) -> dict:
        """Send `request` to the process holding `name`'s lock and wait for its answer."""
        req_id = uuid.uuid4().hex
        req_key = self._key("requests", name, req_id)
        reply_key = self._key("replies", req_id)
        await self.kv.put(req_key, json.dumps(request).encode())
        deadline = self.clock.monotonic() + timeout
        try:
            while self.clock.monotonic() < deadline:
                kv = await self.kv.get(reply_key)
                if kv is not None:
                    return json.loads(kv.value)
                if await self.lock_holder(name) is None:
                    raise HolderGone(f"the writer of VDI {name!r} went away before answering")
                await self.clock.sleep(0.05)
            raise ClusterError(f"the writer of VDI {name!r} did not answer in {timeout:.0f}s")
        finally:
            await self.kv.delete(req_key)
            await self.kv.delete(reply_key)

    async def serve_requests(
        self, name: str, handler: Callable[[dict], Awaitable[dict]]
    ) -> None:
        """Answer requests addressed to `name`'s lock holder, forever (cancel to stop)."""
        prefix = self._key("requests", name, "")
        replies = self._key("replies", "")
        done: set[bytes] = set()

        async def answer_new() -> None:
            for kv in await self.kv.get_prefix(prefix):
                key = kv.key
                if key in done:
                    continue
                done.add(key)
                try:
                    answer = await handler(json.loads(kv.value))
                except Exception as exc:
                    answer = {"ok": False, "error": str(exc)}
                await self.kv.put(replies + key[len(prefix):], json.dumps(answer).encode())

        await self.etcd.watch(answer_new, poll=1.0, prefix=prefix)

