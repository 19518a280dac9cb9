"""VDI write locks on a real cluster: one writer at a time, held by an etcd lease, visible in
`dog vdi lock list`, breakable with `dog vdi lock unlock` (a live holder's only with
--force), gone by itself when the holder dies; no delete of a VDI in use; and creating
one name from two places at once has exactly one winner."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest

from sheep.errors import StaleLock, VdiExists, VdiLocked
from sheep.oid import ObjType, oid_type, oid_vdi
from sheep.vdi.manager import VdiManager, open_manager
from sheep.vdi.registry import LOCK_TTL

from ..cluster import BIN, Cluster, all_objects_on_disk, dog_async, vdi_read

MiB = 1 << 20


@pytest.fixture
async def m(cluster: Cluster) -> AsyncIterator[VdiManager]:
    async with open_manager(cluster.etcd_url, holder="test-writer") as manager:
        yield manager


async def _dog(cluster: Cluster, *args: str, input: bytes | None = None) -> tuple[int, str, str]:
    rc, out, err = await dog_async(*args, address=cluster.address, input=input)
    return rc, out.decode(errors="replace"), err.decode(errors="replace")


def _one_line_error(err: str) -> str:
    assert err.startswith("dog: ") and err.count("\n") == 1, err
    return err[len("dog: "):].strip()


async def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := await predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)
    return value


def _inode_vdis(cluster: Cluster) -> set[int]:
    return {oid_vdi(o) for o in all_objects_on_disk(cluster) if oid_type(o) == ObjType.INODE}


# -- holding and refusing -----------------------------------------------------------------


async def test_an_open_writer_holds_a_leased_lock_that_lock_list_shows(
    cluster: Cluster, m: VdiManager
) -> None:
    await m.create("held", 8 * MiB)
    vol = await m.open("held", writable=True)
    try:
        kv = await m.registry.kv.get(m.registry.lock_key("held"))
        assert kv is not None and kv.lease != 0  # the lock lives and dies with a lease
        rc, out, _ = await _dog(cluster, "vdi", "lock", "list", "--json")
        assert rc == 0
        [lock] = json.loads(out)["locks"]
        assert (lock["name"], lock["holder"], lock["pid"]) == ("held", "test-writer",
                                                               os.getpid())
        assert lock["host"] == socket.gethostname() and lock["since"] <= time.time()
        rc, out, _ = await _dog(cluster, "vdi", "lock", "list")
        assert rc == 0 and out.splitlines()[1].split()[:2] == ["held", "test-writer"]
        rc, out, _ = await _dog(cluster, "vdi", "info", "held", "--json")
        assert '"locked_by": "test-writer"' in out
    finally:
        await vol.close()
    assert (await m.state()).locks == {}
    assert await m.registry.kv.get(m.registry.lock_key("held")) is None


async def test_a_second_writer_is_refused_while_readers_go_on(
    cluster: Cluster, m: VdiManager
) -> None:
    await m.create("busy", 8 * MiB)
    await m.create("other", MiB)
    async with await m.open("busy", writable=True) as vol:
        await vol.write(4096, b"from the holder")
        with pytest.raises(VdiLocked, match="open for writing by test-writer"):
            await m.open("busy", writable=True)
        for args in (["vdi", "write", "busy", "0"], ["vdi", "resize", "busy", "1G"],
                     ["vdi", "delete", "busy"], ["vdi", "flatten", "busy"]):
            rc, out, err = await _dog(cluster, *args, input=b"intruder")
            assert rc == 1 and out == "", args
            msg = _one_line_error(err)
            assert msg.startswith(f"VDI 'busy' is open for writing by test-writer (pid "
                                  f"{os.getpid()} on {socket.gethostname()}), which is "
                                  f"running: stop it first"), msg
            assert "dog vdi lock unlock --force busy" in msg
        rc, out, _ = await _dog(cluster, "vdi", "read", "busy", "4096", "15")
        assert rc == 0 and out == "from the holder"
        rc, _, _ = await _dog(cluster, "vdi", "write", "other", "0", input=b"free")
        assert rc == 0  # other VDIs are not affected
    assert await vdi_read(m, "busy", 0, 8) == bytes(8)
    assert (await m.state()).lookup("busy").size == 8 * MiB


async def test_lock_unlock_refuses_a_live_holder_and_names_it(
    cluster: Cluster, m: VdiManager
) -> None:
    await m.create("live", 8 * MiB)
    async with await m.open("live", writable=True) as vol:
        rc, out, err = await _dog(cluster, "vdi", "lock", "unlock", "live")
        assert rc == 1 and out == ""
        assert _one_line_error(err) == (
            f"VDI 'live' is locked by test-writer (pid {os.getpid()} on "
            f"{socket.gethostname()}), which is running; --force breaks the lock anyway, "
            f"and that writer stops")
        assert "live" in (await m.state()).locks
        await vol.write(0, b"still mine")  # the holder was not disturbed
    assert await vdi_read(m, "live", 0, 10) == b"still mine"


async def test_lock_unlock_force_breaks_a_live_lock_and_its_holder_stops_writing(
    cluster: Cluster, m: VdiManager
) -> None:
    await m.create("stale", 8 * MiB)
    vol = await m.open("stale", writable=True)
    try:
        await vol.write(0, b"old holder")
        rc, out, _ = await _dog(cluster, "vdi", "lock", "unlock", "stale", "--force",
                                "--json")
        assert rc == 0
        assert json.loads(out) == {"unlocked": "stale", "holder": "test-writer",
                                   "host": socket.gethostname(), "pid": os.getpid()}
        assert (await m.state()).locks == {}
        rc, _, err = await _dog(cluster, "vdi", "write", "stale", "100", input=b"new holder")
        assert rc == 0, err

        async def refused() -> bool:
            try:
                await vol.write(200, b"too late")
            except (StaleLock, VdiLocked):
                return True
            return False

        # the nodes refuse its first write (the new holder fenced the VDI), or it finds
        # out at its next lease refresh (every TTL/3)
        await _wait_for(refused, LOCK_TTL / 3 + 5, "the old holder to notice")
    finally:
        await vol.close()
    assert await vdi_read(m, "stale", 100, 10) == b"new holder"
    rc, _, err = await _dog(cluster, "vdi", "lock", "unlock", "stale")
    assert rc == 1 and _one_line_error(err) == "VDI 'stale' is not locked"


_HOLDER = """
import asyncio, sys
from sheep.vdi.manager import open_manager

