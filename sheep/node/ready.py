"""A node's readiness, for whoever started it: `sheep run --ready-file PATH` writes PATH
once the node serves (store open, control and data ports bound, joined the cluster, its
gateways listening), and removes it when it starts to stop. The file appears atomically
(written beside it, then renamed), so a reader sees no file or a whole one: JSON with the
daemon's pid and the ports it bound. Launchers wait for it instead of reading logs."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from sheep.cluster.state import NodeInfo


def write_ready_file(path: Path, info: NodeInfo) -> None:
    doc = {"pid": os.getpid(), **asdict(info)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


def remove_ready_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def read_ready_file(path: Path) -> dict | None:
    """What a ready node wrote; None while there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
