"""The facts about a logical unit that the response builders need, and nothing else.

INQUIRY, the VPD pages, MODE SENSE and READ CAPACITY are pure functions of these values;
keeping them in two small frozen dataclasses lets those builders be tested byte for byte
without a backend, and makes the advertised limits and the enforced limits one number.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class LunIdentity:
    """Who the logical unit is. The VPD 0x80/0x83 identifiers are derived from `vdi_id`,
    `snapshot` (and `cluster_id`) only, so they are stable across gateway restarts; the
    name is informational. For a disk, `vdi_id` is its serial (the id it was created with,
    kept through snapshots and rollbacks: multipath and udev keep knowing it); for a
    snapshot, its own id, in a namespace of its own, so a snapshot never takes over the
    identity its disk had. `cluster_id` keeps two clusters' VDI 7 apart for initiators that
    see both (multipath would merge equal NAA ids); it may stay 0 where only one cluster is
    ever exported."""

    name: str
    vdi_id: int
    read_only: bool
    cluster_id: int = 0
    snapshot: bool = False


@dataclass(frozen=True)
class BlockLimits:
    """What the Block Limits VPD page promises, in logical blocks; also what is enforced.

    The defaults are chosen against both Linux and libiscsi: MAXIMUM TRANSFER LENGTH of
    64 Ki blocks (32 MiB) because libiscsi's WRITE SAME(16) unmap test writes 65536 blocks
    with one WRITE(16); MAXIMUM UNMAP LBA COUNT 1 Mi blocks because libiscsi calls anything
    larger (other than "unlimited") insane; WSNZ (write same non-zero) because a
    zero-length WRITE SAME would otherwise mean "to the end of the VDI", which for a large
    thin VDI is an unbounded amount of work for one command.
    """

    block_size: int = 512
    max_transfer: int = 1 << 16
    optimal_granularity: int = 0  # the object size in blocks, when known
    max_unmap: int = 1 << 20
    max_unmap_descriptors: int = 256
    unmap_granularity: int = 8  # 4 KiB: partial objects are hole-punched, not zeroed
    max_write_same: int = 1 << 20
    max_compare_and_write: int = 255

    @classmethod
    def for_objects(cls, block_size: int = 512, object_size: int | None = None) -> BlockLimits:
        granularity = object_size // block_size if object_size else 0
        return cls(block_size=block_size, optimal_granularity=granularity,
                   unmap_granularity=max(1, 4096 // block_size))
