"""Where `dog vm start --on any` puts a VM: the live node hosting the fewest running VMs."""

from __future__ import annotations

import pytest

from qemu_driver.remote import NoSuchNode, least_loaded
from qemu_driver.spec import Gateway, VmRuntime
from sheep.cluster.state import NodeInfo


def node(node_id: str) -> NodeInfo:
    return NodeInfo(node_id=node_id, host="127.0.0.1", data_port=1, control_port=2)


def hosted_on(node_id: str, name: str) -> VmRuntime:
    return VmRuntime(name, "h", 10, 9, "/r", "/r/q", "/r/c", "/r/c.log", "/r/a", "tcg",
                     Gateway("nbd", "127.0.0.1", 10809), node=node_id)


def test_the_node_hosting_the_fewest_vms_gets_the_next_one() -> None:
    nodes = [node("a"), node("b"), node("c")]
    running = [hosted_on("a", "1"), hosted_on("b", "2"), hosted_on("a", "3")]
    assert least_loaded(nodes, running).node_id == "c"


def test_among_equals_the_node_dog_talks_to_wins_then_the_lowest_id() -> None:
    nodes = [node("a"), node("b")]
    assert least_loaded(nodes, [], prefer="b").node_id == "b"
    assert least_loaded(nodes, []).node_id == "a"


def test_vms_of_dog_hosts_and_of_nodes_gone_count_for_no_node() -> None:
    nodes = [node("a"), node("b")]
    running = [hosted_on("", "mine"), hosted_on("gone", "x"), hosted_on("b", "y")]
    assert least_loaded(nodes, running, prefer="b").node_id == "a"


def test_no_live_node_is_a_clear_error() -> None:
    with pytest.raises(NoSuchNode, match="no node is up"):
        least_loaded([], [])
