"""Placement on the consistent-hash ring: balance, weights, movement, zones, determinism.

Balance is measured over 1M object ids per ring. Calling place() 1M times per ring would take
seconds each, so the bulk tests count primaries arc by arc instead: the object hashes are
sorted once, and each vnode's arc count is two bisects. test_bulk_count_agrees_with_primary
checks that shortcut against Ring.primary itself.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from sheep.cluster.ring import DEFAULT_VNODES, Ring, RingNode, vnodes_for_weight
from sheep.oid import data_oid

N_OBJECTS = 1_000_000
TRIALS = 5


def oid_hash(oid: int) -> int:
    return xxhash.xxh64_intdigest(oid.to_bytes(8, "little"))


def object_ids(n: int) -> list[int]:
    # Realistic ids: consecutive object indices of a few VDIs, i.e. ids that differ in few bits.
    per_vdi = 250_000
    return [data_oid(1 + i // per_vdi, i % per_vdi) for i in range(n)]


def random_nodes(rng: random.Random, n: int, **kwargs: object) -> list[RingNode]:
    return [RingNode(f"{rng.getrandbits(128):032x}", **kwargs) for _ in range(n)]


def vnode_points(nodes: Sequence[RingNode]) -> list[tuple[int, str]]:
    return sorted(
        (xxhash.xxh64_intdigest(f"{n.node_id}:{i}".encode()), n.node_id)
        for n in nodes
        for i in range(n.vnodes)
    )


def primary_counts(nodes: Sequence[RingNode], sorted_hashes: Sequence[int]) -> Counter[str]:
    """Objects per primary: an object belongs to the first vnode at or after its hash."""
    points = vnode_points(nodes)
    counts: Counter[str] = Counter()
    below = 0
    for pos, node_id in points:
        upto = bisect_right(sorted_hashes, pos)
        counts[node_id] += upto - below
        below = upto
    counts[points[0][1]] += len(sorted_hashes) - below  # wrap-around arc
    return counts


def deviations(counts: Counter[str], fair: float) -> dict[str, float]:
    return {node_id: c / fair - 1 for node_id, c in counts.items()}


def zone_of(node: RingNode) -> tuple[bool, str]:
    return (True, node.zone) if node.zone else (False, node.node_id)


def reference_place(nodes: Sequence[RingNode], oid: int, copies: int) -> list[str]:
    """Straight from the spec: walk the whole circle, zones first, then fill-ins."""
    if not nodes or copies <= 0:
        return []
    points = vnode_points(sorted(nodes, key=lambda n: n.node_id))
    h = oid_hash(oid)
    start = next((i for i, (pos, _) in enumerate(points) if pos >= h), 0)
    by_id = {n.node_id: n for n in nodes}
    order: list[str] = []
    for pos_node in points[start:] + points[:start]:
        if pos_node[1] not in order:
            order.append(pos_node[1])
    first, rest, used = [], [], set()
    for node_id in order:
        zone = zone_of(by_id[node_id])
        if zone in used:
            rest.append(node_id)
        else:
            first.append(node_id)
            used.add(zone)
    return (first + rest)[:copies]


def ids(nodes: Sequence[RingNode]) -> list[str]:
    return [n.node_id for n in nodes]


@pytest.fixture(scope="module")
def sorted_hashes() -> list[int]:
    return sorted(oid_hash(oid) for oid in object_ids(N_OBJECTS))


@pytest.fixture(scope="module")
def sample_oids() -> list[int]:
    rng = random.Random(7)
    return [rng.getrandbits(64) for _ in range(100_000)]


# --- balance and weights --------------------------------------------------------------------


def test_bulk_count_agrees_with_primary() -> None:
    nodes = random_nodes(random.Random(99), 5, vnodes=64)
    ring = Ring(nodes)
    oids = object_ids(20_000)
    expected = Counter(ring.primary(oid).node_id for oid in oids)
    assert primary_counts(nodes, sorted(oid_hash(oid) for oid in oids)) == expected


@pytest.mark.parametrize("n_nodes", [3, 10])
def test_equal_nodes_get_fair_share_within_10_percent(
    n_nodes: int, sorted_hashes: list[int]
) -> None:
    rng = random.Random(n_nodes)
    fair = len(sorted_hashes) / n_nodes
    for trial in range(TRIALS):
        nodes = random_nodes(rng, n_nodes)
        dev = deviations(primary_counts(nodes, sorted_hashes), fair)
        worst = max(dev.values(), key=abs)
        assert len(dev) == n_nodes
        assert abs(worst) <= 0.10, f"trial {trial}: worst deviation {worst:+.3f}"


def test_double_weight_node_gets_twice_the_share(sorted_hashes: list[int]) -> None:
    rng = random.Random(2)
    for trial in range(TRIALS):
        light = random_nodes(rng, 9)
        heavy = RingNode(f"{rng.getrandbits(128):032x}", vnodes=vnodes_for_weight(2.0))
        counts = primary_counts([*light, heavy], sorted_hashes)
        mean_light = sum(counts[n.node_id] for n in light) / len(light)
        ratio = counts[heavy.node_id] / mean_light
        assert abs(ratio / 2.0 - 1) <= 0.15, f"trial {trial}: heavy/light = {ratio:.3f}"


def test_vnodes_for_weight_scales_base_and_never_drops_to_zero() -> None:
    assert vnodes_for_weight(1.0) == DEFAULT_VNODES
    assert vnodes_for_weight(2.0) == 2 * DEFAULT_VNODES
    assert vnodes_for_weight(0.5, base=100) == 50
    assert vnodes_for_weight(0.0) == 1
    assert vnodes_for_weight(1e-9) == 1


def test_default_vnodes_is_a_power_of_two() -> None:
    assert DEFAULT_VNODES > 0
    assert DEFAULT_VNODES & (DEFAULT_VNODES - 1) == 0
    assert RingNode("x").vnodes == DEFAULT_VNODES


# --- membership changes ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_adding_a_node_moves_few_primaries_and_only_to_it(
    seed: int, sample_oids: list[int]
) -> None:
    rng = random.Random(seed)
    old_nodes = random_nodes(rng, 10)
    new_node = random_nodes(rng, 1)[0]
    old, new = Ring(old_nodes), Ring([*old_nodes, new_node])
    moved = [oid for oid in sample_oids if old.primary(oid) != new.primary(oid)]
    assert len(moved) <= 1.5 / 11 * len(sample_oids)
    assert all(new.primary(oid) == new_node for oid in moved)


@pytest.mark.parametrize("seed", [1, 2])
def test_adding_a_node_changes_few_replica_sets_by_one_member(
    seed: int, sample_oids: list[int]
) -> None:
    rng = random.Random(seed)
    old_nodes = random_nodes(rng, 10)
    new_node = random_nodes(rng, 1)[0]
    old, new = Ring(old_nodes), Ring([*old_nodes, new_node])
    changed = 0
    for oid in sample_oids:
        before, after = set(old.place(oid, 3)), set(new.place(oid, 3))
        if before != after:
            changed += 1
            assert after - before == {new_node}
            assert len(before - after) == 1
    # The new node should hold a replica of about 3/11 of the objects.
    assert changed <= 1.5 * 3 / 11 * len(sample_oids)


def test_removing_a_node_changes_only_the_replica_sets_it_was_in(
    sample_oids: list[int],
) -> None:
    nodes = random_nodes(random.Random(3), 10)
    gone = nodes[4]
    old, new = Ring(nodes), Ring(nodes[:4] + nodes[5:])
    for oid in sample_oids[:20_000]:
        before, after = old.place(oid, 3), new.place(oid, 3)
        if gone in before:
            assert set(before) - {gone} < set(after)
        else:
            assert after == before


# --- zones ----------------------------------------------------------------------------------


def zoned_nodes(n_zones: int, per_zone: int, seed: int = 5) -> list[RingNode]:
    rng = random.Random(seed)
    return [
        RingNode(f"{rng.getrandbits(128):032x}", zone=f"rack{z}")
        for z in range(n_zones)
        for _ in range(per_zone)
    ]


@pytest.mark.parametrize("copies", [2, 3])
def test_replicas_land_in_distinct_zones(copies: int, sample_oids: list[int]) -> None:
    ring = Ring(zoned_nodes(3, 2))
    for oid in sample_oids[:20_000]:
        placed = ring.place(oid, copies)
        assert len({n.zone for n in placed}) == copies


def test_fewer_zones_than_copies_still_gives_distinct_nodes_across_all_zones(
    sample_oids: list[int],
) -> None:
    ring = Ring(zoned_nodes(2, 3))
    for oid in sample_oids[:20_000]:
        placed = ring.place(oid, 3)
        assert len(set(placed)) == 3
        assert {n.zone for n in placed} == {"rack0", "rack1"}


def test_single_zone_degrades_to_distinct_nodes(sample_oids: list[int]) -> None:
    ring = Ring(zoned_nodes(1, 4))
    for oid in sample_oids[:5_000]:
        assert len(set(ring.place(oid, 3))) == 3


def test_node_without_zone_is_its_own_zone(sample_oids: list[int]) -> None:
    a, b = RingNode("a", zone="r1"), RingNode("b", zone="r1")
    ring = Ring([a, b, RingNode("c"), RingNode("d")])
    for oid in sample_oids[:5_000]:
        placed = ring.place(oid, 3)
        assert len(placed) == 3
        assert not {a, b} <= set(placed)


def test_zone_named_like_a_node_id_is_a_different_zone() -> None:
    # Were node "x" (no zone) and zone "x" merged, "x" and "y" could never be paired.
    x, y = RingNode("x", vnodes=8), RingNode("y", zone="x", vnodes=8)
    ring = Ring([x, y, RingNode("z", zone="q", vnodes=8)])
    assert any(set(ring.place(oid, 2)) == {x, y} for oid in range(200))


# --- contract -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(["", "z1", "z2", "z3"]), st.integers(1, 6)),
        max_size=7,
    ),
    oid=st.integers(0, 2**64 - 1),
    copies=st.integers(0, 9),
)
def test_place_matches_reference_walk(specs: list[tuple[str, int]], oid: int, copies: int) -> None:
    nodes = [RingNode(f"n{i}", zone=zone, vnodes=v) for i, (zone, v) in enumerate(specs)]
    assert ids(Ring(nodes).place(oid, copies)) == reference_place(nodes, oid, copies)


def test_place_returns_distinct_nodes(sample_oids: list[int]) -> None:
    ring = Ring(random_nodes(random.Random(8), 5))
    for oid in sample_oids[:10_000]:
        placed = ring.place(oid, 4)
        assert len(placed) == len(set(placed)) == 4


def test_smaller_copies_is_a_prefix_of_larger_copies(sample_oids: list[int]) -> None:
    # Raising a VDI's copies adds replicas without moving the existing ones.
    ring = Ring([*zoned_nodes(2, 2), *random_nodes(random.Random(4), 2)])
    for oid in sample_oids[:5_000]:
        full = ring.place(oid, 6)
        assert ring.primary(oid) == full[0]
        for copies in range(1, 6):
            assert ring.place(oid, copies) == full[:copies]


def test_placement_does_not_depend_on_construction_order(sample_oids: list[int]) -> None:
    rng = random.Random(6)
    nodes = [*random_nodes(rng, 4), *zoned_nodes(2, 2, seed=11)]
    shuffled = nodes[:]
    rng.shuffle(shuffled)
    a, b = Ring(nodes), Ring(reversed(shuffled))
    assert a.nodes == b.nodes == tuple(sorted(nodes, key=lambda n: n.node_id))
    for oid in sample_oids[:5_000]:
        assert a.place(oid, 3) == b.place(oid, 3)


def test_copies_beyond_node_count_returns_every_node() -> None:
    nodes = random_nodes(random.Random(9), 3, vnodes=16)
    ring = Ring(nodes)
    for oid in range(100):
        placed = ring.place(oid, 5)
        assert len(placed) == 3
        assert set(placed) == set(nodes)


def test_empty_ring_places_nothing_and_has_no_primary() -> None:
    ring = Ring([])
    assert len(ring) == 0
    assert ring.place(123, 3) == []
    with pytest.raises(LookupError):
        ring.primary(123)


def test_zero_copies_places_nothing() -> None:
    assert Ring([RingNode("a", vnodes=4)]).place(1, 0) == []


def test_len_and_membership_by_node_id() -> None:
    ring = Ring([RingNode("a", vnodes=4), RingNode("b", vnodes=4)])
    assert len(ring) == 2
    assert "a" in ring
    assert "c" not in ring


def test_duplicate_node_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Ring([RingNode("a", vnodes=4), RingNode("a", zone="r2", vnodes=4)])


def test_node_needs_at_least_one_vnode() -> None:
    with pytest.raises(ValueError, match="vnodes"):
        RingNode("a", vnodes=0)
