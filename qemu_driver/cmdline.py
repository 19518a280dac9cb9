"""QEMU command lines and block-device definitions, as pure functions of a VM's spec, its
gateway and its run directory (no processes here, so they are unit-tested as data).

Disks go through QEMU's own NBD or iSCSI client straight to a sheep gateway: no qemu-nbd,
no kernel NBD device. The same `blockdev()` dict serves the command line and QMP
`blockdev-add`, so a hot-plugged disk is configured exactly like a boot-time one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sheep.names import target_name
from sheep.netaddr import host_port
from sheep.security.pki import SERVER_NAME

from .accel import CPU, QEMU
from .spec import Gateway, VmSpec, disk_id

AGENT_CHANNEL = "org.qemu.guest_agent.0"
AGENT_CHARDEV = "agent"  # the host end of that channel, as QMP's query-chardev names it
DEFAULT_RECONNECT_DELAY = 60  # s QEMU holds guest I/O while its gateway is away
CHAP_SECRET_ID = "iscsi-chap"  # the QEMU secret object holding the CHAP secret
TLS_CREDS_ID = "nbd-tls"  # the QEMU tls-creds-x509 object NBD disks start TLS with


@dataclass(frozen=True)
class RunPaths:
    """A VM's files on the host that runs it."""

    dir: Path

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def events(self) -> Path:
        """A second QMP monitor, the supervisor's own (dog keeps the first)."""
        return self.dir / "events.sock"

    @property
    def stop_requested(self) -> Path:
        """Written by `dog vm stop` before it stops QEMU: however QEMU then ends (even
        killed), that is a stop, not a crash."""
        return self.dir / "stop-requested"

    @property
    def migration_tls(self) -> Path:
        """The node's certificate for a live migration's stream, as QEMU's tls-creds-x509
        reads it (removed once QEMU loaded it)."""
        return self.dir / "migration-tls"

    @property
    def sent(self) -> Path:
        """Written by the sender of a migration once it read QEMU's last word on it (the
        completed migration, its downtime): the supervisor may then end the source QEMU."""
        return self.dir / "migration-sent"

    @property
    def console(self) -> Path:
        return self.dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def agent(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def chap_secret(self) -> Path:
        """The iSCSI CHAP secret alone (mode 0600), which QEMU reads into a secret object:
        a secret on its command line would be visible to every user in `ps`."""
        return self.dir / "iscsi-chap.secret"

    @property
    def tls(self) -> Path:
        """The NBD client's certificate as QEMU's tls-creds-x509 reads it (ca-cert.pem,
        client-cert.pem, client-key.pem; the directory 0700, the key 0600): QEMU takes a
        directory, so the key never shows on its command line."""
        return self.dir / "tls"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"


def blockdev(vdi: str, gateway: Gateway, *, reconnect_delay: int = DEFAULT_RECONNECT_DELAY,
             initiator: str = "") -> dict:
    """The `-blockdev`/`blockdev-add` arguments of one VDI's disk."""
    node = disk_id(vdi)
    if gateway.transport == "nbd":
        spec = {"driver": "nbd", "node-name": node, "export": vdi,
                "server": {"type": "inet", "host": gateway.host, "port": str(gateway.port)},
                "reconnect-delay": reconnect_delay, "discard": "unmap"}
        if gateway.tls:
            # every node's certificate names SERVER_NAME, whatever address it is reached
            # on; QEMU would otherwise check the address it dials
            spec["tls-creds"] = TLS_CREDS_ID
            spec["tls-hostname"] = SERVER_NAME
        return spec
    if gateway.transport == "iscsi":
        spec = {"driver": "iscsi", "node-name": node, "transport": "tcp",
                "portal": host_port(gateway.host, gateway.port), "target": target_name(vdi),
                "lun": 0, "discard": "unmap"}
        if initiator:
            spec["initiator-name"] = initiator
        if gateway.chap_user:
            spec["user"] = gateway.chap_user
            spec["password-secret"] = CHAP_SECRET_ID
        return spec
    raise ValueError(f"unknown transport {gateway.transport!r}")


def disk_device(vdi: str, *, bootindex: int | None = None) -> dict:
    """The `-device`/`device_add` arguments of one VDI's virtio-blk disk."""
    node = disk_id(vdi)
    dev: dict = {"driver": "virtio-blk-pci", "id": node, "drive": node}
    if bootindex is not None:
        dev["bootindex"] = bootindex
    return dev


def _device_arg(dev: dict) -> str:
    return json.dumps(dev, separators=(",", ":"))


def initiator_name(vm: str) -> str:
    return f"iqn.2026-11.io.sheep.vm:{vm}"


MIGRATION_TLS_ID = "migration-tls"  # the tls-creds-x509 object of a live migration
MIGRATION_AUTHZ_ID = "migration-authz"  # who may send a VM: nodes of the cluster only
# The client certificate's distinguished name as GnuTLS prints it: its role is its OU
NODE_DN = "*OU=node,*"


def incoming_tls_args(paths: RunPaths) -> list[str]:
    """The objects a migration's destination QEMU admits its source with: the node's
    certificate (endpoint=server), the peer's checked against the cluster's CA, and only
    a node's admitted (a client certificate of the cluster must not inject a VM)."""
    authz = {"qom-type": "authz-list", "id": MIGRATION_AUTHZ_ID, "policy": "deny",
             "rules": [{"match": NODE_DN, "policy": "allow", "format": "glob"}]}
    return ["-object", f"tls-creds-x509,id={MIGRATION_TLS_ID},dir={paths.migration_tls},"
                       "endpoint=server,verify-peer=on",
            "-object", json.dumps(authz, separators=(",", ":"))]


def qemu_argv(spec: VmSpec, gateway: Gateway, paths: RunPaths, accel: str, *,
              reconnect_delay: int = DEFAULT_RECONNECT_DELAY, qemu: str = QEMU) -> list[str]:
    """The whole command line. The console is a unix socket (`dog vm console` attaches to
    it) that QEMU also logs to a file, so the output is kept with nobody attached; QMP and
    the guest agent's channel are unix sockets in the run directory too. `-no-reboot`: a
    guest that reboots (or panics with panic=-1) stops instead of looping.

    QEMU starts paused (`-S`): its supervisor connects to the second monitor first and then
    lets the guest run, so no event of the guest's life is missed. A guest kernel that
    panics tells QEMU through the pvpanic device, and QEMU then holds it in the
    guest-panicked state for the supervisor to see (`-action panic=pause`)."""
    argv = [
        qemu, "-name", spec.name, "-accel", accel, "-cpu", CPU[accel],
        "-m", str(spec.memory), "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-S", "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-qmp", f"unix:{paths.events},server=on,wait=off",
        "-device", "pvpanic-pci", "-action", "panic=pause",
        "-chardev", f"socket,id=console,path={paths.console},server=on,wait=off,"
                    f"logfile={paths.console_log},logappend=on",
        "-serial", "chardev:console",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id={AGENT_CHARDEV},path={paths.agent},server=on,wait=off",
        "-device", f"virtserialport,chardev={AGENT_CHARDEV},name={AGENT_CHANNEL}",
    ]
    if spec.kernel:
        argv += ["-kernel", spec.kernel]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
        if spec.append:
            argv += ["-append", spec.append]
    if gateway.chap_user:
        argv += ["-object", f"secret,id={CHAP_SECRET_ID},file={paths.chap_secret},format=raw"]
    if gateway.tls:  # on the command line even for hot-plugged disks: they use it too
        argv += ["-object", f"tls-creds-x509,id={TLS_CREDS_ID},dir={paths.tls},"
                            "endpoint=client,verify-peer=on"]
    initiator = initiator_name(spec.name)
    for i, vdi in enumerate(spec.disks):
        argv += ["-blockdev", _device_arg(blockdev(vdi, gateway, reconnect_delay=reconnect_delay,
                                                   initiator=initiator))]
        boot = 0 if i == 0 and not spec.kernel else None
        argv += ["-device", _device_arg(disk_device(vdi, bootindex=boot))]
    return argv