async def main(url, name):
    async with open_manager(url, holder="doomed") as m:
        vol = await m.open(name, writable=True)
        await vol.write(0, b"written by the doomed holder")
        print("ready", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def _start_holder(cluster: Cluster, name: str) -> asyncio.subprocess.Process:
    """A separate process that holds NAME open for writing (_HOLDER), once it says so."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, cluster.etcd_url, name,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        line = await holder.stdout.readline()  # type: ignore[union-attr]
    assert line == b"ready\n", (await holder.stderr.read()).decode()  # type: ignore
    return holder


async def test_lock_unlock_breaks_the_lock_of_a_dead_holder_without_force(
    cluster: Cluster, m: VdiManager
) -> None:
    """A killed holder's lease outlives it by up to LOCK_TTL: meanwhile writers are told
    it is gone, and a plain unlock frees the VDI at once."""
    await m.create("orphan", 8 * MiB)
    holder = await _start_holder(cluster, "orphan")
    holder.kill()
    await holder.wait()
    assert "orphan" in (await m.state()).locks  # the lease still runs
    rc, _, err = await _dog(cluster, "vdi", "write", "orphan", "0", input=b"x")
    assert rc == 1
    assert _one_line_error(err) == (
        f"VDI 'orphan' is open for writing by doomed (pid {holder.pid} on "
        f"{socket.gethostname()}), which is gone: its lock expires within {LOCK_TTL} s, or "
        f"'dog vdi lock unlock orphan' breaks it now")
    rc, out, err = await _dog(cluster, "vdi", "lock", "unlock", "orphan")
    assert rc == 0, err
    assert out == f"lock on orphan broken (it was held by doomed (pid {holder.pid} on " \
                  f"{socket.gethostname()}))\n"
    assert "orphan" not in (await m.state()).locks


async def test_delete_of_a_vdi_a_vm_uses_is_refused_naming_the_vm(
    cluster: Cluster, m: VdiManager
) -> None:
    await m.create("vmdisk", 8 * MiB)
    label = f"VM web (on {socket.gethostname()}; dog vm stop web)"
    await m.registry.add_user("vmdisk", "vm:web", label, lease=None)
    rc, out, err = await _dog(cluster, "vdi", "delete", "vmdisk")
    assert rc == 1 and out == ""
    assert _one_line_error(err) == (f"VDI 'vmdisk' is in use by {label}: stop it before "
                                    f"deleting the VDI")
    assert "vmdisk" in (await m.state()).working


async def test_delete_of_a_vdi_an_nbd_client_writes_is_refused_naming_the_gateway(
    nbd_cluster: Cluster, tmp_path
) -> None:
    c = nbd_cluster
    async with open_manager(c.etcd_url) as m:
        await m.create("served", 8 * MiB)
        # qemu-io with no -c waits for commands on stdin, its NBD connection open
        client = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", c.nbd_url("served"), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=tmp_path)
        try:
            async def held() -> bool:
                return "served" in (await m.state()).locks

            await _wait_for(held, 30, "the gateway to open the VDI for writing")
            gateway_pid = c.nodes[0].proc.pid  # type: ignore[union-attr]
            rc, out, err = await _dog(c, "vdi", "delete", "served")
            assert rc == 1 and out == ""
            msg = _one_line_error(err)
            assert re.match(
                f"VDI 'served' is open for writing by the gateway of sheep node [0-9a-f]{{8}} "
                rf"\(pid {gateway_pid} on {re.escape(socket.gethostname())}\), which is "
                f"running: stop it first", msg), msg
            assert "served" in (await m.state()).working
        finally:
            client.stdin.close()  # type: ignore[union-attr]
            async with asyncio.timeout(30):
                await client.wait()


async def test_delete_of_a_snapshot_a_read_only_client_reads_is_refused_naming_the_gateway(
    nbd_cluster: Cluster, tmp_path
) -> None:
    """A reader holds no lock, yet deleting what it reads would reclaim the blocks from
    under it: the gateway records its read-only clients, and delete (plain or -r) names
    it. Once the client is gone, the delete goes ahead."""
    c = nbd_cluster
    async with open_manager(c.etcd_url) as m:
        await m.create("base", 8 * MiB)
        await m.snapshot("base", "s1")
        client = await asyncio.create_subprocess_exec(
            "qemu-io", "-r", "-f", "raw", c.nbd_url("base@s1"), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=tmp_path)
        try:
            async def read() -> list[str]:
                return await m.registry.users("base@s1")

            await _wait_for(read, 30, "the gateway to record its reader")
            gateway = rf"the gateway of sheep node [0-9a-f]{{8}} \(pid {c.nodes[0].proc.pid} " \
                      rf"on {re.escape(socket.gethostname())}\) for a read-only client"
            for args in (["-s", "s1", "base"], ["-r", "base"]):
                rc, out, err = await _dog(c, "vdi", "delete", *args)
                assert rc == 1 and out == "", err
                assert re.fullmatch(f"snapshot 'base@s1' is in use by {gateway}: stop it "
                                    f"before deleting the snapshot", _one_line_error(err)), err
            assert [r.label for r in (await m.state()).family("base")] == ["base@s1", "base"]
        finally:
            client.stdin.close()  # type: ignore[union-attr]
            async with asyncio.timeout(30):
                await client.wait()

        async def gone() -> bool:
            return not await m.registry.users("base@s1")

        await _wait_for(gone, 30, "the gateway to drop its reader's record")
        rc, out, err = await _dog(c, "vdi", "delete", "-s", "s1", "base")
        assert rc == 0, err


@pytest.mark.slow
async def test_the_lock_of_a_killed_holder_goes_away_within_its_ttl(
    cluster: Cluster, m: VdiManager
) -> None:
    await m.create("doomed", 8 * MiB)
    holder = await _start_holder(cluster, "doomed")
    try:
        locks = (await m.state()).locks
        assert locks["doomed"].pid == holder.pid and locks["doomed"].holder == "doomed"

        holder.kill()
        killed = time.monotonic()
        await holder.wait()
        # a snapshot asked of the dead holder must not hang or leave half a snapshot
        snap = asyncio.ensure_future(_dog(cluster, "vdi", "snapshot", "doomed", "-s", "s"))

        async def unlocked() -> bool:
            return "doomed" not in (await m.state()).locks

        await _wait_for(unlocked, LOCK_TTL + 5, "the dead holder's lock to expire")
        assert time.monotonic() - killed <= LOCK_TTL + 5
        async with asyncio.timeout(30):
            rc, _, err = await snap
        state = await m.state()
        if rc == 0:
            assert state.lookup("doomed", "s").snapshot
        else:
            assert "writer" in _one_line_error(err)
            assert all(not r.snapshot for r in state.records.values())
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
    # what the holder wrote before it died is there, and a new writer can take over
    assert await vdi_read(m, "doomed", 0, 28) == b"written by the doomed holder"
    async with await m.open("doomed", writable=True) as vol:
        await vol.write(0, b"W")
    assert await vdi_read(m, "doomed", 0, 3) == b"Wri"


# -- one name, two creators ---------------------------------------------------------------


def test_concurrent_dog_creates_of_one_name_have_exactly_one_winner(cluster: Cluster) -> None:
    names = [f"race{i}" for i in range(4)]
    for name in names:
        procs = [subprocess.Popen([str(BIN / "dog"), "vdi", "create", name, "1G", "--json",
                                   "-a", cluster.address],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        results = [(p.wait(60), *p.communicate()) for p in procs]
        assert sorted(rc for rc, _, _ in results) == [0, 1], results
        [(_, _, err)] = [r for r in results if r[0] == 1]
        # --json: the loser's error is JSON too
        assert json.loads(err) == {"error": f"VDI '{name}' already exists",
                                   "code": "vdi_exists"}
    listing = subprocess.run([str(BIN / "dog"), "vdi", "list", "--json", "-a", cluster.address],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    rows = json.loads(listing)["vdis"]
    assert sorted(r["name"] for r in rows) == names
    assert _inode_vdis(cluster) == {r["id"] for r in rows}  # the losers left no inode


async def test_racing_creates_through_the_api_have_exactly_one_winner(
    cluster: Cluster, m: VdiManager
) -> None:
    async with open_manager(cluster.etcd_url) as m2:
        for i in range(8):
            name = f"api-race{i}"
            results = await asyncio.gather(
                *(mgr.create(name, 64 * MiB) for mgr in (m, m2, m, m2)), return_exceptions=True)
            winners = [r for r in results if not isinstance(r, BaseException)]
            losers = [r for r in results if isinstance(r, BaseException)]
            assert len(winners) == 1, results
            assert all(isinstance(e, VdiExists) and name in str(e) for e in losers), losers
    state = await m.state()
    assert sorted(state.working) == [f"api-race{i}" for i in range(8)]
    assert _inode_vdis(cluster) == set(state.records)
