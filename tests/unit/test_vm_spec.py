"""VM definitions and runtime records: validation, and JSON that round-trips."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from qemu_driver.control import VmStatus
from qemu_driver.errors import NoGateway
from qemu_driver.gateways import choose_gateway
from qemu_driver.spec import Gateway, VmExit, VmRuntime, VmSpec
from sheep.cluster.state import NodeInfo, dump, load_node
from sheep.errors import InvalidParams


def test_a_spec_round_trips_through_json() -> None:
    spec = VmSpec("web", ("root", "data"), memory=512, cpus=2, transport="iscsi",
                  kernel="/k", initrd="/i", append="quiet", created=1.5)
    assert VmSpec.load(spec.dump()) == spec


def test_a_spec_from_a_newer_version_still_loads() -> None:
    data = json.loads(VmSpec("web", ("root",)).dump())
    data["future_field"] = 1
    assert VmSpec.load(json.dumps(data).encode()).name == "web"


def test_a_runtime_round_trips_with_its_gateway() -> None:
    rt = VmRuntime("web", "h", 10, 9, "/r", "/r/q", "/r/c", "/r/c.log", "/r/a", "tcg",
                   Gateway("nbd", "127.0.0.1", 10809), ("root",), 3.0, 77)
    assert VmRuntime.load(rt.dump()) == rt


def test_a_runtime_names_the_node_hosting_it_and_one_from_before_names_none() -> None:
    rt = VmRuntime("web", "h", 10, 9, "/r", "/r/q", "/r/c", "/r/c.log", "/r/a", "tcg",
                   Gateway("nbd", "127.0.0.1", 10809), node="n1")
    assert VmRuntime.load(rt.dump()).node == "n1"
    data = json.loads(rt.dump())
    del data["node"]
    assert VmRuntime.load(json.dumps(data).encode()).node == ""


@pytest.mark.parametrize("running", [True, False])
def test_a_status_round_trips_as_the_hosting_node_sends_it(running: bool) -> None:
    spec = VmSpec("web", ("root",), kernel="/k")
    rt = VmRuntime("web", "h", 10, 9, "/r", "/r/q", "/r/c", "/r/c.log", "/r/a", "tcg",
                   Gateway("nbd", "127.0.0.1", 10809), ("root",), node="n1")
    status = (VmStatus(spec, rt, "paused", [{"qdev": "vd1"}], [{"node-name": "vd1"}], True)
              if running else
              VmStatus(spec, None, "crashed", [],
                       last_exit=VmExit("crashed", "panic", -9, node="n1")))
    assert VmStatus.load(status.dump()) == status


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "bad name"}, "VM name"),
    ({"name": "-x"}, "VM name"),
    ({"disks": ()}, "at least one disk"),
    ({"disks": ("a", "a")}, "only once"),
    ({"disks": ("a@b",)}, "VDI name"),
    ({"transport": "fc"}, "transport"),
    ({"memory": 8}, "too small"),
    ({"cpus": 0}, "cpus"),
    ({"initrd": "/i"}, "need --kernel"),
])
def test_an_invalid_spec_is_refused_with_the_reason(kwargs: dict, message: str) -> None:
    args = {"name": "web", "disks": ("root",), **kwargs}
    with pytest.raises(InvalidParams, match=message):  # BadSpec, or the VDI layer's own
        VmSpec(**args)


def _node(node_id: str, host: str, nbd: int | None = None, iscsi: int | None = None
          ) -> NodeInfo:
    return NodeInfo(node_id, host, 7100, 7000, nbd_port=nbd, iscsi_port=iscsi)


def test_gateway_ports_do_not_change_a_nodes_identity_in_the_ring() -> None:
    plain = _node("a", "10.0.0.1")
    serving = _node("a", "10.0.0.1", nbd=10809)
    assert plain == serving and hash(plain) == hash(serving)
    assert load_node(dump(serving)).nbd_port == 10809


def test_a_node_record_without_gateway_ports_still_loads() -> None:
    old = b'{"node_id": "a", "host": "h", "data_port": 1, "control_port": 2}'
    assert load_node(old).nbd_port is None and load_node(old).iscsi_port is None


def test_the_gateway_is_a_node_serving_the_transport_on_this_host_first() -> None:
    nodes = [_node("a", "10.0.0.1", nbd=1, iscsi=2), _node("b", "10.0.0.2", nbd=3),
             _node("c", "10.0.0.3")]
    assert choose_gateway(nodes, "nbd", local={"10.0.0.2"}) == Gateway("nbd", "10.0.0.2", 3)
    assert choose_gateway(nodes, "nbd", local=set()) == Gateway("nbd", "10.0.0.1", 1)
    assert choose_gateway(nodes, "iscsi", local={"10.0.0.2"}) == Gateway("iscsi", "10.0.0.1", 2)


def test_the_gateway_of_the_node_hosting_the_vm_comes_first() -> None:
    nodes = [_node("a", "10.0.0.1", nbd=1), _node("b", "10.0.0.2", nbd=3), _node("c", "h")]
    assert choose_gateway(nodes, "nbd", local={"10.0.0.1"}, prefer="b") == \
        Gateway("nbd", "10.0.0.2", 3)
    # a hosting node without that gateway: the usual order
    assert choose_gateway(nodes, "nbd", local={"10.0.0.1"}, prefer="c") == \
        Gateway("nbd", "10.0.0.1", 1)


def test_no_node_serving_the_transport_is_a_clear_error() -> None:
    with pytest.raises(NoGateway, match="no node serves iscsi"):
        choose_gateway([_node("a", "h", nbd=1)], "iscsi", local=set())



def test_a_portal_requiring_chap_says_so_in_the_gateway_chosen() -> None:
    node = replace(_node("a", "10.0.0.1", nbd=1, iscsi=2), iscsi_chap=True)
    assert choose_gateway([node], "iscsi", local=set()).chap_required
    assert not choose_gateway([node], "nbd", local=set()).chap_required
    assert load_node(dump(node)).iscsi_chap


def test_an_nbd_gateways_tls_mode_is_in_the_gateway_chosen() -> None:
    node = replace(_node("a", "10.0.0.1", nbd=1, iscsi=2), nbd_tls="require")
    assert choose_gateway([node], "nbd", local=set()).tls_mode == "require"
    assert choose_gateway([node], "iscsi", local=set()).tls_mode == ""
    assert load_node(dump(node)).nbd_tls == "require"


def test_a_node_record_from_before_nbd_tls_has_no_tls_mode() -> None:
    data = json.loads(dump(_node("a", "h", nbd=1)))
    del data["nbd_tls"]
    assert load_node(json.dumps(data).encode()).nbd_tls == ""


def test_a_runtime_keeps_whether_its_disks_use_tls() -> None:
    rt = VmRuntime("web", "h", 10, 9, "/r", "/r/q", "/r/c", "/r/c.log", "/r/a", "tcg",
                   Gateway("nbd", "h", 1, tls_mode="allow", tls=True))
    assert VmRuntime.load(rt.dump()).gateway.tls
