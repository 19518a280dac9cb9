"""Fenced VDI write locks on a real cluster: a writer that lost its lock while paused (its
lease ran out, someone else took the VDI) has every later write refused by the storage
nodes, and the disk holds only the new writer's bytes (sheep/vdi/fence.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import pytest

from sheep.vdi.inode import block_oid
from sheep.vdi.manager import VdiManager, open_manager
from sheep.vdi.registry import LOCK_TTL

from ..cluster import Cluster, dog_async

MiB = 1 << 20
PAGE = 4096

# A writer that cannot tell it lost its lock: its lease refreshes are stopped, as when its
# etcd is cut off (HeldLease keeps writing through failed refreshes until told otherwise).
# It writes what stdin asks (OFFSET BYTE) and answers "ok" or the error's type.
_WRITER = """
import asyncio, sys
from sheep.vdi.manager import open_manager

async def main(url, name):
    async with open_manager(url, holder="paused") as m:
        vol = await m.open(name, writable=True)
        vol._lock._task.cancel()
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            offset, byte = line.split()
            try:
                await vol.write(int(offset), byte.encode() * 4096)
                print("ok", flush=True)
            except Exception as exc:
                print(type(exc).__name__, flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.fixture
async def m(cluster: Cluster) -> AsyncIterator[VdiManager]:
    async with open_manager(cluster.etcd_url, holder="new-writer") as manager:
        yield manager


class Writer:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def write(self, offset: int, byte: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{offset} {byte}\n".encode())
        async with asyncio.timeout(90):
            return (await self.proc.stdout.readline()).decode().strip()


async def _start_writer(cluster: Cluster, name: str) -> Writer:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, cluster.etcd_url, name, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        line = await proc.stdout.readline()  # type: ignore[union-attr]
    assert line == b"ready\n", (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    return Writer(proc)


async def _lock_gone(m: VdiManager, name: str) -> None:
    deadline = time.monotonic() + LOCK_TTL + 10
    while await m.registry.lock_holder(name) is not None:
        assert time.monotonic() < deadline, "the paused writer's lock never expired"
        await asyncio.sleep(0.2)


async def test_a_paused_writer_whose_lock_moved_has_every_write_refused(
    cluster: Cluster, m: VdiManager
) -> None:
    record = await m.create("fenced", 16 * MiB)
    block = record.block_size
    old = await _start_writer(cluster, "fenced")
    try:
        assert await old.write(0, "a") == "ok"
        assert await old.write(block, "a") == "ok"
        os.kill(old.proc.pid, signal.SIGSTOP)
        await _lock_gone(m, "fenced")
        new = await m.open("fenced", writable=True)
        try:
            await new.write(0, b"b" * PAGE)
            await new.write(2 * block, b"b" * PAGE)
            os.kill(old.proc.pid, signal.SIGCONT)
            # the nodes refuse its first write; then it knows its lock is lost and
            # sends no more (in a block of its own, in one it never wrote)
            assert await old.write(0, "z") == "StaleLock"
            for offset in (block + PAGE, 3 * block):
                assert await old.write(offset, "z") == "VdiLocked"
            data = bytes(await new.read(0, 4 * block))
            table = list(new.table)
        finally:
            await new.close()
    finally:
        os.kill(old.proc.pid, signal.SIGCONT)
        old.proc.kill()
        await old.proc.wait()
    assert data[:PAGE] == b"b" * PAGE and data[2 * block:2 * block + PAGE] == b"b" * PAGE
    assert data[block:block + PAGE] == b"a" * PAGE  # written before it lost the lock
    assert b"z" not in data
    for index, ref in enumerate(table):  # on every replica, not just the one read
        if ref:
            for node in m.client.view.record.nodes:  # type: ignore[union-attr]
                replica = await m.client.read_replica(node, block_oid(ref, index), 0, block)
                assert b"z" not in replica


async def test_admin_writes_with_no_lock_go_on_after_a_vdi_was_fenced(
    cluster: Cluster, m: VdiManager
) -> None:
    """A clone's and a snapshot's new inodes are written by no holder (token 0), and
    `dog vdi write` takes the lock anew with a newer token: none is refused."""
    await m.create("admin", 8 * MiB)
    async with await m.open("admin", writable=True) as vol:
        await vol.write(0, b"first")
    for args in (("vdi", "snapshot", "admin", "-s", "s1"),
                 ("vdi", "clone", "admin", "-s", "s1", "copy"),
                 ("vdi", "write", "admin", "0")):
        rc, _, err = await dog_async(*args, address=cluster.address, input=b"again")
        assert rc == 0, (args, err)
    async with await m.open("copy") as vol:
        assert bytes(await vol.read(0, 5)) == b"first"
    async with await m.open("admin") as vol:
        assert bytes(await vol.read(0, 5)) == b"again"
