"""The guest's kernel command line and console protocol (qemu_driver/guest.py), no QEMU.

tests/integration/test_guest.py boots the real guest; here are the encodings and limits the
guest's /init and the VM runtime rely on.
"""

from __future__ import annotations

import base64
import gzip
import random
from pathlib import Path

import pytest

from qemu_driver.guest import (
    JOB_EXIT_MARKER,
    MAX_COMMAND_LINE,
    GuestNotBuilt,
    JobTooLarge,
    guest_artifacts,
    guest_dir,
    job_append,
    job_exit_status,
    kernel_append,
)


def job_of(append: str) -> str:
    """The script as the guest's /init decodes it: gunzip of base64 of sheep.job=."""
    (word,) = [w for w in append.split() if w.startswith("sheep.job=")]
    return gzip.decompress(base64.b64decode(word.removeprefix("sheep.job="))).decode()


def test_a_job_travels_gzipped_and_base64_encoded_as_one_word() -> None:
    script = "set -e\necho 'quotes, $vars and spaces'\nexit 3\n"
    append = job_append(script)
    assert job_of(append) == script
    assert append.startswith(kernel_append() + " ")


def test_the_command_line_puts_the_console_on_the_serial_port_and_powers_off_on_panic() -> None:
    words = kernel_append().split()
    assert "console=ttyS0" in words
    assert "panic=-1" in words
    assert "quiet" in words
    assert "quiet" not in kernel_append(quiet=False).split()


def test_a_guest_runs_its_agent_unless_told_not_to() -> None:
    assert "sheep.agent=" not in job_append("true\n")
    without = job_append("true\n", agent=False)
    assert "sheep.agent=off" in without.split()
    assert job_of(without) == "true\n"


def test_equal_jobs_make_equal_command_lines() -> None:
    assert job_append("echo same\n") == job_append("echo same\n")


def test_a_job_over_the_linux_command_line_limit_is_refused() -> None:
    incompressible = base64.b64encode(random.Random(0).randbytes(2000)).decode()
    with pytest.raises(JobTooLarge, match=str(MAX_COMMAND_LINE)):
        job_append(f"# {incompressible}\n")


def test_a_compressible_job_may_be_larger_than_the_command_line() -> None:
    script = "echo 'the same line again'\n" * 200
    assert len(script) > MAX_COMMAND_LINE
    assert len(job_append(script)) <= MAX_COMMAND_LINE


def test_the_exit_status_is_read_from_the_last_marker_on_the_console() -> None:
    console = f"booting\r\n{JOB_EXIT_MARKER}1\r\nmore\r\n{JOB_EXIT_MARKER}42\r\npower off\r\n"
    assert job_exit_status(console) == 42


def test_a_console_without_the_marker_has_no_exit_status() -> None:
    assert job_exit_status("sheep-guest: ready\r\nKernel panic\r\n") is None
    assert job_exit_status(f"{JOB_EXIT_MARKER}\r\n") is None


def test_a_missing_guest_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(GuestNotBuilt, match="make setup"):
        guest_artifacts(tmp_path)


def test_the_guest_dir_follows_sheep_guest_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.img").write_bytes(b"i")
    monkeypatch.setenv("SHEEP_GUEST_DIR", str(tmp_path))
    assert guest_dir() == tmp_path
    image = guest_artifacts()
    assert (image.kernel, image.initrd) == (tmp_path / "vmlinuz", tmp_path / "initrd.img")
    assert image.boot_args("console=ttyS0") == [
        "-kernel", str(tmp_path / "vmlinuz"), "-initrd", str(tmp_path / "initrd.img"),
        "-append", "console=ttyS0",
    ]
