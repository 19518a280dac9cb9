"""Cluster records: the JSON kept in etcd and the etcd URL with its key prefix."""

from __future__ import annotations

import pytest

from sheep.cluster.state import (
    ClusterConfig,
    EpochRecord,
    EtcdTarget,
    NodeInfo,
    dump,
    load_config,
    load_epoch,
    load_node,
)

A = NodeInfo("a" * 32, "127.0.0.1", 7100, 7000, "z1", 2048, 1 << 40)
B = NodeInfo("b" * 32, "127.0.0.1", 7101, 7001, "z2", 4096, 2 << 40)


def test_node_info_round_trips_through_json() -> None:
    assert load_node(dump(A)) == A


def test_config_round_trips_through_json() -> None:
    config = ClusterConfig("c" * 32, 3, 4 << 20, 1700000000.5)
    assert load_config(dump(config)) == config


def test_epoch_record_round_trips_with_members_sorted_by_id() -> None:
    record = EpochRecord(5, 1700000000.0, (B, A))
    loaded = load_epoch(dump(record))
    assert loaded.epoch == 5 and loaded.nodes == (A, B)
    assert loaded.same_members([B, A])
    assert not loaded.same_members([A])


def test_epoch_record_builds_the_ring_of_its_members() -> None:
    ring = EpochRecord(1, 0.0, (A, B)).ring()
    assert A.node_id in ring and B.node_id in ring and len(ring) == 2


def test_epoch_record_finds_members_by_id() -> None:
    record = EpochRecord(1, 0.0, (A, B))
    assert record.node(B.node_id) == B
    assert record.node("nope") is None


@pytest.mark.parametrize(
    ("url", "host", "port", "prefix"),
    [
        ("http://127.0.0.1:2379", "127.0.0.1", 2379, "/sheep"),
        ("127.0.0.1:23790", "127.0.0.1", 23790, "/sheep"),
        ("http://localhost", "localhost", 2379, "/sheep"),
        ("http://127.0.0.1:2379/prod/", "127.0.0.1", 2379, "/prod"),
        ("http://127.0.0.1:2379/a/b", "127.0.0.1", 2379, "/a/b"),
    ],
)
def test_etcd_url_gives_endpoint_and_key_prefix(
    url: str, host: str, port: int, prefix: str
) -> None:
    target = EtcdTarget.parse(url)
    assert (target.host, target.port, target.prefix) == (host, port, prefix)


def test_etcd_keys_live_under_the_prefix() -> None:
    target = EtcdTarget.parse("http://h:1/p")
    assert target.config_key == b"/p/config"
    assert target.node_key("n1") == b"/p/nodes/n1"
    assert target.epoch_log_key(12) == b"/p/epochs/0000000012"
    assert target.nodes_prefix == b"/p/nodes/"


def test_https_etcd_url_is_a_secure_target_and_http_a_plain_one() -> None:
    secure = EtcdTarget.parse("https://10.0.0.5:2379/prod")
    assert (secure.secure, secure.url, secure.prefix) == (True, "https://10.0.0.5:2379", "/prod")
    assert not EtcdTarget.parse("http://10.0.0.5:2379").secure
    assert not EtcdTarget.parse("10.0.0.5:2379").secure


def test_ipv6_etcd_url_keeps_its_brackets() -> None:
    assert EtcdTarget.parse("https://[::1]:2379/p").url == "https://[::1]:2379"


@pytest.mark.parametrize("url", ["ftp://h:1", "http://:2379", "https://root:pw@h:2379",
                                 "https://root@h:2379"])
def test_bad_etcd_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        EtcdTarget.parse(url)
