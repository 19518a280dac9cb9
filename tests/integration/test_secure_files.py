"""What an unprivileged user of the host can read of a secure cluster: nothing of its
disks, its metadata or its keys (data dirs 0700, keys 0600)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.localcluster import LocalCluster

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _nobody_reads(path: Path) -> bool:
    proc = subprocess.run([*NOBODY, "cat", str(path)], capture_output=True, timeout=10)
    return proc.returncode == 0


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A directory every user may enter (pytest's own tmp dirs are root's alone, which
    would hide what the cluster's own modes do)."""
    root = Path(tempfile.mkdtemp(prefix="sheep-modes-", dir="/var/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_an_unprivileged_user_reads_no_data_and_no_key(open_root: Path) -> None:
    canary = open_root / "canary"
    canary.write_text("anyone may read this")
    canary.chmod(0o644)
    assert _nobody_reads(canary)  # the probe works: a readable file is read
    cluster = LocalCluster(open_root / "c", 1, secure=True)
    try:
        cluster.up(copies=1)
    finally:
        cluster.stop()
    secrets = [*cluster.root.glob("pki/*/*.key"), *cluster.root.glob("node0/**/*"),
               *cluster.root.glob("etcd/**/*")]
    files = [p for p in secrets if p.is_file()]
    assert any(p.suffix == ".key" for p in files) and any("node0" in p.parts for p in files)
    readable = [str(p) for p in files if _nobody_reads(p)]
    assert readable == []
