"""sheep.security.psk on a real OpenSSL context: what giving it PSK changes, and what it
must leave as it was. (Python 3.11 has no PSK client, so the PSK handshakes themselves are
QEMU's and libnbd's, in tests/integration/test_nbd_psk.py.)"""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest

from sheep.security.identity import Identity, peer_of_ssl
from sheep.security.pki import ClusterCA
from sheep.security.psk import PskServerContext


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ClusterCA:
    return ClusterCA.create(tmp_path_factory.mktemp("psk") / "ca")


@pytest.fixture
def server(ca: ClusterCA, tmp_path: Path) -> PskServerContext:
    identity = Identity.from_files(ca.issue(tmp_path / "n", "node0", "node"))
    context = identity.server_ssl(PskServerContext)
    context.accept_psk({b"vm1": b"k" * 32}.get)
    return context


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> ssl.SSLObject:
    """A TLS handshake in memory; the server's end once the client's first byte came."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    theirs = client.wrap_bio(c_in, c_out)
    ours = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for end, sent, inbox in ((theirs, c_out, s_in), (ours, s_out, c_in)):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
            inbox.write(sent.read())
    theirs.write(b"x")
    s_in.write(c_out.read())
    assert ours.read(1) == b"x"
    return ours


def test_sha256_suites_come_first_so_a_tls13_psk_is_not_dropped(
        server: PskServerContext) -> None:
    tls13 = [c["name"] for c in server.get_ciphers() if c["protocol"] == "TLSv1.3"]
    assert tls13[:2] == ["TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"]


def test_a_client_certificate_still_makes_the_peer_and_proves_no_psk(
        ca: ClusterCA, server: PskServerContext, tmp_path: Path) -> None:
    client = Identity.from_files(ca.issue(tmp_path / "c", "vmhost1", "client")).client_ssl()
    ours = handshake(client, server)
    assert peer_of_ssl(ours) is not None and peer_of_ssl(ours).name == "vmhost1"
    assert server.psk_identity(ours) is None


def test_no_session_tickets_are_sent(server: PskServerContext) -> None:
    """A session resumed from one would carry no certificate and no PSK identity."""
    assert server.num_tickets == 0


def test_a_client_without_a_certificate_or_a_psk_is_refused(
        ca: ClusterCA, server: PskServerContext) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(ca.cert_path)
    with pytest.raises(ssl.SSLError, match=r"PEER_DID_NOT_RETURN_A_CERTIFICATE|certificate"):
        handshake(client, server)
