"""A running VM's monitor, through QEMU's own asyncio QMP library (`qemu.qmp`).

Every call is bounded: a QEMU that stopped answering must not hang dog.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from .cmdline import AGENT_CHARDEV, blockdev, disk_device
from .errors import QemuFailed
from .spec import Gateway, disk_id

TIMEOUT = 15.0


class Monitor:
    def __init__(self, client: QMPClient, timeout: float = TIMEOUT) -> None:
        self.client = client
        self.timeout = timeout

    async def execute(self, command: str, arguments: dict | None = None) -> object:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.client.execute(command, arguments)
        except ExecuteError as exc:
            raise QemuFailed(f"QEMU refused {command}: {exc.error.error.desc}") from None
        except TimeoutError:
            raise QemuFailed(f"QEMU did not answer {command} within {self.timeout:.0f}s"
                             ) from None
        except QMPError as exc:
            raise QemuFailed(f"QMP {command} failed: {exc}") from None

    async def status(self) -> str:
        """QEMU's run state: "running", "paused", "shutdown"..."""
        reply = await self.execute("query-status")
        assert isinstance(reply, dict)
        return str(reply["status"])

    async def block_devices(self) -> list[dict]:
        reply = await self.execute("query-block")
        assert isinstance(reply, list)
        return reply

    async def named_nodes(self) -> list[dict]:
        reply = await self.execute("query-named-block-nodes", {"flat": True})
        assert isinstance(reply, list)
        return reply

    async def agent_port_open(self) -> bool:
        """Whether something in the guest holds the agent's virtio-serial port open (an
        agent runs): then it is worth waiting for its answers; else there is none."""
        reply = await self.execute("query-chardev")
        assert isinstance(reply, list)
        return any(c.get("label") == AGENT_CHARDEV and c.get("frontend-open") for c in reply)

    async def pause(self) -> None:
        await self.execute("stop")

    async def resume(self) -> None:
        await self.execute("cont")

    async def powerdown(self) -> None:
        await self.execute("system_powerdown")

    async def quit(self) -> None:
        with contextlib.suppress(QemuFailed):  # QEMU may hang up before it answers
            await self.execute("quit")

    async def _disconnected(self) -> None:
        while self.client.runstate == Runstate.RUNNING:
            await self.client.runstate_changed()

    async def hotplug(self, vdi: str, gateway: Gateway, initiator: str = "") -> None:
        """blockdev-add then device_add; a failed device_add takes its blockdev back."""
        await self.execute("blockdev-add", blockdev(vdi, gateway, initiator=initiator))
        try:
            await self.execute("device_add", disk_device(vdi))
        except QemuFailed:
            with contextlib.suppress(QemuFailed):
                await self.execute("blockdev-del", {"node-name": disk_id(vdi)})
            raise

    async def unplug(self, vdi: str, timeout: float = 30.0) -> None:
        """device_del asks the guest to let go (ACPI eject); only after DEVICE_DELETED is
        the block node free to delete."""
        dev = disk_id(vdi)
        listener = EventListener("DEVICE_DELETED")
        with self.client.listen(listener):
            await self.execute("device_del", {"id": dev})

            async def deleted() -> None:
                while True:
                    event = await listener.get()
                    if event.get("data", {}).get("device") == dev:
                        return

            waiter = asyncio.ensure_future(deleted())
            gone = asyncio.ensure_future(self._disconnected())
            try:
                await asyncio.wait([waiter, gone], timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                gone.cancel()
            if gone.done() and not waiter.done():
                raise QemuFailed(f"QEMU exited while {vdi} was being detached")
            if not waiter.done() or waiter.cancelled():
                raise QemuFailed(f"the guest did not release {vdi} within {timeout:.0f}s "
                                 "(is it mounted?)")
        await self.execute("blockdev-del", {"node-name": dev})


@contextlib.asynccontextmanager
async def monitor(path: str | Path, timeout: float = TIMEOUT) -> AsyncIterator[Monitor]:
    client = QMPClient("sheep-vm")
    try:
        async with asyncio.timeout(timeout):
            await client.connect(str(path))
    except (TimeoutError, QMPError, OSError) as exc:
        raise QemuFailed(f"cannot reach QEMU's monitor at {path}: {exc}") from None
    try:
        yield Monitor(client, timeout)
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
