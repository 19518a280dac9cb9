"""How many descriptors a daemon may hold, and how it shares them out.

The default soft limit (1024 on most hosts) is far below what a storage node needs: every
cached object holds two descriptors (data and checksums), a group commit duplicates those
of the objects it syncs, and every client and peer connection holds one. A node raises its
soft limit to the hard one at start, then sizes its object cache from what it got, leaving
room for its connections (whose number each plane caps).
"""

from __future__ import annotations

import resource

# descriptors kept for everything but cached objects: listening sockets, client and peer
# connections (capped per plane), LMDB, etcd and gRPC, the commit worker's by-path opens
RESERVED = 768
MIN_CACHED_OBJECTS = 16
MAX_CACHED_OBJECTS = 4096
FDS_PER_CACHED_OBJECT = 4  # data + sums, and their duplicates while a commit runs


def raise_to_hard_limit() -> int:
    """Raise this process's soft descriptor limit to its hard one; returns the new soft
    limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def object_cache_size(limit: int | None = None) -> int:
    """How many objects a store may keep open under descriptor limit `limit` (default:
    this process's soft limit)."""
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            limit = 1 << 20
    share = (limit - RESERVED) // FDS_PER_CACHED_OBJECT
    return max(MIN_CACHED_OBJECTS, min(MAX_CACHED_OBJECTS, share))
