"""The one key-value interface the cluster's records live behind: etcd's, typed.

Membership, the VDI registry and the VM registry speak `Kv` and these plain types, never
an etcd client's own: `AetcdKv` (sheep/cluster/etcd.py) is the real one, over aetcd, and
tests put an in-memory one with a fake clock in its place (tests/fakes/kv.py), as LevelDB
puts a fake Env under its tables.

The semantics are etcd's v3 API:

- every change (a put, a delete that deleted something, a transaction that changed
  anything, the expiry or revoke of a lease that held keys) makes a new store revision;
  a key's `mod_revision` is the revision that last changed it, `create_revision` the one
  that created it, `version` the number of puts since it was created (0: no such key);
- a transaction applies its `success` operations if every comparison holds, else its
  `failure` operations, in one revision; on a missing key version, mod and create compare
  as 0, and a comparison of its value never holds;
- a key put on a lease is deleted when the lease is revoked or runs out (its holder
  stopped refreshing it for its TTL); a lease that is gone refreshes to a TTL <= 0, and
  putting a key on it fails with `LeaseGone`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from sheep.errors import ClusterError


class LeaseGone(ClusterError):
    """the lease was revoked or ran out"""


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0  # the id of the lease the key lives on; 0: none


# -- transactions --------------------------------------------------------------------------

Field = Literal["version", "mod", "create", "value"]
Op = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True)
class Compare:
    """One guard of a transaction: `field` of `key` `op` `operand`."""

    field: Field
    key: bytes
    op: Op
    operand: int | bytes

    def holds(self, kv: KeyValue | None) -> bool:
        """Whether it holds of `kv` (None: the key is absent), as etcd judges it."""
        if self.field == "value":
            if kv is None:
                return False
            actual: int | bytes = kv.value
        elif kv is None:
            actual = 0
        else:
            actual = {"version": kv.version, "mod": kv.mod_revision,
                      "create": kv.create_revision}[self.field]
        operand = self.operand
        if self.op == "==":
            return actual == operand
        if self.op == "!=":
            return actual != operand
        if self.op == "<":
            return actual < operand  # type: ignore[operator]
        return actual > operand  # type: ignore[operator]


class _Target:
    """`version(key) == 0`: the left side of a comparison."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, field: Field, key: bytes) -> None:
        self.field, self.key = field, key

    def __eq__(self, operand: object) -> Compare:  # type: ignore[override]
        return Compare(self.field, self.key, "==", operand)  # type: ignore[arg-type]

    def __ne__(self, operand: object) -> Compare:  # type: ignore[override]
        return Compare(self.field, self.key, "!=", operand)  # type: ignore[arg-type]

    def __lt__(self, operand: int | bytes) -> Compare:
        return Compare(self.field, self.key, "<", operand)

    def __gt__(self, operand: int | bytes) -> Compare:
        return Compare(self.field, self.key, ">", operand)


def version(key: bytes) -> _Target:
    """The key's version: 0 when it does not exist."""
    return _Target("version", key)


def mod(key: bytes) -> _Target:
    """The revision that last changed the key: 0 when it does not exist."""
    return _Target("mod", key)


def create(key: bytes) -> _Target:
    """The revision that created the key: 0 when it does not exist."""
    return _Target("create", key)


def value(key: bytes) -> _Target:
    """The key's value (a comparison with an absent key's value never holds)."""
    return _Target("value", key)


@dataclass(frozen=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0  # a lease id; 0: none


@dataclass(frozen=True)
class Delete:
    key: bytes


def put(key: bytes, value: bytes, *, lease: Lease | int | None = None) -> Put:
    """A transaction's put of `key`, on `lease` (a Lease or its id) if given."""
    return Put(key, value, lease_id(lease))


def delete(key: bytes) -> Delete:
    return Delete(key)


# -- leases, watches, the store ----------------------------------------------------------


class Lease(Protocol):
    """A lease granted for a TTL: the keys put on it live until it is revoked or runs out."""

    @property
    def id(self) -> int: ...

    async def refresh(self) -> int:
        """Start its TTL again; returns the TTL, <= 0 when the lease is gone already."""
        ...

    async def revoke(self) -> None:
        """End it now, deleting its keys; LeaseGone if it was gone already."""
        ...


def lease_id(lease: Lease | int | None) -> int:
    if lease is None:
        return 0
    return lease if isinstance(lease, int) else lease.id


class Watch(Protocol):
    """The keys changed under a prefix, one item per change, until cancelled."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def cancel(self) -> None: ...


class Kv(Protocol):
    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, key: bytes) -> KeyValue | None: ...

    async def get_prefix(self, prefix: bytes) -> list[KeyValue]:
        """Every key that starts with `prefix`, in key order."""
        ...

    async def put(self, key: bytes, value: bytes, *, lease: Lease | int | None = None) -> None:
        ...

    async def delete(self, key: bytes) -> bool:
        """Whether there was such a key."""
        ...

    async def transaction(self, compare: Sequence[Compare], success: Sequence[Put | Delete],
                          failure: Sequence[Put | Delete] = ()) -> bool:
        """Whether every comparison held (and `success` ran, else `failure`)."""
        ...

    async def lease(self, ttl: int) -> Lease:
        """A new lease of at least `ttl` seconds."""
        ...

    async def watch_prefix(self, prefix: bytes) -> Watch: ...
