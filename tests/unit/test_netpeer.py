"""Who owns the other end of a loopback TCP connection, asked of the kernel about real
sockets made here: ours over IPv4, IPv6 and a dual-stack listener, another user's (a
client started as nobody), and peers that are gone, which must never pass for root."""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest

from sheep.netpeer import loopback_refusal, peer_uid

NOBODY = pwd.getpwnam("nobody").pw_uid
SYSTEM_PYTHON = "/usr/bin/python3"  # nobody may run it: nothing of it lies under /root


@contextlib.contextmanager
def connection(host: str, family: socket.AddressFamily, *, dual_stack: bool = False
               ) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the client's socket, the server's accepted one) of a fresh loopback connection."""
    with socket.create_server((host if not dual_stack else "::", 0), family=family,
                              dualstack_ipv6=dual_stack) as listener:
        target = "127.0.0.1" if dual_stack else host
        client = socket.create_connection((target, listener.getsockname()[1]), timeout=5)
        server, _ = listener.accept()
        with client, server:
            yield client, server


def ends(server: socket.socket) -> tuple[tuple, tuple]:
    return server.getsockname(), server.getpeername()


@pytest.mark.parametrize(("host", "family"), [("127.0.0.1", socket.AF_INET),
                                              ("::1", socket.AF_INET6)])
def test_our_own_client_is_ours(host: str, family: socket.AddressFamily) -> None:
    with connection(host, family) as (_client, server):
        assert peer_uid(*ends(server)) == os.geteuid()


def test_a_client_of_127_0_0_1_on_a_dual_stack_listener_is_found() -> None:
    with connection("::", socket.AF_INET6, dual_stack=True) as (_client, server):
        assert server.getpeername()[0] == "::ffff:127.0.0.1"
        assert peer_uid(*ends(server)) == os.geteuid()


def test_a_client_that_reset_its_connection_is_none() -> None:
    with connection("127.0.0.1", socket.AF_INET) as (client, server):
        addresses = ends(server)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST: the socket is gone at once
        assert peer_uid(*addresses) is None


@pytest.mark.parametrize(("host", "family"), [("127.0.0.1", socket.AF_INET),
                                              ("::1", socket.AF_INET6)])
def test_a_client_that_closed_is_none_though_the_kernel_says_root(
        host: str, family: socket.AddressFamily) -> None:
    """Its socket lingers in FIN_WAIT with no process: the kernel reports it as uid 0."""
    with connection(host, family) as (client, server):
        client.close()
        assert peer_uid(*ends(server)) is None


@pytest.fixture
def nobodys_connection() -> Iterator[socket.socket]:
    """The server's end of a loopback connection whose client runs as nobody."""
    if os.geteuid() != 0:
        pytest.skip("making a client of another user needs root")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        script = ("import socket, sys; s = socket.create_connection(('127.0.0.1', "
                  f"{listener.getsockname()[1]})); sys.stdin.read()")
        child = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup",
                                  "--clear-groups", SYSTEM_PYTHON, "-I", "-c", script],
                                 stdin=subprocess.PIPE, cwd="/")
        try:
            server, _ = listener.accept()
            with server:
                yield server
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(10)


def test_another_users_client_is_theirs(nobodys_connection: socket.socket) -> None:
    assert peer_uid(*ends(nobodys_connection)) == NOBODY


def test_another_users_client_is_refused_naming_its_uid(
        nobodys_connection: socket.socket) -> None:
    why = loopback_refusal(*ends(nobodys_connection), "plaintext NBD", "use TLS")
    assert why.startswith("plaintext NBD on loopback is only for root")
    assert why.endswith(f"not uid {NOBODY}; use TLS")


def test_our_own_client_is_not_refused() -> None:
    with connection("127.0.0.1", socket.AF_INET) as (_client, server):
        assert loopback_refusal(*ends(server), "plaintext NBD", "use TLS") == ""


def test_a_client_that_is_gone_is_refused() -> None:
    with connection("127.0.0.1", socket.AF_INET) as (client, server):
        client.close()
        assert "not a client whose owner is unknown" in loopback_refusal(
            *ends(server), "plaintext NBD", "use TLS")


def test_a_peer_off_loopback_or_on_a_unix_socket_is_not_asked_about() -> None:
    """No such sockets exist: had they been looked up, the answer would be a refusal."""
    assert loopback_refusal(("192.0.2.1", 10809), ("192.0.2.7", 40000), "NBD", "") == ""
    assert loopback_refusal(("2001:db8::1", 10809, 0, 0), ("2001:db8::7", 1, 0, 0),
                            "NBD", "") == ""
    assert loopback_refusal("/run/nbd.sock", "", "NBD", "") == ""
