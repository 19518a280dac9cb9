"""The accelerator probe really boots something: a boot sector that must end QEMU with
the status it writes to the debug-exit port."""

from __future__ import annotations

import shutil

import pytest

from qemu_driver import accel


def test_the_probe_image_is_a_bootable_sector() -> None:
    sector = accel._boot_sector()
    assert len(sector) == 512 and sector.endswith(b"\x55\xaa")


def test_a_qemu_that_cannot_run_means_no_kvm(tmp_path) -> None:
    assert accel.kvm_works(qemu=str(tmp_path / "no-such-qemu")) is False


def test_the_environment_can_force_the_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    accel.choose_accel.cache_clear()
    monkeypatch.setenv("SHEEP_VM_ACCEL", "tcg")
    try:
        assert accel.choose_accel() == "tcg"
    finally:
        accel.choose_accel.cache_clear()


@pytest.mark.skipif(shutil.which(accel.QEMU) is None, reason="no qemu-system-x86_64")
def test_the_probe_under_tcg_semantics_boots_the_sector(tmp_path, monkeypatch) -> None:
    # The same boot sector under TCG must reach the exit port: the probe's image is right
    # whatever KVM does on this host.
    import subprocess

    image = tmp_path / "boot.img"
    image.write_bytes(accel._boot_sector())
    proc = subprocess.run([accel.QEMU, "-accel", "tcg", "-m", "16", "-nodefaults",
                           "-display", "none", "-no-reboot", "-device",
                           "isa-debug-exit,iobase=0xf4,iosize=0x04", "-drive",
                           f"file={image},format=raw,if=floppy", "-boot", "a"],
                          capture_output=True, timeout=30)
    assert proc.returncode == (0x2A << 1) | 1
