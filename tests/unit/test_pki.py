"""The cluster CA and identities (sheep/security): who a certificate says its holder is,
and which files are refused."""

from __future__ import annotations

import contextlib
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from sheep.control import sheep_pb2
from sheep.control.access import ALLOWED, allowed_roles
from sheep.security.config import NONE, find_config, load_config
from sheep.security.identity import Identity
from sheep.security.local import LocalPki
from sheep.security.pki import ClusterCA, PkiError, name_of, role_of


@pytest.fixture
def ca(tmp_path: Path) -> ClusterCA:
    return ClusterCA.create(tmp_path / "ca")


def test_a_certificate_names_its_holder_and_role(ca: ClusterCA, tmp_path: Path) -> None:
    files = ca.issue(tmp_path / "n", "node7", "node")
    identity = Identity.from_files(files)
    assert (identity.role, name_of(identity.certificate)) == ("node", "node7")


def test_an_unknown_role_is_refused(ca: ClusterCA, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="unknown role"):
        ca.issue(tmp_path / "x", "x", "root")


def test_a_certificate_named_as_a_psk_identity_is_refused(ca: ClusterCA,
                                                          tmp_path: Path) -> None:
    """NBD allow-lists name PSK clients psk:IDENTITY: no certificate may pass for one."""
    with pytest.raises(PkiError, match="pre-shared key identities"):
        ca.issue(tmp_path / "x", "psk:vm1", "client")


def test_a_second_ca_in_one_directory_is_refused(ca: ClusterCA) -> None:
    with pytest.raises(PkiError, match="already holds a CA"):
        ClusterCA.create(ca.dir)


def test_keys_are_private_from_the_first_byte(ca: ClusterCA, tmp_path: Path) -> None:
    files = ca.issue(tmp_path / "a", "admin", "admin")
    for path in (files.key, ca.dir / "ca.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.key.parent.stat().st_mode) == 0o700


def test_a_key_others_can_read_is_refused(ca: ClusterCA, tmp_path: Path) -> None:
    files = ca.issue(tmp_path / "a", "admin", "admin")
    files.key.chmod(0o644)
    with pytest.raises(PkiError, match="readable by others"):
        Identity.from_files(files)


def test_a_key_that_is_not_the_certificates_is_refused(ca: ClusterCA, tmp_path: Path) -> None:
    a = ca.issue(tmp_path / "a", "a", "admin")
    b = ca.issue(tmp_path / "b", "b", "admin")
    with pytest.raises(PkiError, match="do not make an identity"):
        Identity.load(a.ca, a.cert, b.key)


def test_only_serving_roles_carry_the_cluster_server_name(ca: ClusterCA, tmp_path: Path
                                                          ) -> None:
    node = Identity.from_files(ca.issue(tmp_path / "n", "n", "node")).certificate
    admin = Identity.from_files(ca.issue(tmp_path / "a", "a", "admin")).certificate
    names = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "sheep" in names.get_values_for_type(x509.DNSName)
    assert role_of(admin) == "admin"
    with pytest.raises(x509.ExtensionNotFound):
        admin.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_a_client_of_another_ca_fails_the_handshake(ca: ClusterCA, tmp_path: Path) -> None:
    """The client trusts our CA (it would accept the server) but shows a certificate of
    its own CA: the server is the one that refuses."""
    server = Identity.from_files(ca.issue(tmp_path / "n", "n", "node")).server_ssl()
    theirs = ClusterCA.create(tmp_path / "ca2").issue(tmp_path / "s", "s", "admin")
    stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    stranger.check_hostname = False
    stranger.load_cert_chain(theirs.cert, theirs.key)
    stranger.load_verify_locations(ca.cert_path)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    ends = [(stranger.wrap_bio(c_in, c_out), c_out, s_in),
            (server.wrap_bio(s_in, s_out, server_side=True), s_out, c_in)]
    with pytest.raises(ssl.SSLError, match=r"CERTIFICATE_VERIFY_FAILED|unknown ca"):
        for _ in range(10):  # the server refuses the client's certificate
            for end, sent, peer_inbox in ends:
                with contextlib.suppress(ssl.SSLWantReadError):
                    end.do_handshake()
                peer_inbox.write(sent.read())
                if end.server_side and end.version() is not None:
                    end.read(1)  # TLS 1.3: the client's certificate is checked here


def test_every_control_rpc_has_a_rule_and_admin_may_call_all() -> None:
    methods = {f"/sheep.control.{s.name}/{m}": m
               for s in sheep_pb2.DESCRIPTOR.services_by_name.values()
               for m in s.methods_by_name}
    assert set(methods.values()) == set(ALLOWED)
    assert len(methods) == len(ALLOWED), "two services share a method name"
    assert all("admin" in allowed_roles(path) for path in methods)


def test_only_the_admin_may_drive_a_nodes_vms() -> None:
    methods = sheep_pb2.DESCRIPTOR.services_by_name["VmHost"].methods_by_name
    assert all(allowed_roles(f"/sheep.control.VmHost/{m}") == {"admin"} for m in methods)


def test_a_method_missing_from_the_table_is_closed() -> None:
    assert allowed_roles("/sheep.Control/DropEverything") == frozenset()


def test_dog_config_names_the_admin_and_the_address(tmp_path: Path) -> None:
    pki = LocalPki.ensure(tmp_path, 1)
    path = pki.write_dog_config(tmp_path / "dog.conf", "127.0.0.1:7000")
    found = load_config(path, "127.0.0.1:1")
    assert found.address == "127.0.0.1:7000"
    assert found.identity is not None and found.identity.role == "admin"
    assert b"PRIVATE KEY" not in path.read_bytes()


def test_none_means_no_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHEEP_CONFIG", NONE)
    assert find_config() is None
    assert load_config(None, "h:1").identity is None


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="no config file"):
        load_config(tmp_path / "nope.conf", "h:1")
