"""The small guest that demos and tests boot: Debian's cloud kernel and a busybox initramfs.

scripts/build-guest.sh builds it at set-up time (`make setup`) from Debian packages into
`.cache/guest/` (or `$SHEEP_GUEST_DIR`), so booting it never needs the network. Its /init
(qemu_driver/guest_init.sh) loads the kernel modules it needs, starts qemu-guest-agent on
its virtio-serial port (unless `sheep.agent=off`) and a watcher of the ACPI power button,
prints READY_MARKER on the serial console, then either runs the job carried on the kernel
command line and prints its exit status (JOB_EXIT_MARKER), or, without a job, gives the
console an interactive shell; either way it unmounts, syncs and powers off, so QEMU started
with `-no-reboot` exits when the guest is done. The power button (`dog vm stop`) ends the
job or shell early (POWER_BUTTON_MARKER), and the same shutdown follows.

Disks attached as virtio-blk appear as /dev/vda, /dev/vdb, ... in the order given to QEMU;
busybox's mke2fs makes ext2 and the kernel's ext4 driver mounts it (`mount -t ext4`).

Under TCG, `-cpu max` matters: it gives the guest RDRAND, without which the kernel's random
pool (and so mke2fs) waits about a second for entropy. With it the guest is "ready" about
3 s after QEMU starts (2.6 to 2.9 s measured on 2 shared cores).
"""

from __future__ import annotations

import base64
import gzip
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .accel import CPU, choose_accel

READY_MARKER = "sheep-guest: ready"
JOB_EXIT_MARKER = "sheep-guest: job exit "
POWER_OFF_MARKER = "sheep-guest: power off"
POWER_BUTTON_MARKER = "sheep-guest: power button"

# Linux on x86 keeps 2048 bytes of command line, its terminating NUL included; QEMU refuses
# a longer -append rather than let the kernel cut the job short.
MAX_COMMAND_LINE = 2047

# `panic=-1`: a guest that panics reboots at once, which `-no-reboot` turns into QEMU exiting,
# so a broken guest ends a test instead of hanging it. `quiet` keeps kernel chatter (slow
# over an emulated UART) off the console; errors still show.
_BASE_APPEND = "console=ttyS0 panic=-1"
_JOB_PARAM = "sheep.job="
_EXIT_RE = re.compile(re.escape(JOB_EXIT_MARKER) + r"(\d+)")

_REPO = Path(__file__).resolve().parents[1]


class GuestNotBuilt(FileNotFoundError):
    """The kernel or initramfs is missing: the machine has not been set up."""


class JobTooLarge(ValueError):
    """A job that would not fit on the kernel command line."""


@dataclass(frozen=True)
class GuestImage:
    """The kernel and initramfs QEMU boots directly (`-kernel`/`-initrd`), no disk image."""

    kernel: Path
    initrd: Path

    def boot_args(self, append: str) -> list[str]:
        """QEMU arguments that boot this guest with the kernel command line `append`."""
        return ["-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", append]


def guest_dir() -> Path:
    """Where scripts/build-guest.sh puts the guest (`$SHEEP_GUEST_DIR` overrides it)."""
    override = os.environ.get("SHEEP_GUEST_DIR")
    return Path(override) if override else _REPO / ".cache" / "guest"


def guest_artifacts(directory: Path | None = None) -> GuestImage:
    """The built guest; GuestNotBuilt, saying how to build it, when any part is missing."""
    directory = guest_dir() if directory is None else directory
    image = GuestImage(kernel=directory / "vmlinuz", initrd=directory / "initrd.img")
    missing = [p for p in (image.kernel, image.initrd) if not p.is_file()]
    if missing:
        raise GuestNotBuilt(
            f"guest not built ({', '.join(map(str, missing))} missing): "
            "run `make setup` (or scripts/build-guest.sh)"
        )
    return image


def kernel_append(*, quiet: bool = True) -> str:
    """The command line of a guest without a job: the interactive demo shell."""
    return f"{_BASE_APPEND} quiet" if quiet else _BASE_APPEND


def encode_job(script: str) -> str:
    """A shell script as it travels on the command line: gzip then base64, no blanks.

    gzip roughly doubles the script that fits; mtime 0 keeps equal scripts equal.
    """
    packed = gzip.compress(script.encode(), compresslevel=9, mtime=0)
    return base64.b64encode(packed).decode("ascii")


def job_append(script: str, *, quiet: bool = True, agent: bool = True) -> str:
    """The command line of a guest that runs `script` with busybox sh, then powers off.

    The script runs as root in /, stdin from /dev/null, its output on the console. Its exit
    status comes back as JOB_EXIT_MARKER + N (read it with job_exit_status); 125 means the
    job did not decode. JobTooLarge when the whole line exceeds MAX_COMMAND_LINE: about
    1.5 KB of gzipped script; pass anything bigger on a disk. `agent=False` boots a guest
    that runs no guest agent.
    """
    append = f"{kernel_append(quiet=quiet)}{'' if agent else ' sheep.agent=off'} " \
             f"{_JOB_PARAM}{encode_job(script)}"
    if len(append) > MAX_COMMAND_LINE:
        raise JobTooLarge(
            f"job makes a {len(append)}-byte kernel command line, over Linux's "
            f"{MAX_COMMAND_LINE}: shrink it or pass the bulk on a disk"
        )
    return append


def job_exit_status(console_text: str) -> int | None:
    """The job's exit status from the guest's console output; None if it never finished.

    The last marker wins, so a job that echoes the marker itself cannot fake an earlier one.
    Carriage returns (the serial console's line ends) do not matter.
    """
    found = _EXIT_RE.findall(console_text)
    return int(found[-1]) if found else None


def _demo(disks: list[str]) -> int:
    """Boot the guest with an interactive shell on this terminal; disks become /dev/vd*."""
    image = guest_artifacts()
    accel = choose_accel(image.kernel).accel
    argv = ["qemu-system-x86_64", "-accel", accel, "-cpu", CPU[accel], "-m", "256",
            "-nodefaults", "-no-reboot", "-nographic", "-serial", "mon:stdio",
            *image.boot_args(kernel_append())]
    for disk in disks:
        argv += ["-drive", f"file={disk},format=raw,if=virtio"]
    os.execvp(argv[0], argv)
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    """`python -m qemu_driver.guest [paths | demo [RAW_DISK...]]`."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["demo"]:
        return _demo(args[1:])
    if args[:1] in ([], ["paths"]):
        try:
            image = guest_artifacts()
        except GuestNotBuilt as e:
            print(e, file=sys.stderr)
            return 1
        print(f"kernel {image.kernel}\ninitrd {image.initrd}")
        return 0
    print("usage: python -m qemu_driver.guest [paths | demo [RAW_DISK...]]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
