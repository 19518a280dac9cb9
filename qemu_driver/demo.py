"""The VM of `sheep up --vm` (`make run`): the small guest booted from the embedded cluster,
with a VDI of its own as /dev/vda, its console on this terminal."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from sheep.security.identity import Identity
from sheep.vdi.manager import open_manager

from . import console
from .control import VmControl
from .errors import NoVm, VmError
from .guest import GuestNotBuilt, guest_artifacts, kernel_append
from .spec import VmSpec

VM = "demo"
VDI = "demo-disk"
VDI_SIZE = 1 << 30


async def run_demo(etcd_url: str, run_root: Path, identity: Identity | None = None) -> None:
    """Start (or reuse) the demo VM and relay the terminal to its console until the guest
    powers off or Ctrl-] detaches. `identity`: the admin's, for a cluster whose data plane
    takes only certificates (its disk is written through it)."""
    try:
        image = guest_artifacts()
    except GuestNotBuilt as exc:
        print(f"no demo VM: {exc}", flush=True)
        return
    async with open_manager(etcd_url, holder="sheep up (demo VM)",
                            identity=identity) as manager:
        ctl = VmControl(manager)
        if VDI not in (await manager.state()).working:
            await manager.create(VDI, VDI_SIZE)
        try:
            await ctl.vms.get(VM)
        except NoVm:
            await ctl.create(VmSpec(VM, (VDI,), memory=256, kernel=str(image.kernel),
                                    initrd=str(image.initrd), append=kernel_append()))
        rt = await ctl.vms.runtime(VM)
        if rt is None:
            rt = await ctl.start(VM, run_root=run_root, tied=True)
        print(f"vm: {VM} ({rt.accel}, pid {rt.pid}) with VDI {VDI} as /dev/vda over "
              f"{rt.gateway.transport} {rt.gateway.host}:{rt.gateway.port}; its console "
              "follows (mke2fs /dev/vda, mount -t ext4 /dev/vda /mnt ...; `exit` powers "
              "it off, Ctrl-] detaches, Ctrl-C stops everything)", flush=True)
    await console.attach(rt.console, keep_signals=True)
    print("\r\nvm: console closed (the cluster keeps running; Ctrl-C stops it)", flush=True)


async def stop_demo(etcd_url: str, timeout: float = 15.0,
                    identity: Identity | None = None) -> None:
    """The power button, as `dog vm stop` presses it; QEMU quits if the guest (slow under
    TCG on a busy machine) has not powered off within `timeout`."""
    with contextlib.suppress(VmError, OSError):
        async with open_manager(etcd_url, holder="sheep up (demo VM)",
                                identity=identity) as manager:
            ctl = VmControl(manager)
            if await ctl.vms.runtime(VM) is not None:
                how = await ctl.stop(VM, timeout=timeout)
                print(f"vm: {VM} {how}", file=sys.stderr, flush=True)
