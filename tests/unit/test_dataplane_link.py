"""Which data-plane links may carry frames in the clear after authentication
(sheep/dataplane/link.py): only loopback at both ends, only when both ends agree, and a
network peer can never talk a dialer out of encryption."""

from __future__ import annotations

import pytest

from sheep.dataplane.link import (
    ASK_CLEAR,
    ASK_ENCRYPTED,
    check_answer,
    client_wish,
    server_answer,
)
from sheep.errors import ProtocolError
from sheep.netaddr import is_loopback


class Sock:
    """What the link rules read of a connected socket: its two addresses."""

    def __init__(self, local: str, peer: str) -> None:
        self._local, self._peer = local, peer

    def getsockname(self) -> tuple[str, int]:
        return self._local, 7000

    def getpeername(self) -> tuple[str, int]:
        return self._peer, 40000


LOOPBACK = Sock("127.0.0.1", "127.0.0.1")
NETWORK = Sock("10.0.0.1", "10.0.0.2")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "::ffff:10.0.0.1", "fe80::1%eth0", "name"])
def test_addresses_that_are_not_loopback(host: str) -> None:
    assert not is_loopback(host)


def test_a_dialer_asks_for_the_clear_only_on_loopback() -> None:
    assert client_wish(LOOPBACK, encrypt_loopback=False) == ASK_CLEAR  # type: ignore[arg-type]
    assert client_wish(NETWORK, encrypt_loopback=False) == ASK_ENCRYPTED  # type: ignore[arg-type]
    assert client_wish(LOOPBACK, encrypt_loopback=True) == ASK_ENCRYPTED  # type: ignore[arg-type]


def test_a_node_grants_the_clear_only_on_loopback_and_when_asked() -> None:
    assert server_answer(ASK_CLEAR, LOOPBACK, False) == ASK_CLEAR  # type: ignore[arg-type]
    assert server_answer(ASK_CLEAR, NETWORK, False) == ASK_ENCRYPTED  # type: ignore[arg-type]
    assert server_answer(ASK_CLEAR, LOOPBACK, True) == ASK_ENCRYPTED  # type: ignore[arg-type]
    assert server_answer(ASK_ENCRYPTED, LOOPBACK, False) == ASK_ENCRYPTED  # type: ignore


def test_one_loopback_end_is_not_a_loopback_link() -> None:
    assert server_answer(ASK_CLEAR, Sock("127.0.0.1", "10.0.0.2"), False) == ASK_ENCRYPTED  # type: ignore


def test_a_node_refuses_a_byte_that_is_no_link_mode() -> None:
    with pytest.raises(ProtocolError):
        server_answer(b"\x16", LOOPBACK, False)  # type: ignore[arg-type]


def test_a_dialer_that_asked_for_encryption_never_accepts_the_clear() -> None:
    with pytest.raises(ProtocolError):
        check_answer(ASK_ENCRYPTED, ASK_CLEAR)


def test_a_dialer_that_asked_for_the_clear_accepts_encryption() -> None:
    assert check_answer(ASK_CLEAR, ASK_ENCRYPTED) == ASK_ENCRYPTED
    assert check_answer(ASK_CLEAR, ASK_CLEAR) == ASK_CLEAR


def test_a_dialer_refuses_an_answer_that_is_no_link_mode() -> None:
    with pytest.raises(ProtocolError):
        check_answer(ASK_CLEAR, b"\x00")
