"""Which node restarts an HA VM (qemu_driver/ha.py), the same answer on every node, and
whose gateway holds a VDI lock."""

from __future__ import annotations

from qemu_driver.ha import lock_node, ranked
from qemu_driver.spec import Gateway, VmRuntime
from sheep.cluster.state import NodeInfo
from sheep.node.daemon import gateway_holder


def node(node_id: str) -> NodeInfo:
    return NodeInfo(node_id=node_id, host="127.0.0.1", data_port=1, control_port=2)


def running_on(node_id: str) -> VmRuntime:
    return VmRuntime(name=f"vm-{node_id}", host="h", pid=1, supervisor=2, run_dir="/r",
                     qmp="q", console="c", console_log="l", agent="a", accel="tcg",
                     gateway=Gateway("nbd", "127.0.0.1", 1), node=node_id)


def test_the_node_hosting_the_fewest_vms_restarts_first() -> None:
    nodes = [node("aa"), node("bb"), node("cc")]
    order = ranked(nodes, [running_on("aa"), running_on("aa"), running_on("cc")], last="")
    assert [n.node_id for n in order] == ["bb", "cc", "aa"]


def test_equals_are_ranked_by_id_whatever_order_the_nodes_came_in() -> None:
    nodes = [node("cc"), node("aa"), node("bb")]
    assert [n.node_id for n in ranked(nodes, [], last="")] == ["aa", "bb", "cc"]


def test_the_node_that_lost_the_vm_comes_last() -> None:
    nodes = [node("aa"), node("bb")]
    assert [n.node_id for n in ranked(nodes, [running_on("bb")], last="aa")] == ["bb", "aa"]


def test_a_gateways_lock_names_its_node() -> None:
    assert lock_node(gateway_holder("0123456789abcdef")) == "01234567"


def test_a_lock_not_held_by_a_gateway_names_no_node() -> None:
    assert lock_node("dog vdi write") is None
