"""`dog vdi check`: every replica of every object a VDI references is present and identical;
with repair, bad or missing replicas are rewritten from a good one.

A good copy is the content most replicas agree on; a replica that alone differs from an
agreeing majority is the bad one. With no majority (all differ, or a 1-1 split) nothing can
tell which is right, so the object is reported and left alone.

A replica that fails its checksums is never a source. When no replica verifies, the object
is read once as a client reads it (each node then repairs, or accepts a block a crash tore
mid-write: node/repair.py) and checked again; what still verifies nowhere is lost data:
reported, unrepairable, never rewritten from an unverified copy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import xxhash

from sheep.errors import Corrupt, NoObject
from sheep.objclient import ObjectClient
from sheep.oid import oid_str

from .inode import block_oid
from .inodes import read_table
from .parallel import for_each
from .registry import VdiRecord

_PARALLEL = 8


@dataclass
class Finding:
    oid: str
    node: str
    problem: str  # "missing" | "corrupt" (fails its checksums) | "differs" | "unreadable"
    repaired: bool = False

    def as_dict(self) -> dict:
        return {"oid": self.oid, "node": self.node, "problem": self.problem,
                "repaired": self.repaired}


@dataclass
class CheckReport:
    objects: int = 0
    findings: list[Finding] = field(default_factory=list)
    unrepairable: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings and not self.unrepairable

    def as_dict(self) -> dict:
        return {"objects": self.objects, "findings": [f.as_dict() for f in self.findings],
                "unrepairable": self.unrepairable, "clean": self.clean}


async def vdi_objects(client: ObjectClient, record: VdiRecord) -> list[int]:
    """The inode and every data object the VDI's table references."""
    table = await read_table(client, record)
    return [record.inode_oid] + [block_oid(ref, i) for i, ref in enumerate(table) if ref]


async def check_vdi(
    client: ObjectClient,
    record: VdiRecord,
    *,
    repair: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    return await check_objects(client, await vdi_objects(client, record), record.block_size,
                               repair=repair, progress=progress)


async def check_objects(
    client: ObjectClient,
    oids: list[int],
    object_size: int,
    *,
    repair: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    report = CheckReport(objects=len(oids))
    done = 0

    async def one(oid: int) -> None:
        nonlocal done
        await _check_object(client, oid, object_size, repair, report)
        done += 1
        if progress is not None:
            progress(done, len(oids))

    await for_each(oids, one, _PARALLEL)
    return report


async def _check_object(
    client: ObjectClient, oid: int, size: int, repair: bool, report: CheckReport,
    *, again: bool = True,
) -> None:
    copies: dict[str, bytes | None] = {}
    problems: dict[str, str] = {}
    nodes = client.replicas(oid)
    corrupt = False
    for node in nodes:
        try:
            copies[node.node_id] = await client.read_replica(node, oid, 0, size)
        except NoObject:
            copies[node.node_id] = None
            problems[node.node_id] = "missing"
        except Corrupt:
            copies[node.node_id] = None
            problems[node.node_id] = "corrupt"
            corrupt = True
        except Exception:
            copies[node.node_id] = None
            problems[node.node_id] = "unreadable"
    if corrupt and again and all(data is None for data in copies.values()):
        try:  # no replica verifies: let the nodes repair, or accept torn blocks
            await client.read(oid, 0, size)
        except Exception:
            pass  # lost: reported below
        else:
            await _check_object(client, oid, size, repair, report, again=False)
            return
    digests = {nid: xxhash.xxh3_64_intdigest(data) for nid, data in copies.items()
               if data is not None}
    votes = Counter(digests.values())
    good_digest, agreeing = votes.most_common(1)[0] if votes else (None, 0)
    majority = agreeing > len(nodes) // 2 or (agreeing and len(votes) == 1)
    if not votes or (len(votes) > 1 and not majority):
        report.unrepairable.append(oid_str(oid))
        if not votes:  # every replica is gone: say where, nothing to repair from
            report.findings.extend(Finding(oid_str(oid), n, p) for n, p in problems.items())
        return
    for nid, digest in digests.items():
        if digest != good_digest:
            problems[nid] = "differs"
    if not problems:
        return
    good = next((copies[n] for n, d in digests.items() if d == good_digest), None)
    by_id = {n.node_id: n for n in nodes}
    for nid, problem in sorted(problems.items()):
        finding = Finding(oid_str(oid), nid, problem)
        if repair and good is not None and problem != "unreadable":
            await client.write_replica(by_id[nid], oid, good)
            finding.repaired = True
        report.findings.append(finding)

