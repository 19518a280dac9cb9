"""The lock holder's side of fencing: take a VDI's write lock, then fence the VDI.

Taking the lock is not enough to write: the previous holder may be paused or cut off with
writes still to send, and nodes would take them. So before its first write a new holder

1. records its token in etcd (vdi/fences/<id>, guarded by still holding the lock), for
   the nodes that are down or join later: a node reads these records after it joined
   the ring and before it takes any write (sheep/node/daemon.py), and watches them;
2. sends FENCE(id, token) to every node of the current ring and waits for all of them
   to answer (ObjectClient.fence): from then on no node of that ring takes a write with
   an older token. A node that cannot be reached makes it wait until the ring drops it,
   and a ring that moved meanwhile is fenced again.

Only then is the lock handed to the caller. The old holder's writes that reach a node
after its FENCE are refused (StaleLock); the ones that reached it before were taken before
the new holder wrote anything, so the new holder's writes come after them everywhere.
The etcd watch alone would need every node to report that it saw the record; FENCE makes
the acknowledgement the reply itself.
"""

from __future__ import annotations

from sheep.objclient import ObjectClient

from .registry import VdiLock, VdiRecord, VdiRegistry


async def fence(client: ObjectClient, registry: VdiRegistry, lock: VdiLock,
                record: VdiRecord) -> None:
    """Make every node refuse writes to `record`'s VDI older than `lock`'s token."""
    await registry.record_fence(lock, record.id)
    await client.fence(record.inode_oid, lock.token)


async def take_lock(client: ObjectClient, registry: VdiRegistry, name: str,
                    holder: str) -> tuple[VdiLock, VdiRecord | None]:
    """NAME's write lock, its working VDI fenced; and that VDI's record as of holding the
    lock (None when NAME has only snapshots). Released again if fencing fails."""
    lock = await registry.acquire_lock(name, holder)
    try:
        state = await registry.load()
        record = state.records.get(state.working.get(name, 0))
        if record is not None:
            await fence(client, registry, lock, record)
        return lock, record
    except BaseException:
        await lock.release()
        raise
