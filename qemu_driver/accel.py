"""Which accelerator QEMU can really use here.

/dev/kvm existing (even running a boot sector) proves little: on some hosts KVM aborts on the
first MSR write of the CPU model a real guest needs, on others it boots a boot sector and
then stops a real kernel within its first second (`KVM internal error ... emulation failure`)
while QEMU stays alive. So the probe boots a real kernel (the VM's own, else the demo
guest's) under KVM with the `-cpu` a VM gets, with no initramfs and a root device that does
not exist: reaching the kernel's "cannot mount root" panic proves the whole kernel came up
(CPUs, memory allocators, devices). Anything else within the time bound means TCG.

The verdict is cached per host in a small JSON file, keyed by everything it depends on (QEMU's
version, the host kernel, the CPU model, the probed kernel), so a start pays for a probe once.
`SHEEP_VM_ACCEL=kvm|tcg` overrides it: the host's own, or the one a dog starting the VM on a
node carries along (qemu_driver/host.py), which wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from .errors import BadSpec

QEMU = "qemu-system-x86_64"
CPU = {"kvm": "host", "tcg": "max"}  # tcg: `max` gives the guest RDRAND (fast entropy)
PROBE_TIMEOUT = 30.0  # s; a kernel reaches its root mount in about 1 s under KVM
PROBE_MARKER = "VFS: Unable to mount root fs"
# QEMU's own words when KVM gives up on a guest (it then stays alive, paused)
KVM_FAILURES = ("KVM internal error", "emulation failure", "kvm run failed")
OVERRIDE = "SHEEP_VM_ACCEL"


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str  # why, in a user's words
    key: str = ""  # what the verdict depends on ("" when forced)


def cache_dir() -> Path:
    """$SHEEP_CACHE_DIR, else /var/cache/sheep for root, else ~/.cache/sheep."""
    if override := os.environ.get("SHEEP_CACHE_DIR"):
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/sheep")
    return Path.home() / ".cache" / "sheep"


@cache
def _qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "no qemu"
    return out.splitlines()[0].strip() if out else "no qemu"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown cpu"


def probe_key(kernel: Path, qemu: str = QEMU) -> str:
    """Everything the probe's verdict depends on, hashed: QEMU, host kernel, CPU, the guest
    kernel probed (by content size and mtime, cheap and changed by any rebuild)."""
    try:
        st = kernel.stat()
        image = f"{kernel.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        image = f"{kernel}:missing"
    parts = [_qemu_version(qemu), os.uname().release, _cpu_model(), image]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def boots(kernel: Path, accel: str, *, qemu: str = QEMU,
          timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Whether `kernel` boots to its root mount under `accel`, and what was seen."""
    with tempfile.TemporaryDirectory(prefix="sheep-accel-probe-") as tmp:
        console, errors = Path(tmp) / "console", Path(tmp) / "qemu.err"
        argv = [qemu, "-accel", accel, "-cpu", CPU[accel], "-m", "128", "-nodefaults",
                "-no-user-config", "-display", "none", "-no-reboot", "-monitor", "none",
                "-serial", f"file:{console}", "-kernel", str(kernel),
                "-append", "console=ttyS0 panic=-1 quiet root=/dev/sheep-probe "
                           "rdinit=/sheep-probe"]
        started = time.monotonic()
        try:
            with open(errors, "wb") as err:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=err)
        except OSError as exc:
            return False, f"cannot run {qemu}: {exc}"
        try:
            return _watch(proc, console, errors, started, timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _watch(proc: subprocess.Popen, console: Path, errors: Path, started: float,
           timeout: float) -> tuple[bool, str]:
    def read(path: Path) -> str:
        with contextlib.suppress(OSError):
            return path.read_text(errors="replace")
        return ""

    while True:
        elapsed = time.monotonic() - started
        if PROBE_MARKER in read(console):
            return True, f"a kernel booted to its root mount in {elapsed:.1f}s"
        err = read(errors)
        if any(word in err for word in KVM_FAILURES):
            return False, "QEMU: " + _last_lines(err)
        if proc.poll() is not None:
            if PROBE_MARKER in read(console):
                continue
            detail = _last_lines(err) or _last_lines(read(console)) or "no output"
            return False, f"QEMU exited with status {proc.returncode}: {detail}"
        if elapsed > timeout:
            return False, f"the kernel did not reach its root mount within {timeout:.0f}s"
        time.sleep(0.05)


def _last_lines(text: str, count: int = 2) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-count:])


def probe(kernel: Path | None, *, qemu: str = QEMU, timeout: float = PROBE_TIMEOUT
          ) -> AccelChoice:
    """The probe's verdict for `kernel`, without the cache."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "no usable /dev/kvm")
    if kernel is None or not kernel.is_file():
        return AccelChoice("tcg", "no kernel to probe KVM with (build the demo guest: "
                                  "make setup)")
    ok, seen = boots(kernel, "kvm", qemu=qemu, timeout=timeout)
    key = probe_key(kernel, qemu)
    return AccelChoice("kvm", f"probe: {seen} under KVM", key) if ok else \
        AccelChoice("tcg", f"probe: KVM failed ({seen})", key)


def _cache_file() -> Path:
    return cache_dir() / "accel.json"


def _cached(key: str) -> AccelChoice | None:
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        entry = json.loads(_cache_file().read_text())[key]
        return AccelChoice(entry["accel"], entry["reason"] + " (cached)", key)
    return None


def _remember(choice: AccelChoice) -> None:
    """Atomically add `choice` to the cache file; a cache that cannot be written only costs
    the next start another probe."""
    path = _cache_file()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            entries = json.loads(path.read_text())
            if not isinstance(entries, dict):
                entries = {}
        except (OSError, ValueError):
            entries = {}
        entries[choice.key] = {**asdict(choice), "probed": time.time()}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(path)


def choose_accel(kernel: Path | None, *, qemu: str = QEMU, forced: str = "") -> AccelChoice:
    """`forced` when given (what the starting dog's SHEEP_VM_ACCEL asks of a node hosting
    the VM), else `SHEEP_VM_ACCEL` here, else the cached verdict for this host and kernel,
    else a fresh probe (then cached)."""
    if forced:
        return _forced(forced, "given to dog vm start")
    if here := os.environ.get(OVERRIDE, ""):
        return _forced(here, "")
    usable = kernel is not None and kernel.is_file() and os.access("/dev/kvm", os.R_OK | os.W_OK)
    if usable and (hit := _cached(probe_key(kernel, qemu))) is not None:
        return hit
    choice = probe(kernel, qemu=qemu)
    if choice.key:
        _remember(choice)
    return choice


def _forced(accel: str, whose: str) -> AccelChoice:
    """The accelerator an override names; BadSpec when it names none."""
    given = f" {whose}" if whose else ""
    if accel not in CPU:
        raise BadSpec(f"{OVERRIDE}={accel!r}{given}: expected one of {', '.join(CPU)}")
    return AccelChoice(accel, f"forced by {OVERRIDE}={accel}{given}")
