"""QEMU command lines and block-device definitions of a VM, as data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemu_driver.cmdline import (
    AGENT_CHANNEL,
    TLS_CREDS_ID,
    RunPaths,
    blockdev,
    disk_device,
    qemu_argv,
)
from qemu_driver.spec import Gateway, VmSpec, disk_id
from sheep.security.pki import SERVER_NAME

NBD = Gateway("nbd", "127.0.0.1", 10809)
ISCSI = Gateway("iscsi", "127.0.0.1", 3260)
PATHS = RunPaths(Path("/run/sheep/vm/web"))


def _values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


def test_an_nbd_disk_goes_through_qemus_own_client_with_a_reconnect_delay() -> None:
    dev = blockdev("disk", NBD, reconnect_delay=45)
    assert dev["driver"] == "nbd" and dev["export"] == "disk"
    assert dev["server"] == {"type": "inet", "host": "127.0.0.1", "port": "10809"}
    assert dev["reconnect-delay"] == 45


def test_an_iscsi_disk_is_lun_0_of_the_vdis_target() -> None:
    dev = blockdev("disk", ISCSI, initiator="iqn.x:y")
    assert dev["driver"] == "iscsi" and dev["transport"] == "tcp"
    assert dev["portal"] == "127.0.0.1:3260"
    assert dev["target"] == "iqn.2026-11.io.sheep:disk" and dev["lun"] == 0
    assert dev["initiator-name"] == "iqn.x:y"


def test_a_disks_node_and_device_share_one_id_that_qemu_accepts() -> None:
    node = blockdev("a.b_c-d", NBD)["node-name"]
    dev = disk_device("a.b_c-d")
    assert node == dev["id"] == dev["drive"] == disk_id("a.b_c-d")
    assert node[0].isalpha() and node.isalnum()
    assert disk_id("one") != disk_id("two")


def test_disks_are_virtio_blk_in_the_order_given() -> None:
    spec = VmSpec("web", ("root", "data"), kernel="/k")
    argv = qemu_argv(spec, NBD, PATHS, "tcg")
    exports = [json.loads(b)["export"] for b in _values(argv, "-blockdev")]
    devices = [json.loads(d) for d in _values(argv, "-device") if d.startswith("{")]
    assert exports == ["root", "data"]
    assert [d["drive"] for d in devices] == [disk_id("root"), disk_id("data")]
    assert all(d["driver"] == "virtio-blk-pci" for d in devices)


def test_without_a_kernel_the_vm_boots_from_its_first_disk() -> None:
    argv = qemu_argv(VmSpec("web", ("root", "data")), NBD, PATHS, "tcg")
    devices = [json.loads(d) for d in _values(argv, "-device") if d.startswith("{")]
    assert [d.get("bootindex") for d in devices] == [0, None]
    assert "-kernel" not in argv


def test_a_kernel_boot_passes_kernel_initrd_and_command_line() -> None:
    spec = VmSpec("web", ("root",), kernel="/k", initrd="/i", append="console=ttyS0")
    argv = qemu_argv(spec, NBD, PATHS, "tcg")
    assert _values(argv, "-kernel") == ["/k"]
    assert _values(argv, "-initrd") == ["/i"]
    assert _values(argv, "-append") == ["console=ttyS0"]


@pytest.mark.parametrize(("accel", "cpu"), [("kvm", "host"), ("tcg", "max")])
def test_the_accelerator_chooses_the_cpu_model(accel: str, cpu: str) -> None:
    argv = qemu_argv(VmSpec("web", ("root",)), NBD, PATHS, accel)
    assert _values(argv, "-accel") == [accel]
    assert _values(argv, "-cpu") == [cpu]


def test_qmp_console_and_agent_are_unix_sockets_in_the_run_dir() -> None:
    argv = qemu_argv(VmSpec("web", ("root",), memory=512, cpus=2), NBD, PATHS, "tcg")
    assert _values(argv, "-qmp") == [f"unix:{PATHS.qmp},server=on,wait=off",
                                     f"unix:{PATHS.events},server=on,wait=off"]
    chardevs = _values(argv, "-chardev")
    assert any(f"path={PATHS.console}" in c and f"logfile={PATHS.console_log}" in c
               for c in chardevs)
    assert any(f"path={PATHS.agent}" in c for c in chardevs)
    assert f"virtserialport,chardev=agent,name={AGENT_CHANNEL}" in _values(argv, "-device")
    assert _values(argv, "-m") == ["512"] and _values(argv, "-smp") == ["2"]


def test_qemu_starts_paused_so_its_supervisor_sees_every_event() -> None:
    argv = qemu_argv(VmSpec("web", ("root",)), NBD, PATHS, "kvm")
    assert "-S" in argv


def test_a_guest_panic_reaches_qemu_through_pvpanic_and_holds_the_vm_for_the_supervisor(
) -> None:
    argv = qemu_argv(VmSpec("web", ("root",)), NBD, PATHS, "tcg")
    assert "pvpanic-pci" in _values(argv, "-device")
    assert _values(argv, "-action") == ["panic=pause"]


def test_an_iscsi_disk_logs_in_with_chap_from_a_secret_object_not_the_command_line() -> None:
    gateway = Gateway("iscsi", "127.0.0.1", 3260, chap_required=True, chap_user="alice")
    spec = VmSpec(name="web", disks=("disk",), transport="iscsi")
    argv = qemu_argv(spec, gateway, PATHS, "tcg")
    dev = json.loads(_values(argv, "-blockdev")[0])
    assert (dev["user"], dev["password-secret"]) == ("alice", "iscsi-chap")
    assert _values(argv, "-object") == [
        f"secret,id=iscsi-chap,file={PATHS.chap_secret},format=raw"]


def test_an_iscsi_disk_without_chap_has_no_secret() -> None:
    argv = qemu_argv(VmSpec(name="web", disks=("disk",), transport="iscsi"), ISCSI, PATHS,
                     "tcg")
    assert "user" not in json.loads(_values(argv, "-blockdev")[0])
    assert _values(argv, "-object") == []


def test_an_ipv6_portal_is_bracketed() -> None:
    assert blockdev("disk", Gateway("iscsi", "::1", 3260))["portal"] == "[::1]:3260"


TLS = Gateway("nbd", "10.0.0.5", 10809, tls_mode="require", tls=True)


def test_an_nbd_disk_over_tls_names_the_credentials_and_the_name_node_certificates_carry(
) -> None:
    dev = blockdev("disk", TLS)
    assert dev["tls-creds"] == TLS_CREDS_ID
    assert dev["tls-hostname"] == SERVER_NAME == "sheep"
    assert dev["server"] == {"type": "inet", "host": "10.0.0.5", "port": "10809"}


def test_qemus_tls_credentials_are_a_directory_in_the_run_dir_never_a_key() -> None:
    argv = qemu_argv(VmSpec("web", ("root", "data")), TLS, PATHS, "tcg")
    assert _values(argv, "-object") == [
        f"tls-creds-x509,id={TLS_CREDS_ID},dir={PATHS.tls},endpoint=client,verify-peer=on"]
    assert PATHS.tls == PATHS.dir / "tls"
    assert not any("key" in a or "PRIVATE" in a for a in argv)
    assert all(json.loads(b)["tls-creds"] == TLS_CREDS_ID for b in _values(argv, "-blockdev"))


def test_a_plain_nbd_disk_has_no_tls() -> None:
    argv = qemu_argv(VmSpec("web", ("root",)), Gateway("nbd", "127.0.0.1", 1,
                                                       tls_mode="allow"), PATHS, "tcg")
    assert _values(argv, "-object") == []
    assert "tls-creds" not in json.loads(_values(argv, "-blockdev")[0])


def test_a_hot_plugged_disk_uses_the_same_credentials_as_the_boot_disks() -> None:
    assert blockdev("late", TLS)["tls-creds"] == blockdev("root", TLS)["tls-creds"]
