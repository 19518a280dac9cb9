"""Fencing tokens of VDI write locks, as one storage node knows them: the pure core.

A VDI's writer holds its lock with a token, the etcd revision that created the lock key,
so a later holder's token is always larger. A node keeps, per VDI id, the highest token it
knows, from three sources: the writes it took, FENCE requests (a new holder announces
itself to every node before its first write) and the fence records in etcd (read at start
before any write is served, then watched). A mutation that carries a lower token than
that is refused with StaleLock: its writer lost the lock (paused or cut off past its lease)
and someone else may be writing now.

Token 0 means "no lock" and is always taken; it never raises the floor. The writers that
send it do not race a holder by the registry's rules: recovery and repair copy replicas
that holders wrote; create, clone, rollback and snapshot write objects of VDI ids no
holder knows yet; reclaim and gc remove objects of deleted VDIs. Every write of a lock
holder (the gateways' volumes, and every admin operation that takes the lock) carries its
token, so a client's write is never unfenced.
"""

from __future__ import annotations

from sheep.errors import StaleLock
from sheep.oid import INDEX_BITS, MAX_VDI_ID


class Fences:
    """The highest token known per VDI id; `admit` is on the write path: one dict lookup."""

    __slots__ = ("_floors",)

    def __init__(self) -> None:
        self._floors: dict[int, int] = {}

    def floor(self, vdi_id: int) -> int:
        """The lowest token a mutation of `vdi_id` may carry (0: none known)."""
        return self._floors.get(vdi_id, 0)

    def raise_to(self, vdi_id: int, token: int) -> None:
        """A holder with `token` exists: refuse any lower one from now on. Floors never
        go down (a FENCE or an etcd event arriving late changes nothing)."""
        if token > self._floors.get(vdi_id, 0):
            self._floors[vdi_id] = token

    def admit(self, oid: int, token: int) -> None:
        """Take or refuse a mutation of `oid` by a writer holding `token`."""
        if not token:
            return
        vdi_id = (oid >> INDEX_BITS) & MAX_VDI_ID
        floor = self._floors.get(vdi_id, 0)
        if token < floor:
            raise StaleLock(f"VDI id {vdi_id}: the writer's lock (token {token}) was taken "
                            f"over by a newer holder (token {floor})")
        if token > floor:
            self._floors[vdi_id] = token
