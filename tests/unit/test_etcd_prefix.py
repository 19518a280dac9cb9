"""Clusters sharing one etcd each keep to their own key prefix: one nested inside another's
keys was accepted, and its node and VDI keys then broke the outer cluster's registry."""

from __future__ import annotations

import pytest

from sheep.cluster.etcd import EtcdCluster
from sheep.cluster.state import EtcdTarget
from sheep.errors import InvalidParams

from ..fakes.clock import FakeClock
from ..fakes.kv import FakeKv


def cluster(kv: FakeKv, prefix: str) -> EtcdCluster:
    return EtcdCluster(EtcdTarget("fake-etcd", 2379, prefix), kv=kv)


@pytest.fixture
def kv() -> FakeKv:
    return FakeKv(FakeClock())


async def test_a_prefix_inside_a_formatted_clusters_keys_is_refused_at_connect(
        kv: FakeKv) -> None:
    outer = cluster(kv, "/a")
    await outer.connect()
    await outer.format(1, 4 << 20)
    inner = cluster(kv, "/a/vdi/ids")
    with pytest.raises(InvalidParams, match="lies inside the keys of the cluster at /a"):
        await inner.connect()


async def test_formatting_over_another_clusters_keys_is_refused(kv: FakeKv) -> None:
    inner = cluster(kv, "/a/b")
    await inner.connect()
    await inner.format(1, 4 << 20)
    outer = cluster(kv, "/a")
    await outer.connect()  # nothing formatted above /a: connecting is fine
    with pytest.raises(InvalidParams, match="holds the keys of the cluster at /a/b"):
        await outer.format(1, 4 << 20)
    assert await outer.config() is None


async def test_clusters_side_by_side_share_an_etcd(kv: FakeKv) -> None:
    for prefix in ("/a", "/ab", "/a-2"):
        c = cluster(kv, prefix)
        await c.connect()
        await c.format(1, 4 << 20)
        assert (await c.config()) is not None
