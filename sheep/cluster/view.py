"""A process's picture of the cluster: config, current epoch, and the ring it implies.

Nodes and clients keep one each, fed from etcd. Waiters can block until the epoch moves,
which is what a request refused with OLD/NEW_EPOCH needs before it retries.
"""

from __future__ import annotations

import asyncio
import logging

from sheep.clock import SYSTEM, Clock
from sheep.errors import NotFormatted

from .etcd import EtcdCluster
from .ring import Ring
from .state import ClusterConfig, EpochRecord, NodeInfo

log = logging.getLogger(__name__)


class ClusterView:
    def __init__(self) -> None:
        self.config: ClusterConfig | None = None
        self.record: EpochRecord | None = None
        self.ring: Ring = Ring(())
        self._changed = asyncio.Condition()
        self._listeners: list = []

    @property
    def epoch(self) -> int:
        return self.record.epoch if self.record is not None else 0

    @property
    def formatted(self) -> bool:
        return self.config is not None

    def placement(self, oid: int) -> list[NodeInfo]:
        """The nodes holding `oid`'s replicas in the current epoch, primary first."""
        record, config = self.record, self.config
        if record is None or config is None:
            raise NotFormatted("the cluster is not formatted")
        return [n for r in self.ring.replicas(oid, config.copies)
                if (n := record.node(r.node_id)) is not None]

    def add_listener(self, callback) -> None:
        self._listeners.append(callback)

    async def update(self, config: ClusterConfig | None, record: EpochRecord | None) -> None:
        moved = record is not None and (self.record is None or record.epoch != self.record.epoch)
        if config is not None:
            self.config = config
        if moved:
            self.record = record
            self.ring = record.ring()
        if moved or config is not None:
            for callback in self._listeners:
                callback(self)
            async with self._changed:
                self._changed.notify_all()

    async def wait_for_change(self, than_epoch: int, timeout: float, *,
                              clock: Clock = SYSTEM) -> bool:
        """Wait until the epoch differs from `than_epoch`; False once `timeout` seconds
        passed on `clock`."""
        async with self._changed:
            try:
                async with clock.timeout(timeout):  # not wait_for: see EtcdCluster.watch
                    await self._changed.wait_for(lambda: self.epoch != than_epoch)
            except TimeoutError:
                return False
        return True

    async def refresh(self, etcd: EtcdCluster) -> None:
        config = await etcd.config()
        record, _ = await etcd.epoch()
        await self.update(config, record)


async def follow(view: ClusterView, etcd: EtcdCluster) -> None:
    """Keep `view` current with etcd until cancelled."""

    async def on_change() -> None:
        await view.refresh(etcd)

    await etcd.watch(on_change)
