"""The guest agent (qemu-ga) on its virtio-serial channel, through `qemu.qmp` in its
agent mode (no greeting, no negotiation). Guests without an agent are normal: callers ask
QEMU first whether the guest holds the port open (Monitor.agent_port_open), and only then
ping it, with time for a slow guest to answer; no answer means no usable agent, and
callers fall back to pausing the VM."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from qemu.qmp import QMPClient, QMPError

from .errors import QemuFailed

PING_TIMEOUT = 10.0  # s; asked only when the guest holds the port open
FREEZE_TIMEOUT = 30.0


class GuestAgent:
    def __init__(self, client: QMPClient) -> None:
        self.client = client

    async def _call(self, command: str, timeout: float) -> object:
        try:
            async with asyncio.timeout(timeout):
                return await self.client.execute(command)
        except (TimeoutError, QMPError) as exc:
            raise QemuFailed(f"guest agent {command} failed: {exc or 'timed out'}") from None

    async def freeze(self) -> int:
        """Freeze every guest filesystem; the number frozen."""
        return int(await self._call("guest-fsfreeze-freeze", FREEZE_TIMEOUT))  # type: ignore[arg-type]

    async def thaw(self) -> None:
        await self._call("guest-fsfreeze-thaw", FREEZE_TIMEOUT)


@contextlib.asynccontextmanager
async def guest_agent(path: str | Path, ping_timeout: float = PING_TIMEOUT
                      ) -> AsyncIterator[GuestAgent | None]:
    """The agent, or None when nothing answers a guest-ping in time."""
    client = QMPClient("sheep-ga")
    client.await_greeting = False
    client.negotiate = False
    try:
        async with asyncio.timeout(ping_timeout):
            await client.connect(str(path))
            await client.execute("guest-ping")
        agent: GuestAgent | None = GuestAgent(client)
    except (TimeoutError, QMPError, OSError):
        agent = None
    try:
        yield agent
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
