"""Which certificate a VM's NBD client shows, and whether it starts TLS at all: the
gateway's published mode decides, a gateway requiring TLS is refused without a certificate
in one line, and QEMU's copy of the key is its owner's alone."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from qemu_driver.control import _with_tls, write_tls_dir
from qemu_driver.errors import VmError
from qemu_driver.spec import Gateway
from sheep.security.config import load_config, write_config
from sheep.security.identity import Identity
from sheep.security.local import LocalPki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return LocalPki.ensure(tmp_path_factory.mktemp("pki"), 0)


@pytest.fixture(scope="module")
def client(pki: LocalPki) -> Identity:
    return Identity.from_files(pki.client)


def _nbd(mode: str) -> Gateway:
    return Gateway("nbd", "127.0.0.1", 10809, tls_mode=mode)


@pytest.mark.parametrize("mode", ["require", "allow"])
def test_a_gateway_speaking_tls_gets_tls_when_there_is_a_certificate(
        client: Identity, mode: str) -> None:
    assert _with_tls(_nbd(mode), client).tls


@pytest.mark.parametrize("mode", ["off", ""])
def test_a_gateway_without_tls_is_dialled_plain_even_with_a_certificate(
        client: Identity, mode: str) -> None:
    assert not _with_tls(_nbd(mode), client).tls


def test_an_allowing_gateway_without_a_certificate_is_dialled_plain() -> None:
    assert not _with_tls(_nbd("allow"), None).tls


def test_a_requiring_gateway_without_a_certificate_is_refused_in_one_line() -> None:
    with pytest.raises(VmError) as refused:
        _with_tls(_nbd("require"), None)
    assert str(refused.value) == (
        "the NBD gateway at 127.0.0.1:10809 requires TLS: dog needs a certificate of the "
        "cluster (its config file: --config, $SHEEP_CONFIG or ./var/dog.conf)")


def test_an_iscsi_gateway_is_left_to_chap(client: Identity) -> None:
    assert not _with_tls(Gateway("iscsi", "127.0.0.1", 3260), client).tls


def test_qemus_credentials_directory_is_laid_out_as_qemu_reads_it_and_private(
        tmp_path: Path, client: Identity) -> None:
    where = tmp_path / "vm" / "tls"
    write_tls_dir(where, client)
    assert (where / "ca-cert.pem").read_bytes() == client.ca_pem
    assert (where / "client-cert.pem").read_bytes() == client.cert_pem
    assert (where / "client-key.pem").read_bytes() == client.key_pem
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    assert stat.S_IMODE((where / "client-key.pem").stat().st_mode) == 0o600


def test_writing_the_credentials_again_replaces_them(tmp_path: Path, client: Identity,
                                                     pki: LocalPki) -> None:
    where = tmp_path / "tls"
    write_tls_dir(where, Identity.from_files(pki.admin))
    write_tls_dir(where, client)
    assert (where / "client-key.pem").read_bytes() == client.key_pem


def test_dogs_config_names_a_client_certificate_for_the_disks_of_vms(
        tmp_path: Path, pki: LocalPki) -> None:
    found = load_config(pki.write_dog_config(tmp_path / "dog.conf", "127.0.0.1:7000"), "h:1")
    assert found.identity is not None and found.identity.role == "admin"
    assert found.disk_identity is not None and found.disk_identity.role == "client"


def test_without_a_client_certificate_vms_show_dogs_own(tmp_path: Path,
                                                        pki: LocalPki) -> None:
    found = load_config(write_config(tmp_path / "dog.conf", "127.0.0.1:7000", pki.admin),
                        "h:1")
    assert found.client is None
    assert found.disk_identity is found.identity
