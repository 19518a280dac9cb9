"""An in-memory `Kv` (sheep/cluster/kv.py) with etcd's semantics: one store revision per
change, versions and create/mod revisions per key, transactions with etcd's comparisons,
and leases that run out by an injected clock (keys on them go in one revision, as etcd
revokes an expired lease). `down` makes every call fail as if etcd were unreachable.

tests/integration/test_kv_contract.py runs the same checks against this and a real etcd.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from sheep.clock import SYSTEM, Clock
from sheep.cluster.etcd import EtcdCluster, EtcdUnavailable
from sheep.cluster.kv import Compare, Delete, KeyValue, Lease, LeaseGone, Put, lease_id
from sheep.cluster.state import EtcdTarget

from .clock import FakeClock


@dataclass
class _LeaseState:
    ttl: int
    deadline: float


class FakeLease:
    def __init__(self, kv: FakeKv, lease: int) -> None:
        self._kv, self._id = kv, lease

    @property
    def id(self) -> int:
        return self._id

    async def refresh(self) -> int:
        return self._kv._refresh(self._id)

    async def revoke(self) -> None:
        self._kv._check()
        if self._id not in self._kv._leases:
            raise LeaseGone(f"lease {self._id:x} is gone")
        self._kv._end_lease(self._id)


class FakeWatch:
    def __init__(self, kv: FakeKv, prefix: bytes) -> None:
        self._kv, self.prefix = kv, prefix
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def _changed(self, key: bytes) -> None:
        if key.startswith(self.prefix):
            self._queue.put_nowait(key)

    async def _keys(self) -> AsyncIterator[bytes]:
        while (key := await self._queue.get()) is not None:
            yield key

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._keys()

    async def cancel(self) -> None:
        if self in self._kv._watches:
            self._kv._watches.remove(self)
        self._queue.put_nowait(None)


class FakeKv:
    def __init__(self, clock: Clock = SYSTEM) -> None:
        self._clock = clock
        self.revision = 1  # a new etcd's
        self.down = False
        self._data: dict[bytes, KeyValue] = {}
        self._leases: dict[int, _LeaseState] = {}
        self._next_lease = 0x7E57_0000_0001
        self._watches: list[FakeWatch] = []
        self._before_transaction: list[Callable[[], Awaitable[None]]] = []

    # -- what tests use ---------------------------------------------------------------------

    def before_next_transaction(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` just before the next transaction is judged: another party's move
        between a caller's read and its guarded write."""
        self._before_transaction.append(step)

    def end_lease(self, lease: int) -> None:
        """Revoke `lease` as another party would (an admin, or etcd after its TTL)."""
        self._expire()
        if lease in self._leases:
            self._end_lease(lease)

    @property
    def leases(self) -> set[int]:
        """The ids of the leases alive now."""
        self._expire()
        return set(self._leases)

    # -- internals --------------------------------------------------------------------------

    def _check(self) -> None:
        if self.down:
            raise EtcdUnavailable("etcd cannot be reached (FakeKv.down)")
        self._expire()

    def _expire(self) -> None:
        now = self._clock.monotonic()
        for lease, state in sorted(self._leases.items()):
            if state.deadline <= now:
                self._end_lease(lease)

    def _end_lease(self, lease: int) -> None:
        del self._leases[lease]
        keys = [k for k, kv in self._data.items() if kv.lease == lease]
        if keys:
            self.revision += 1
            for key in keys:
                del self._data[key]
                self._notify(key)

    def _refresh(self, lease: int) -> int:
        self._check()
        state = self._leases.get(lease)
        if state is None:
            return 0
        state.deadline = self._clock.monotonic() + state.ttl
        return state.ttl

    def _notify(self, key: bytes) -> None:
        for watch in list(self._watches):
            watch._changed(key)

    def _apply(self, ops: Sequence[Put | Delete]) -> None:
        """`ops` in one revision (none if nothing changed), as etcd applies a request."""
        keys = [op.key for op in ops]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate key given in txn request")
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise LeaseGone(f"lease {op.lease:x} is gone")
        rev = self.revision + 1
        changed: list[bytes] = []
        for op in ops:
            old = self._data.get(op.key)
            if isinstance(op, Put):
                self._data[op.key] = KeyValue(
                    op.key, bytes(op.value), old.create_revision if old else rev, rev,
                    old.version + 1 if old else 1, op.lease)
                changed.append(op.key)
            elif old is not None:
                del self._data[op.key]
                changed.append(op.key)
        if changed:
            self.revision = rev
            for key in changed:
                self._notify(key)

    # -- Kv ---------------------------------------------------------------------------------

    async def connect(self) -> None:
        self._check()

    async def close(self) -> None:
        for watch in list(self._watches):
            await watch.cancel()

    async def get(self, key: bytes) -> KeyValue | None:
        self._check()
        return self._data.get(key)

    async def get_prefix(self, prefix: bytes) -> list[KeyValue]:
        self._check()
        return [self._data[k] for k in sorted(self._data) if k.startswith(prefix)]

    async def put(self, key: bytes, value: bytes, *, lease: Lease | int | None = None) -> None:
        self._check()
        self._apply([Put(key, value, lease_id(lease))])

    async def delete(self, key: bytes) -> bool:
        self._check()
        existed = key in self._data
        self._apply([Delete(key)])
        return existed

    async def transaction(self, compare: Sequence[Compare], success: Sequence[Put | Delete],
                          failure: Sequence[Put | Delete] = ()) -> bool:
        while self._before_transaction:
            await self._before_transaction.pop(0)()
        self._check()
        ok = all(c.holds(self._data.get(c.key)) for c in compare)
        self._apply(success if ok else failure)
        return ok

    async def lease(self, ttl: int) -> Lease:
        self._check()
        lease, self._next_lease = self._next_lease, self._next_lease + 1
        self._leases[lease] = _LeaseState(ttl, self._clock.monotonic() + ttl)
        return FakeLease(self, lease)

    async def watch_prefix(self, prefix: bytes) -> FakeWatch:
        self._check()
        watch = FakeWatch(self, prefix)
        self._watches.append(watch)
        return watch


def fake_etcd(clock: FakeClock, prefix: str = "/sheep-test") -> tuple[EtcdCluster, FakeKv]:
    """An EtcdCluster over a new FakeKv, both timed by `clock`; and that FakeKv."""
    kv = FakeKv(clock)
    return EtcdCluster(EtcdTarget("fake-etcd", 2379, prefix), kv=kv, clock=clock), kv
