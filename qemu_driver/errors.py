"""Typed errors of the VM runtime: each is one line a user can act on (dog prints it)."""

from __future__ import annotations

from sheep.errors import ClusterError, InvalidParams, SheepError


class VmError(SheepError):
    """the VM operation failed"""


class NoVm(VmError):
    """no such VM"""


class VmExists(VmError):
    """a VM of that name is already defined"""


class VmRunning(VmError):
    """the VM is running"""


class VmNotRunning(VmError):
    """the VM is not running"""


class ElsewhereError(VmError):
    """the VM runs on another host: its QEMU is reachable only from there"""


class NoGateway(ClusterError):
    """no node serves the transport the VM needs"""


class QemuFailed(VmError):
    """QEMU did not start, or refused a command"""


class BadSpec(InvalidParams):
    """the VM definition is invalid"""


class VmCrashed(VmError):
    """the VM's QEMU or guest crashed (the reason is QEMU's own)"""
