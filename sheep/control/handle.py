"""What the control service needs of a storage node, as plain data. The node implements
NodeHandle; the service turns what it returns into protobuf, so the node never builds a
message and the control package never imports the node (the node starts the service)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sheep.cluster.etcd import EtcdCluster
from sheep.cluster.state import NodeInfo
from sheep.cluster.view import ClusterView
from sheep.objclient import ObjectClient
from sheep.security.identity import Identity


@dataclass(frozen=True)
class RecoveryStatus:
    epoch: int = 0
    state: str = "idle"  # idle | listing | recovering | waiting | done | failed
    done: int = 0
    total: int = 0
    rate: float = 0.0  # objects per second
    throttle: int = 0  # bytes per second, 0: unbounded
    lost: int = 0  # blocks that verified on no source this epoch: reads of them fail


@dataclass(frozen=True)
class ScrubStatus:
    state: str = "idle"  # idle | listing | checking
    passes: int = 0
    done: int = 0
    total: int = 0
    bad_blocks: int = 0
    repaired: int = 0
    started: float = 0.0
    finished: float = 0.0
    interval: float = 0.0
    blocks_repaired: int = 0
    blocks_accepted: int = 0
    diverged: int = 0
    reconciled: int = 0
    blocks_lost: int = 0  # bad on every replica and not torn, found since the node started


@dataclass(frozen=True)
class NodeStatus:
    node: NodeInfo
    used: int  # bytes the node's objects take on disk
    free: int  # bytes free on its data dir's filesystem
    objects: int
    epoch: int
    recovery: RecoveryStatus
    scrub: ScrubStatus
    filesystem: str  # host:st_dev of the data dir: nodes sharing one count it once
    space: str = "ok"  # ok | nearfull | full
    space_used: float = 0.0  # share of the data dir's filesystem in use


class NodeHandle(Protocol):
    etcd: EtcdCluster
    view: ClusterView
    info: NodeInfo
    etcd_url: str  # as the node was given it: what dog connects its own clients to
    identity: Identity | None  # its certificate: how it dials its peers' control services
    client: ObjectClient  # the node as a client of its cluster (the VMs it hosts use it)

    def status(self) -> NodeStatus: ...

    def set_recovery_throttle(self, bytes_per_second: int) -> None: ...

    def start_scrub(self) -> None: ...
