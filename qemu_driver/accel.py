"""Which accelerator QEMU can really use here.

/dev/kvm existing (even opening) proves little: on some hosts KVM runs a boot sector yet
aborts on the first MSR write of the CPU model a real guest needs. So the probe boots a
tiny boot sector with the same `-cpu` a VM would get, which must reach the debug-exit port
and end QEMU with the status it asked for; anything else means TCG.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from functools import cache
from pathlib import Path

QEMU = "qemu-system-x86_64"
CPU = {"kvm": "host", "tcg": "max"}  # tcg: `max` gives the guest RDRAND (fast entropy)
_EXIT_PORT = 0xF4
_EXIT_VALUE = 0x2A
# mov al, 0x2a; out 0xf4, al; hlt; jmp $-1 -- then the boot signature
_BOOT_SECTOR = bytes([0xB0, _EXIT_VALUE, 0xE6, _EXIT_PORT, 0xF4, 0xEB, 0xFD])
PROBE_TIMEOUT = 10.0


def _boot_sector() -> bytes:
    return _BOOT_SECTOR + bytes(510 - len(_BOOT_SECTOR)) + b"\x55\xaa"


def kvm_works(qemu: str = QEMU, timeout: float = PROBE_TIMEOUT) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="sheep-kvm-probe-") as tmp:
        image = Path(tmp) / "boot.img"
        image.write_bytes(_boot_sector())
        argv = [qemu, "-accel", "kvm", "-cpu", CPU["kvm"], "-m", "16", "-nodefaults",
                "-no-user-config", "-display", "none", "-no-reboot",
                "-device", f"isa-debug-exit,iobase={_EXIT_PORT:#x},iosize=0x04",
                "-drive", f"file={image},format=raw,if=floppy", "-boot", "a"]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return False
    # isa-debug-exit ends QEMU with (value << 1) | 1
    return proc.returncode == (_EXIT_VALUE << 1) | 1


@cache
def choose_accel(qemu: str = QEMU) -> str:
    """"kvm" when the probe boots, else "tcg" (cached for the life of the process).
    `SHEEP_VM_ACCEL=tcg|kvm` overrides the probe."""
    forced = os.environ.get("SHEEP_VM_ACCEL", "")
    if forced in CPU:
        return forced
    return "kvm" if kvm_works(qemu) else "tcg"
