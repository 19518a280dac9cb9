"""The accelerator probe boots a real kernel to its root mount, caches its verdict per host
and kernel, and gives way to SHEEP_VM_ACCEL (the tests here that set it are the tests of
the override itself)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qemu_driver import accel
from qemu_driver.errors import BadSpec
from qemu_driver.guest import guest_artifacts


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SHEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(accel.OVERRIDE, raising=False)
    return tmp_path / "cache" / "accel.json"


def test_a_qemu_that_cannot_run_boots_nothing(tmp_path: Path) -> None:
    ok, seen = accel.boots(guest_artifacts().kernel, "tcg", qemu=str(tmp_path / "no-qemu"))
    assert not ok and "cannot run" in seen


def test_the_probe_kernel_reaches_its_root_mount_marker_under_tcg() -> None:
    # the marker the KVM probe waits for is one this kernel really prints: proven under TCG,
    # which runs on every host
    ok, seen = accel.boots(guest_artifacts().kernel, "tcg", timeout=60)
    assert ok, seen


def test_a_file_that_is_no_kernel_does_not_boot(tmp_path: Path) -> None:
    junk = tmp_path / "vmlinuz"
    junk.write_bytes(b"not a kernel\n" * 400)  # random bytes may pass for a raw image
    ok, seen = accel.boots(junk, "tcg", timeout=20)
    assert not ok and "exited with status" in seen


def test_without_a_kernel_to_probe_with_the_choice_is_tcg(cache: Path, tmp_path: Path
                                                           ) -> None:
    choice = accel.choose_accel(tmp_path / "missing-vmlinuz")
    assert choice.accel == "tcg" and choice.reason


def test_the_verdict_is_cached_per_host_and_kernel(cache: Path) -> None:
    kernel = guest_artifacts().kernel
    first = accel.choose_accel(kernel)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm here: nothing is probed, so nothing is cached")
    entries = json.loads(cache.read_text())
    assert entries[accel.probe_key(kernel)]["accel"] == first.accel
    second = accel.choose_accel(kernel)
    assert second.accel == first.accel and second.reason.endswith("(cached)")


def test_a_cached_verdict_is_what_the_next_choice_returns(cache: Path) -> None:
    kernel = guest_artifacts().kernel
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm here: the cache is never consulted")
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({accel.probe_key(kernel): {
        "accel": "kvm", "reason": "planted", "key": accel.probe_key(kernel)}}))
    assert accel.choose_accel(kernel) == accel.AccelChoice(
        "kvm", "planted (cached)", accel.probe_key(kernel))


def test_the_key_changes_with_the_probed_kernel(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1")
    b.write_bytes(b"22")
    assert accel.probe_key(a) != accel.probe_key(b)


def test_the_environment_overrides_the_probe(cache: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    for forced in ("tcg", "kvm"):
        monkeypatch.setenv(accel.OVERRIDE, forced)
        choice = accel.choose_accel(guest_artifacts().kernel)
        assert choice.accel == forced and accel.OVERRIDE in choice.reason
    assert not cache.exists()
    monkeypatch.setenv(accel.OVERRIDE, "xen")
    with pytest.raises(BadSpec, match="SHEEP_VM_ACCEL"):
        accel.choose_accel(None)


def test_an_accelerator_a_dog_forces_wins_over_the_hosts_own_override(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node starting a VM for a dog follows dog's SHEEP_VM_ACCEL, not its own."""
    monkeypatch.setenv(accel.OVERRIDE, "kvm")
    choice = accel.choose_accel(guest_artifacts().kernel, forced="tcg")
    assert choice.accel == "tcg"
    assert choice.reason == f"forced by {accel.OVERRIDE}=tcg given to dog vm start"
    with pytest.raises(BadSpec) as bad:
        accel.choose_accel(None, forced="xen")
    assert str(bad.value) == (f"{accel.OVERRIDE}='xen' given to dog vm start: expected one "
                              "of kvm, tcg")
    assert not cache.exists()
