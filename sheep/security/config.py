"""Where dog finds its cluster and its credentials without flags: `--config FILE`, else
$SHEEP_CONFIG, else ./var/dog.conf (the file `sheep up` writes with its default --dir);
`none` for either means no file.

The file is JSON: {"address": "HOST:PORT", "ca": ..., "cert": ..., "key": ...}, paths
relative to the file. It names the key, never holds it, so it may be shown or copied.
An optional "client": {"ca": ..., "cert": ..., "key": ...} names the certificate the
disks' clients dog starts (QEMU's NBD client, for `dog vm`) show instead of dog's own: a
`client` certificate attaches disks and nothing more, where dog's is usually the admin's.
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
    client: Identity | None = None  # for the disks' clients dog starts; None: `identity`

    @property
    def disk_identity(self) -> Identity | None:
        """The certificate a VM's NBD client shows the gateway."""
        return self.client or self.identity


def write_config(path: Path, address: str, files: CertFiles,
                 client: CertFiles | None = None) -> Path:
    path = Path(path)
    base = path.parent.resolve()

    def rel(p: Path) -> str:
        return os.path.relpath(Path(p).resolve(), base)

    def named(f: CertFiles) -> dict:
        return {"ca": rel(f.ca), "cert": rel(f.cert), "key": rel(f.key)}

    doc: dict = {"address": address, **named(files)}
    if client is not None:
        doc["client"] = named(client)
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
    return ClientConfig(Path(path), str(doc.get("address") or default_address),
                        _identity(path, doc, ""), _identity(path, doc.get("client"), "client"))


def _identity(path: Path, doc: object, where: str) -> Identity | None:
    """The identity a part of the file names (None: it names no cert)."""
    if doc is None:
        return None
    what = f"{where} " if where else ""
    if not isinstance(doc, dict):
        raise PkiError(f"config file {path}: {what}is not a JSON object")
    if "cert" not in doc:
        return None
    base = Path(path).parent
    try:
        return Identity.load(base / doc["ca"], base / doc["cert"], base / doc["key"])
    except KeyError as exc:
        raise PkiError(f"config file {path} names a {what}cert but no {exc.args[0]}") from None
