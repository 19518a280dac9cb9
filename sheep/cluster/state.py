"""The cluster's shared records as stored in etcd, and the keys they live under.

Pure data: JSON in and out, no client. Every node and every client derives its ring from
the same `EpochRecord`, so placement agrees wherever it is computed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from urllib.parse import urlsplit

from sheep.netaddr import host_port

from .ring import Ring, RingNode

DEFAULT_PREFIX = "/sheep"


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    host: str
    data_port: int
    control_port: int
    zone: str = ""
    vnodes: int = 0
    capacity: int = 0
    # Gateways this node serves (None: not served). Outside equality and hashing: they are
    # published after the node joined, and must not make its epoch membership look changed.
    nbd_port: int | None = field(default=None, compare=False)
    iscsi_port: int | None = field(default=None, compare=False)
    # its iSCSI portal admits only initiators that prove CHAP (dog vm must give QEMU some)
    iscsi_chap: bool = field(default=False, compare=False)
    # the TLS mode of its NBD gateway (require | allow | off; "": none, or a node from before
    # NBD spoke TLS): dog vm gives QEMU a certificate, and refuses to start without one where
    # the gateway requires TLS
    nbd_tls: str = field(default="", compare=False)

    @property
    def data_addr(self) -> tuple[str, int]:
        return (self.host, self.data_port)

    @property
    def control_addr(self) -> str:
        return host_port(self.host, self.control_port)

    def ring_node(self) -> RingNode:
        return RingNode(self.node_id, self.zone, self.vnodes)


@dataclass(frozen=True)
class ClusterConfig:
    cluster_id: str
    copies: int
    object_size: int
    created: float


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    time: float
    nodes: tuple[NodeInfo, ...] = field(default_factory=tuple)

    def ring(self) -> Ring:
        return Ring(n.ring_node() for n in self.nodes)

    @cached_property
    def _by_id(self) -> dict[str, NodeInfo]:
        return {n.node_id: n for n in self.nodes}

    def node(self, node_id: str) -> NodeInfo | None:
        return self._by_id.get(node_id)

    def same_members(self, nodes: list[NodeInfo] | tuple[NodeInfo, ...]) -> bool:
        return set(self.nodes) == set(nodes)


def dump(record: NodeInfo | ClusterConfig | EpochRecord) -> bytes:
    return json.dumps(asdict(record), sort_keys=True).encode()


_NODE_FIELDS = frozenset(f.name for f in fields(NodeInfo))


def _node(data: dict) -> NodeInfo:
    """Fields this version does not know are dropped, so records written by a newer node
    still load; fields it added since have defaults, so older records load too."""
    return NodeInfo(**{k: v for k, v in data.items() if k in _NODE_FIELDS})


def load_node(raw: bytes) -> NodeInfo:
    return _node(json.loads(raw))


def load_config(raw: bytes) -> ClusterConfig:
    return ClusterConfig(**json.loads(raw))


def load_epoch(raw: bytes) -> EpochRecord:
    data = json.loads(raw)
    nodes = tuple(sorted((_node(n) for n in data["nodes"]), key=lambda n: n.node_id))
    return EpochRecord(epoch=data["epoch"], time=data["time"], nodes=nodes)


@dataclass(frozen=True)
class EtcdTarget:
    """Where the cluster's coordination lives: an etcd endpoint and a key prefix.

    The URL's path selects the prefix, so several clusters (or tests) can share one etcd:
    `http://127.0.0.1:2379/mycluster`. `https://` is etcd over TLS: its clients must then
    have credentials for it (sheep/cluster/access.py); `http://` stays plain.
    """

    host: str
    port: int
    prefix: str = DEFAULT_PREFIX
    secure: bool = False  # https: TLS, and the credentials that go with it

    @classmethod
    def parse(cls, url: str) -> EtcdTarget:
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "etcd", "https"):
            raise ValueError(f"unsupported etcd URL scheme {parts.scheme!r} in {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"etcd URL {url!r} holds a user name or password: give them as "
                             f"--etcd-user and --etcd-password-file")
        if not parts.hostname:
            raise ValueError(f"etcd URL {url!r} has no host")
        prefix = parts.path.rstrip("/") or DEFAULT_PREFIX
        return cls(parts.hostname, parts.port or 2379, prefix, parts.scheme == "https")

    @property
    def url(self) -> str:
        """The endpoint without the prefix, as etcd's own tools take it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.secure else 'http'}://{host}:{self.port}"

    def key(self, *parts: str) -> bytes:
        return "/".join((self.prefix, *parts)).encode()

    @property
    def config_key(self) -> bytes:
        return self.key("config")

    @property
    def epoch_key(self) -> bytes:
        return self.key("epoch")

    @property
    def nodes_prefix(self) -> bytes:
        return self.key("nodes") + b"/"

    def node_key(self, node_id: str) -> bytes:
        return self.key("nodes", node_id)

    def epoch_log_key(self, epoch: int) -> bytes:
        return self.key("epochs", f"{epoch:010d}")

    @property
    def epoch_log_prefix(self) -> bytes:
        return self.key("epochs") + b"/"

    def recovered_key(self, epoch: int, node_id: str) -> bytes:
        """Present once `node_id` holds every object the ring of `epoch` places on it."""
        return self.key("recovered", f"{epoch:010d}", node_id)

    def recovered_prefix(self, epoch: int) -> bytes:
        return self.key("recovered", f"{epoch:010d}") + b"/"
