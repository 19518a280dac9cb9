"""What a VM is (its definition) and what a running one is (its runtime record): JSON for
etcd, so that every node lists the same VMs and sees where each one runs."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields

from sheep.names import validate_name

from .errors import BadSpec

TRANSPORTS = ("nbd", "iscsi")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def validate_vm_name(name: str) -> str:
    """A VM name doubles as a QEMU `-name`, a run directory and an etcd key: keep it tame."""
    if not _NAME.match(name):
        raise BadSpec(f"VM name {name!r}: 1-63 letters, digits, '.', '_' or '-', "
                      "starting with a letter or digit")
    return name


def disk_id(vdi: str) -> str:
    """The QEMU node-name and device id of a VDI's disk. Derived from the name (not a
    counter) so that attach, detach and info agree without keeping a map; QEMU ids allow
    fewer characters than VDI names do, hence the hash."""
    return "vd" + hashlib.sha256(vdi.encode()).hexdigest()[:16]


def _load(cls, raw: bytes):
    data = json.loads(raw)
    known = {f.name for f in fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v)
                  for k, v in data.items() if k in known})


@dataclass(frozen=True)
class VmSpec:
    """A VM's definition, kept in the cluster. `kernel`/`initrd`/`append` name files on the
    host that starts the VM; without a kernel it boots from its first disk."""

    name: str
    disks: tuple[str, ...]
    memory: int = 256  # MiB
    cpus: int = 1
    transport: str = "nbd"
    kernel: str = ""
    initrd: str = ""
    append: str = ""
    created: float = 0.0
    ha: bool = False  # restarted on another node when its host dies (qemu_driver/ha.py)

    def __post_init__(self) -> None:
        validate_vm_name(self.name)
        if not self.disks:
            raise BadSpec("a VM needs at least one disk (--vdi)")
        for vdi in self.disks:
            validate_name(vdi)
        if len(set(self.disks)) != len(self.disks):
            raise BadSpec("a VDI can be attached to a VM only once")
        if self.transport not in TRANSPORTS:
            raise BadSpec(f"transport must be one of {', '.join(TRANSPORTS)}, "
                          f"not {self.transport!r}")
        if self.memory < 16:
            raise BadSpec(f"memory {self.memory} MiB is too small (16 MiB at least)")
        if not 1 <= self.cpus <= 64:
            raise BadSpec(f"cpus must be 1..64, not {self.cpus}")
        if (self.initrd or self.append) and not self.kernel:
            raise BadSpec("--initrd and --append need --kernel")

    def dump(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def load(cls, raw: bytes) -> VmSpec:
        return _load(cls, raw)


@dataclass(frozen=True)
class Gateway:
    """Where QEMU's block driver connects: one node's NBD server or iSCSI portal."""

    transport: str
    host: str
    port: int
    chap_required: bool = False  # the portal admits only initiators proving CHAP
    chap_user: str = ""  # QEMU logs in as this CHAP user (its secret: RunPaths.chap_secret)
    tls_mode: str = ""  # the NBD gateway's TLS mode as its node publishes it ("": no TLS)
    tls: bool = False  # QEMU starts TLS with the certificate in RunPaths.tls


@dataclass(frozen=True)
class VmRuntime:
    """A running VM, as its supervisor publishes it (on a lease: it vanishes with the
    supervisor, so a crashed host cannot leave a VM looking alive)."""

    name: str
    host: str  # hostname of the machine QEMU runs on
    pid: int  # QEMU's
    supervisor: int  # the supervisor's pid
    run_dir: str
    qmp: str  # unix socket paths, on `host`
    console: str
    console_log: str
    agent: str
    accel: str  # "kvm" or "tcg"
    gateway: Gateway
    disks: tuple[str, ...] = ()
    started: float = 0.0
    lease: int = 0  # the supervisor's etcd lease id (hot-plugged disks' user keys use it)
    state: str = "starting"  # QEMU's run state as the supervisor last saw it
    accel_reason: str = ""  # why this accelerator (the probe's verdict, or the override)
    fallback: str = ""  # why KVM was given up at start, when the VM was restarted under TCG
    extra: dict = field(default_factory=dict)
    node: str = ""  # the id of the sheep node hosting it (qemu_driver/host.py); "": dog's host

    def dump(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def load(cls, raw: bytes) -> VmRuntime:
        rt = _load(cls, raw)
        gw = rt.gateway if isinstance(rt.gateway, Gateway) else Gateway(**rt.gateway)
        return VmRuntime(**{**{f.name: getattr(rt, f.name) for f in fields(cls)},
                            "gateway": gw})


@dataclass(frozen=True)
class VmWant:
    """That a VM should run (vm/want/<name>): written with its runtime record when it
    starts, deleted when its run ends on purpose or by a crash, so that a VM whose record
    vanished while this stands lost its host, and HA (qemu_driver/ha.py) restarts it."""

    node: str  # the node that ran it last ("": a dog's host): not the one to restart it on
    at: float = 0.0

    def dump(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def load(cls, raw: bytes) -> VmWant:
        return _load(cls, raw)


@dataclass(frozen=True)
class VmExit:
    """How a VM's last run ended, kept in the cluster after its runtime record is gone: a
    crash stays visible (`dog vm info`, `list`, `wait`) until the VM is started again."""

    state: str  # "stopped" or "crashed"
    reason: str
    status: int | None = None  # QEMU's exit status; negative: the signal that ended it
    at: float = 0.0
    host: str = ""
    accel: str = ""
    fallback: str = ""
    run_dir: str = ""  # on `host`: its console log is still there
    node: str = ""  # the node that hosted it (its console log is read through it); "": dog

    @property
    def crashed(self) -> bool:
        return self.state == "crashed"

    def dump(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def load(cls, raw: bytes) -> VmExit:
        return _load(cls, raw)
