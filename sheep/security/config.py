"""Where dog finds its cluster and its credentials without flags: `--config FILE`, else
$SHEEP_CONFIG, else ./var/dog.conf (the file `sheep up` writes with its default --dir);
`none` for either means no file.

The file is JSON: {"address": "HOST:PORT", "ca": ..., "cert": ..., "key": ...}, paths
relative to the file. It names the key, never holds it, so it may be shown or copied.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .identity import Identity
from .pki import CertFiles, PkiError

ENV = "SHEEP_CONFIG"
DEFAULT = Path("var") / "dog.conf"
NONE = "none"  # as --config or $SHEEP_CONFIG: no file, even if ./var/dog.conf is there


@dataclass(frozen=True)
class ClientConfig:
    path: Path | None  # None: no file found (an open loopback cluster)
    address: str
    identity: Identity | None


def write_config(path: Path, address: str, files: CertFiles) -> Path:
    path = Path(path)
    base = path.parent.resolve()

    def rel(p: Path) -> str:
        return os.path.relpath(Path(p).resolve(), base)

    doc = {"address": address, "ca": rel(files.ca), "cert": rel(files.cert),
           "key": rel(files.key)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


def find_config(explicit: str | None = None) -> Path | None:
    """The file dog should read: the one asked for (which must exist), or the first of
    $SHEEP_CONFIG and ./var/dog.conf that exists."""
    chosen = explicit or os.environ.get(ENV)
    if chosen:
        return None if chosen == NONE else Path(chosen)
    return DEFAULT if DEFAULT.exists() else None


def load_config(path: Path | None, default_address: str) -> ClientConfig:
    if path is None:
        return ClientConfig(None, default_address, None)
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PkiError(f"no config file {path}") from None
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise PkiError(f"config file {path} is not a JSON object")
    base = Path(path).parent
    try:
        identity = (Identity.load(base / doc["ca"], base / doc["cert"], base / doc["key"])
                    if "cert" in doc else None)
    except KeyError as exc:
        raise PkiError(f"config file {path} names a cert but no {exc.args[0]}") from None
    return ClientConfig(Path(path), str(doc.get("address") or default_address), identity)
