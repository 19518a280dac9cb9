"""Descriptors: a node sizes its object cache from its limit, and a store that runs out
of descriptors closes cached ones and goes on, instead of failing I/O (a node once
wedged after ~480 objects under `ulimit -n 1024`: writes EIO, flushes failed)."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.fdlimit import (
    MAX_CACHED_OBJECTS,
    MIN_CACHED_OBJECTS,
    RESERVED,
    object_cache_size,
    raise_to_hard_limit,
)
from sheep.oid import data_oid
from sheep.store import ObjectStore


@pytest.fixture
def tight_limit() -> Iterator[int]:
    """This process's soft descriptor limit lowered to 64 above what it holds now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 64, hard))
    try:
        yield in_use + 64
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_object_cache_leaves_the_reserve_and_four_descriptors_an_object() -> None:
    assert object_cache_size(1024) == (1024 - RESERVED) // 4
    assert object_cache_size(256) == MIN_CACHED_OBJECTS
    assert object_cache_size(1 << 20) == MAX_CACHED_OBJECTS


def test_raising_takes_the_soft_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
    try:
        assert raise_to_hard_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_store_out_of_descriptors_closes_cached_ones_and_keeps_working(
        tmp_path: Path, tight_limit: int) -> None:
    """A cache sized for far more than the limit allows: every write, flush and read of
    400 objects still succeeds."""
    with ObjectStore(tmp_path, max_open_files=4096) as store:
        oids = [data_oid(1, i) for i in range(400)]
        for oid in oids:
            store.write(oid, 0, oid.to_bytes(8, "little"), create=True)
        await store.flush()
        assert all(store.read(oid, 0, 8) == oid.to_bytes(8, "little") for oid in oids)
        assert len(store.list_oids()) == 400


async def test_a_commit_with_no_descriptor_to_reopen_an_object_by_still_makes_it_durable(
        tmp_path: Path) -> None:
    """An object the cache closed is reopened by path to be synced; with no descriptor
    left that open fails, and the store syncs the file system instead. Before, the failed
    open counted as a failed sync: the object's data was thrown away as untrusted."""
    oids = [data_oid(1, i) for i in range(4)]
    with ObjectStore(tmp_path, max_open_files=1) as store:
        for oid in oids:
            store.write(oid, 0, oid.to_bytes(8, "little"), create=True)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            await store.flush()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert all(store.read(oid, 0, 8) == oid.to_bytes(8, "little") for oid in oids)
