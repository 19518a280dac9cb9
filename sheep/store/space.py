"""How full a node's disk may get, as Ceph's nearfull and full ratios say: past the full
ratio a node refuses new objects (the allocation unit), so that reads, overwrites of what
is allocated, discards and deletes still work and space can be freed; past the nearfull
ratio it warns. The reserve above the full ratio is also what keeps etcd alive when it
shares the disk: a full data disk must not take the cluster's coordination down."""

from __future__ import annotations

import os
from dataclasses import dataclass

FULL_RATIO = 0.95
NEARFULL_RATIO = 0.85


@dataclass(frozen=True)
class Space:
    size: int  # bytes of the filesystem that non-root users may fill
    avail: int  # of them, free
    full_ratio: float = FULL_RATIO

    @property
    def ratio(self) -> float:
        """The share in use, as df counts it."""
        return 1 - self.avail / self.size if self.size else 0.0

    @property
    def state(self) -> str:
        """ok, nearfull or full."""
        if self.ratio >= self.full_ratio:
            return "full"
        return "nearfull" if self.ratio >= min(NEARFULL_RATIO, self.full_ratio) else "ok"


def space_of(path: str | os.PathLike, full_ratio: float = FULL_RATIO) -> Space:
    st = os.statvfs(path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    return Space(used + avail, avail, full_ratio)
