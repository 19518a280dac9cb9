"""A node's presence in the cluster: a leased key, joins and leaves as epoch bumps.

Joining puts this node's key and epoch N+1 in one transaction. A node that dies stops
refreshing its lease; etcd deletes its key, and every surviving node's reconciler races to
write the epoch without it (one wins, the rest see nothing left to do).
"""

from __future__ import annotations

import asyncio
import logging

from sheep.clock import SYSTEM, Clock

from . import kv as tx
from .etcd import EtcdCluster
from .kv import Lease
from .state import NodeInfo, dump

log = logging.getLogger(__name__)


class Membership:
    """`clock` times the lease: tests pass a fake one (sheep/clock.py)."""

    def __init__(self, etcd: EtcdCluster, me: NodeInfo, *, lease_ttl: int = 4,
                 clock: Clock = SYSTEM) -> None:
        self._etcd = etcd
        self.me = me
        self._ttl = max(2, lease_ttl)
        self._clock = clock
        self._lease: Lease | None = None
        self._refreshed = -float("inf")  # clock time of the last lease grant or refresh

    @property
    def fenced(self) -> bool:
        """True when the lease may have run out: etcd may already have given this node's
        place in the ring to others, so it must not acknowledge writes. Judged well before
        the TTL is up (a refresh is due every third of it)."""
        return self._clock.monotonic() - self._refreshed > self._ttl * 2 / 3

    async def join(self) -> None:
        self._lease = await self._etcd.lease(self._ttl)
        granted = self._clock.monotonic()
        key = self._etcd.target.node_key(self.me.node_id)
        lease = self._lease

        def members(live: list[NodeInfo]) -> list[NodeInfo]:
            return [n for n in live if n.node_id != self.me.node_id] + [self.me]

        await self._etcd.bump_epoch(
            members, extra_success=lambda: [tx.put(key, dump(self.me), lease=lease)]
        )
        self._refreshed = granted

    async def publish(self, me: NodeInfo) -> None:
        """Re-publish this node's record (e.g. with the gateway ports it now serves) on its
        lease, without an epoch bump: only fields outside NodeInfo's equality may change."""
        assert me == self.me, "publish() cannot change what the ring knows of a node"
        self.me = me
        if self._lease is not None:
            await self._etcd.kv.put(self._etcd.target.node_key(me.node_id), dump(me),
                                    lease=self._lease)

    async def leave(self) -> None:
        key = self._etcd.target.node_key(self.me.node_id)

        def members(live: list[NodeInfo]) -> list[NodeInfo]:
            return [n for n in live if n.node_id != self.me.node_id]

        await self._etcd.bump_epoch(members, extra_success=lambda: [tx.delete(key)])
        if self._lease is not None:
            try:
                await self._lease.revoke()
            except Exception as exc:  # the key is gone already; a stale lease just expires
                log.debug("lease revoke failed: %s", exc)
            self._lease = None

    async def keep_alive(self) -> None:
        """Refresh the lease forever; rejoin if it was lost (paused or partitioned node)."""
        while True:
            await self._clock.sleep(self._ttl / 3)
            try:
                asked = self._clock.monotonic()
                ttl = await self._lease.refresh() if self._lease is not None else 0
                if ttl <= 0:
                    log.warning("lease lost; rejoining the cluster")
                    await self.join()
                else:
                    self._refreshed = asked
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease refresh failed: %s", exc)

    async def reconcile(self) -> None:
        """Bump the epoch if the live nodes differ from the current epoch's members."""
        await self._etcd.bump_epoch(lambda live: live, only_if_changed=True)
