"""What a process shows etcd (sheep/cluster/access.py): chosen from `sheep run`'s options
and the etcd URL, with the password read only from a file others cannot read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sheep.cluster.access import EtcdAccess, EtcdAccessError, resolve_access
from sheep.cluster.etcd import EtcdCluster
from sheep.cluster.state import EtcdTarget
from sheep.security.identity import Identity
from sheep.security.pki import SERVER_NAME, ClusterCA

SECURE = EtcdTarget.parse("https://10.1.2.3:2379/c")
PLAIN = EtcdTarget.parse("http://10.1.2.3:2379/c")
LOCAL = EtcdTarget.parse("http://127.0.0.1:2379/c")


@pytest.fixture(scope="module")
def cluster_ca(tmp_path_factory: pytest.TempPathFactory) -> ClusterCA:
    return ClusterCA.create(tmp_path_factory.mktemp("pki") / "ca")


@pytest.fixture(scope="module")
def node(cluster_ca: ClusterCA) -> Identity:
    return Identity.from_files(cluster_ca.issue(cluster_ca.dir.parent / "node0", "node0",
                                                "node"))


def _secret(path: Path, text: str, mode: int = 0o600) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.write(fd, text.encode())
    os.close(fd)
    os.chmod(path, mode)
    return str(path)


def test_https_etcd_is_shown_the_nodes_own_identity_by_default(node: Identity) -> None:
    access = resolve_access(SECURE, node)
    assert (access.ca_pem, access.cert_pem, access.key_pem) == (
        node.ca_pem, node.cert_pem, node.key_pem)
    assert access.server_name == SERVER_NAME


def test_http_etcd_stays_plain_even_for_a_node_with_an_identity(node: Identity) -> None:
    assert resolve_access(PLAIN, node) == EtcdAccess()


def test_https_etcd_without_any_certificate_is_refused() -> None:
    with pytest.raises(EtcdAccessError, match="speaks TLS"):
        resolve_access(SECURE, None)


def test_https_etcd_without_credentials_cannot_make_a_cluster_client() -> None:
    with pytest.raises(EtcdAccessError, match="speaks TLS"):
        EtcdCluster(SECURE)


def test_etcd_with_a_ca_of_its_own_is_checked_by_its_url_host(tmp_path: Path,
                                                              node: Identity) -> None:
    other = ClusterCA.create(tmp_path / "etcd-ca", cluster="external")
    files = other.issue(tmp_path / "client", "sheep-node", "client")
    access = resolve_access(SECURE, node, ca=str(files.ca), cert=str(files.cert),
                            key=str(files.key))
    assert access.ca_pem == files.ca.read_bytes() != node.ca_pem
    assert access.cert_pem == files.cert.read_bytes()
    assert access.server_name == ""


def test_etcd_ca_alone_gives_tls_without_a_client_certificate(tmp_path: Path) -> None:
    other = ClusterCA.create(tmp_path / "etcd-ca", cluster="external")
    access = resolve_access(SECURE, None, ca=str(other.cert_path))
    assert access.tls and access.cert_pem == b"" and access.key_pem == b""


def test_etcd_cert_without_its_key_and_ca_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EtcdAccessError, match="go together"):
        resolve_access(SECURE, None, cert=str(tmp_path / "c.crt"))


def test_password_is_the_first_line_of_its_file(tmp_path: Path, node: Identity) -> None:
    path = _secret(tmp_path / "pw", "s3cret with spaces\nignored\n")
    access = resolve_access(SECURE, node, user="root", password_file=path)
    assert (access.user, access.password) == ("root", "s3cret with spaces")
    assert "s3cret" not in repr(access)


def test_password_file_others_can_read_is_refused(tmp_path: Path, node: Identity) -> None:
    path = _secret(tmp_path / "pw", "s3cret\n", 0o644)
    with pytest.raises(EtcdAccessError, match="readable by others"):
        resolve_access(SECURE, node, user="root", password_file=path)


def test_empty_password_file_is_refused(tmp_path: Path, node: Identity) -> None:
    path = _secret(tmp_path / "pw", "\n")
    with pytest.raises(EtcdAccessError, match="empty"):
        resolve_access(SECURE, node, user="root", password_file=path)


def test_user_without_password_file_is_refused(node: Identity) -> None:
    with pytest.raises(EtcdAccessError, match="go together"):
        resolve_access(SECURE, node, user="root")


def test_password_in_clear_over_the_network_is_refused(tmp_path: Path) -> None:
    path = _secret(tmp_path / "pw", "s3cret\n")
    with pytest.raises(EtcdAccessError, match="in clear"):
        resolve_access(PLAIN, None, user="root", password_file=path)


def test_password_in_clear_on_loopback_is_allowed(tmp_path: Path) -> None:
    path = _secret(tmp_path / "pw", "s3cret\n")
    assert resolve_access(LOCAL, None, user="root", password_file=path).password == "s3cret"


@pytest.mark.parametrize("option", ["--etcd-password", "--etcd-password=hunter2-x"])
def test_sheep_run_takes_no_etcd_password_on_its_command_line(
        option: str, capsys: pytest.CaptureFixture[str]) -> None:
    from sheep.cli.sheep_main import build_parser

    argv = ["run", "--dir", "d", "--etcd", "https://h:2379", option]
    if "=" not in option:
        argv.append("hunter2-x")
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert "--etcd-password-file" in err and "hunter2-x" not in err
