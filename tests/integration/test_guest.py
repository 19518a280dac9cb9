"""The demo/test guest boots under QEMU and does what its console protocol promises.

Each test boots the real guest (`make setup` builds it) with qemu-system-x86_64 under the
accelerator the runtime's probe chooses for it (never forced: a host where KVM misleads the
probe fails here),
raw files as virtio-blk disks and no network, and reads the serial console QEMU writes to
its stdout. Every boot is bounded by a timeout; one takes about 3 s.
"""

from __future__ import annotations

import random
import string
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from qemu_driver.accel import CPU, choose_accel
from qemu_driver.guest import (
    MAX_COMMAND_LINE,
    POWER_OFF_MARKER,
    READY_MARKER,
    GuestImage,
    JobTooLarge,
    guest_artifacts,
    job_append,
    job_exit_status,
    kernel_append,
)

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 40  # seconds; a boot takes ~3 s alone, more on a loaded machine


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return guest_artifacts()


def accel_args(image: GuestImage) -> list[str]:
    accel = choose_accel(image.kernel).accel
    return ["-accel", accel, "-cpu", CPU[accel]]


def boot(
    image: GuestImage,
    append: str,
    disks: Sequence[Path] = (),
) -> str:
    """Boot the guest until it powers off; its console output."""
    argv = [
        "qemu-system-x86_64", *accel_args(image), "-m", "256",
        "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
        "-serial", "stdio", *image.boot_args(append),
    ]
    for disk in disks:
        argv += ["-drive", f"file={disk},format=raw,if=virtio"]
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
        timeout=BOOT_TIMEOUT,
    )
    assert proc.returncode == 0, f"qemu failed: {proc.stderr}\n{proc.stdout}"
    return proc.stdout


def raw_disk(path: Path, size: int = 64 << 20) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_a_job_makes_a_filesystem_that_the_next_boot_reads_back(
    image: GuestImage, tmp_path: Path
) -> None:
    disk = raw_disk(tmp_path / "disk.raw")
    write = """set -e
mke2fs /dev/vda >/dev/null
mount -t ext4 /dev/vda /mnt
echo "written by the first boot" >/mnt/hello.txt
sync
umount /mnt
"""
    console = boot(image, job_append(write), [disk])
    assert READY_MARKER in console
    assert job_exit_status(console) == 0, console
    assert POWER_OFF_MARKER in console

    read = """set -e
mount -t ext4 -o ro /dev/vda /mnt
echo "read: $(cat /mnt/hello.txt)"
"""
    console = boot(image, job_append(read), [disk])
    assert job_exit_status(console) == 0, console
    assert "read: written by the first boot" in console


def test_a_failing_job_reports_its_exit_status(image: GuestImage) -> None:
    console = boot(image, job_append("echo about to fail\nexit 7\n"))
    assert console.index(READY_MARKER) < console.index("about to fail")
    assert job_exit_status(console) == 7


def test_each_disk_is_a_virtio_block_device_in_the_order_given(
    image: GuestImage, tmp_path: Path
) -> None:
    small = raw_disk(tmp_path / "small.raw", 8 << 20)
    large = raw_disk(tmp_path / "large.raw", 32 << 20)
    job = 'for d in vda vdb; do echo "$d sectors $(cat /sys/block/$d/size)"; done'
    console = boot(image, job_append(job), [small, large])
    assert job_exit_status(console) == 0, console
    assert f"vda sectors {(8 << 20) // 512}" in console
    assert f"vdb sectors {(32 << 20) // 512}" in console


def test_the_largest_job_the_command_line_takes_arrives_intact(image: GuestImage) -> None:
    # Random letters barely compress, so the job fills the command line almost to the byte;
    # a job cut short would fail to gunzip (status 125), not run.
    letters = random.Random(8).choices(string.ascii_letters, k=4096)

    def job(n: int) -> str:
        return "echo big job ran\n#" + "".join(letters[:n]) + "\n"

    def fits(n: int) -> bool:
        try:
            job_append(job(n))
        except JobTooLarge:
            return False
        return True

    n = max(n for n in range(0, len(letters), 8) if fits(n))
    append = job_append(job(n))
    assert MAX_COMMAND_LINE - 16 < len(append) <= MAX_COMMAND_LINE
    console = boot(image, append)
    assert job_exit_status(console) == 0, console
    assert "big job ran" in console


def _interactive(image: GuestImage, lines: Sequence[str]) -> str:
    """Boot without a job, type `lines` once the shell's prompt is up (typed ahead of it,
    the first characters can be lost while the serial port is set up), until power off."""
    argv = ["qemu-system-x86_64", *accel_args(image), "-m", "256", "-nodefaults",
            "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio",
            *image.boot_args(kernel_append())]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    output = bytearray()

    def read() -> None:
        while chunk := proc.stdout.read1(4096):  # type: ignore[union-attr]
            output.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while b"/ # " not in output:
            assert time.monotonic() < deadline, f"no shell prompt: {output.decode()!r}"
            time.sleep(0.05)
        for line in lines:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
            time.sleep(0.2)
        proc.wait(BOOT_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    return output.decode(errors="replace")


def test_without_a_job_the_console_gets_a_shell(image: GuestImage) -> None:
    console = _interactive(image, ["echo shell-$((6*7))", "exit"])
    assert "shell-42" in console
    assert job_exit_status(console) is None
    assert POWER_OFF_MARKER in console

