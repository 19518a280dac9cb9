"""Which nodes hold an object: the one rule every caller (client, recovery, repair) uses.
A VDI's objects carry their copy count in the oid; others take the cluster's default."""

from __future__ import annotations

import pytest

from sheep.cluster.state import ClusterConfig, EpochRecord, NodeInfo
from sheep.cluster.view import ClusterView
from sheep.errors import NotFormatted
from sheep.oid import data_oid

NODES = tuple(NodeInfo(f"{i:032x}", "127.0.0.1", 7000 + i, 8000 + i, vnodes=64)
              for i in range(1, 6))


async def formatted_view(copies: int = 3) -> ClusterView:
    view = ClusterView()
    await view.update(ClusterConfig("c", copies, 4 << 20, 0.0), EpochRecord(1, 0.0, NODES))
    return view


async def test_placement_is_the_rings_replicas_as_node_infos_primary_first() -> None:
    view = await formatted_view()
    oid = data_oid(7, 3)
    placed = view.placement(oid)
    assert [n.node_id for n in placed] == [r.node_id for r in view.ring.place(oid, 3)]
    assert all(isinstance(n, NodeInfo) for n in placed)


async def test_an_oid_with_its_own_copy_count_overrides_the_clusters_default() -> None:
    view = await formatted_view(copies=3)
    assert len(view.placement(data_oid(7, 3, copies=2))) == 2
    assert len(view.placement(data_oid(7, 3))) == 3


async def test_places_on_agrees_with_placement_for_every_node() -> None:
    view = await formatted_view()
    for index in range(50):
        oid = data_oid(9, index)
        holders = {n.node_id for n in view.placement(oid)}
        assert {n.node_id for n in NODES if view.ring.places_on(oid, 3, n.node_id)} == holders


async def test_placement_before_format_is_a_typed_error() -> None:
    with pytest.raises(NotFormatted):
        ClusterView().placement(data_oid(1, 0))
