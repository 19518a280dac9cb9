"""NodeMeta: the node's metadata in one LMDB environment at DIR/meta.lmdb.

Sub-databases:

- ``node``: small string settings (node id, cluster id, ...), utf-8 key -> utf-8 value.
- ``objects``: the object index, oid (8-byte big-endian) -> epoch (u32) + version (u64).
- ``epochs``: the epoch log, epoch (8-byte big-endian) -> opaque bytes.

Every write transaction is durable when it returns (sync=True, metasync=True), so callers on
the event loop must run the object-index writes in a worker thread (ObjectStore does, and
group-commits them). The environment may be used from several threads.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from sheep.errors import NoSpace, StoreIOError
from sheep.store.fileio import private_dir

ENV_NAME = "meta.lmdb"
MAP_SIZE = 1 << 30

_OID = struct.Struct(">Q")
_EPOCH_KEY = struct.Struct(">Q")
_OBJ_INFO = struct.Struct(">IQ")


@contextmanager
def _lmdb_errors() -> Iterator[None]:
    try:
        yield
    except lmdb.MapFullError as e:
        raise NoSpace(f"node metadata is full: {e}") from e
    except lmdb.Error as e:
        raise StoreIOError(f"node metadata: {e}") from e


class NodeMeta:
    """Node metadata kept in LMDB under ``path/meta.lmdb`` (``path`` is the node directory)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path) / ENV_NAME
        private_dir(self.path)
        with _lmdb_errors():
            self._env = lmdb.open(
                str(self.path),
                map_size=MAP_SIZE,
                subdir=True,
                sync=True,
                metasync=True,
                max_dbs=8,
                mode=0o600,
            )
            self._objects = self._env.open_db(b"objects")
            self._epochs = self._env.open_db(b"epochs")
            self._node = self._env.open_db(b"node")

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> NodeMeta:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- node identity --------------------------------------------------------------------

    def get(self, key: str) -> str | None:
        with _lmdb_errors(), self._env.begin(db=self._node) as txn:
            value = txn.get(key.encode())
        return None if value is None else bytes(value).decode()

    def set(self, key: str, value: str) -> None:
        with _lmdb_errors(), self._env.begin(db=self._node, write=True) as txn:
            txn.put(key.encode(), value.encode())

    # -- object index ---------------------------------------------------------------------

    def update_objects(self, put: dict[int, tuple[int, int]], drop: Iterable[int] = ()) -> None:
        """In one transaction: delete the ``drop`` oids, then record the ``put`` entries."""
        with _lmdb_errors(), self._env.begin(db=self._objects, write=True) as txn:
            for oid in drop:
                txn.delete(_OID.pack(oid))
            for oid, (epoch, version) in put.items():
                txn.put(_OID.pack(oid), _OBJ_INFO.pack(epoch, version))

    def record_objects(self, entries: dict[int, tuple[int, int]]) -> None:
        self.update_objects(entries)

    def drop_objects(self, oids: Iterable[int]) -> None:
        self.update_objects({}, oids)

    def object_info(self, oid: int) -> tuple[int, int] | None:
        """(epoch, version) of an indexed object, or None."""
        with _lmdb_errors(), self._env.begin(db=self._objects) as txn:
            value = txn.get(_OID.pack(oid))
        return None if value is None else _OBJ_INFO.unpack(value)

    def list_objects(self) -> list[int]:
        """Every indexed oid, ascending (big-endian keys sort numerically)."""
        with _lmdb_errors(), self._env.begin(db=self._objects) as txn:
            return [_OID.unpack(key)[0] for key in txn.cursor().iternext(values=False)]

    def object_epochs(self) -> list[tuple[int, int]]:
        """(oid, epoch) of every indexed object."""
        with _lmdb_errors(), self._env.begin(db=self._objects) as txn:
            return [(_OID.unpack(k)[0], _OBJ_INFO.unpack(v)[0])
                    for k, v in txn.cursor().iternext()]

    def count_objects(self) -> int:
        with _lmdb_errors(), self._env.begin(db=self._objects) as txn:
            return txn.stat(self._objects)["entries"]

    # -- epoch log ------------------------------------------------------------------------

    def put_epoch(self, epoch: int, value: bytes) -> None:
        with _lmdb_errors(), self._env.begin(db=self._epochs, write=True) as txn:
            txn.put(_EPOCH_KEY.pack(epoch), bytes(value))

    def get_epoch(self, epoch: int) -> bytes | None:
        with _lmdb_errors(), self._env.begin(db=self._epochs) as txn:
            value = txn.get(_EPOCH_KEY.pack(epoch))
        return None if value is None else bytes(value)

    def epochs(self) -> list[tuple[int, bytes]]:
        """The whole epoch log, ascending by epoch."""
        with _lmdb_errors(), self._env.begin(db=self._epochs) as txn:
            return [(_EPOCH_KEY.unpack(k)[0], bytes(v)) for k, v in txn.cursor()]
