"""Addresses beside ports, and the socket family to bind them with."""

from __future__ import annotations

import socket

import pytest

from sheep.netaddr import family, host_port, is_loopback, is_unspecified


@pytest.mark.parametrize(("host", "port", "text"), [
    ("127.0.0.1", 7000, "127.0.0.1:7000"),
    ("::1", 7000, "[::1]:7000"),
    ("fe80::1%eth0", 3260, "[fe80::1%eth0]:3260"),
    ("node7.example", 10809, "node7.example:10809"),
])
def test_an_ipv6_literal_is_bracketed_beside_its_port(host: str, port: int, text: str) -> None:
    assert host_port(host, port) == text


def test_the_family_follows_the_literal() -> None:
    assert family("::1") == socket.AF_INET6
    assert family("::") == socket.AF_INET6
    assert family("127.0.0.1") == socket.AF_INET
    assert family("localhost") == socket.AF_INET


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("myhost", False),
])
def test_loopback_is_decided_without_resolving(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_every_address_is_unspecified_and_no_other() -> None:
    assert is_unspecified("0.0.0.0") and is_unspecified("::")
    assert not is_unspecified("127.0.0.1") and not is_unspecified("localhost")
