"""Fixtures that build real clusters: one etcd per test session, a cluster per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.etcd_server import EtcdServer

from .cluster import Cluster, SecureCluster, free_port, start_cluster, start_secure_cluster


@pytest.fixture(autouse=True, scope="session")
def dog_without_a_config() -> Iterator[None]:
    """The tests' dogs talk to the clusters they are pointed at (-a), never to a `make run`
    cluster whose ./var/dog.conf happens to lie in the working directory; tests of secure
    clusters name their config."""
    before = os.environ.get("SHEEP_CONFIG")
    os.environ["SHEEP_CONFIG"] = "none"
    yield
    if before is None:
        os.environ.pop("SHEEP_CONFIG", None)
    else:
        os.environ["SHEEP_CONFIG"] = before


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    root = tmp_path_factory.mktemp("etcd")
    server = EtcdServer(root / "data", free_port(), free_port(), root / "etcd.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path: Path, etcd: EtcdServer) -> Iterator[Cluster]:
    """A formatted 3-node cluster with copies=3."""
    c = start_cluster(tmp_path / "cluster", etcd.url, nodes=3, copies=3)
    yield c
    c.stop()


@pytest.fixture
def nbd_cluster(tmp_path: Path, etcd: EtcdServer) -> Iterator[Cluster]:
    """A formatted 3-node cluster, copies=3, whose node 0 is an NBD gateway."""
    c = start_cluster(tmp_path / "cluster", etcd.url, nodes=3, copies=3, nbd=True)
    yield c
    c.stop()


@pytest.fixture
def iscsi_cluster(tmp_path: Path, etcd: EtcdServer) -> Iterator[Cluster]:
    """A formatted 3-node cluster, copies=3, whose node 0 is an NBD and iSCSI gateway."""
    c = start_cluster(tmp_path / "cluster", etcd.url, nodes=3, copies=3, nbd=True, iscsi=True)
    yield c
    c.stop()


@pytest.fixture
def empty_cluster(tmp_path: Path, etcd: EtcdServer) -> Iterator[Cluster]:
    """No nodes yet: the test adds and formats what it needs."""
    c = Cluster(tmp_path / "cluster", etcd.url)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    """A formatted 3-node cluster, copies=3, with a private etcd, whose nodes hold
    certificates of its own CA (`secure_cluster.pki`), node 0 an NBD gateway. One per
    module: it takes a while to start."""
    c = start_secure_cluster(tmp_path_factory.mktemp("secure"))
    yield c
    c.stop()
