"""Fencing tokens of VDI write locks on a storage node: the rules (sheep/node/fences.py)
and the service that applies them to data-plane frames (no sockets)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sheep.dataplane.codec import Frame, FrameDecoder
from sheep.dataplane.wire import REQUEST_HAS_PAYLOAD, Opcode, pack_header
from sheep.errors import Result, StaleLock
from sheep.node.fences import Fences
from sheep.node.service import ObjectService
from sheep.oid import data_oid, inode_oid
from sheep.store import ObjectStore

EPOCH = 3
VDI = 7
OID = data_oid(VDI, 4)
OTHER = data_oid(VDI + 1, 4)


def test_a_write_with_an_older_token_than_a_fence_is_refused() -> None:
    fences = Fences()
    fences.raise_to(VDI, 200)
    with pytest.raises(StaleLock):
        fences.admit(OID, 100)


def test_a_write_with_the_fenced_token_or_a_newer_one_is_taken() -> None:
    fences = Fences()
    fences.raise_to(VDI, 200)
    fences.admit(OID, 200)
    fences.admit(OID, 300)
    assert fences.floor(VDI) == 300


def test_a_write_seen_with_a_newer_token_refuses_the_older_holder() -> None:
    fences = Fences()
    fences.admit(OID, 100)
    fences.admit(OID, 200)
    with pytest.raises(StaleLock):
        fences.admit(OID, 100)


def test_a_write_with_no_lock_is_always_taken_and_raises_nothing() -> None:
    fences = Fences()
    fences.raise_to(VDI, 200)
    fences.admit(OID, 0)
    assert fences.floor(VDI) == 200


def test_floors_never_go_down() -> None:
    fences = Fences()
    fences.raise_to(VDI, 200)
    fences.raise_to(VDI, 100)
    assert fences.floor(VDI) == 200


def test_a_fence_holds_for_its_vdi_only() -> None:
    fences = Fences()
    fences.raise_to(VDI, 200)
    fences.admit(OTHER, 100)
    assert fences.floor(VDI + 1) == 100


def test_every_object_of_the_vdi_is_fenced_whatever_its_copies_and_type() -> None:
    fences = Fences()
    fences.raise_to(VDI, 200)
    for oid in (data_oid(VDI, 9, copies=2), inode_oid(VDI, copies=3)):
        with pytest.raises(StaleLock):
            fences.admit(oid, 100)


# -- the service ----------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ObjectService]:
    store = ObjectStore(tmp_path)
    yield ObjectService(store, lambda: EPOCH)
    store.close()


class Sink:
    def __init__(self) -> None:
        self.results: list[int] = []

    def send(self, header: bytes, payload: bytes | bytearray | memoryview = b"") -> None:
        frame, _ = FrameDecoder(replies=True).decode_header(bytearray(header), 0)
        self.results.append(frame.result)


def frame(opcode: int, *, payload: bytes = b"", **fields: int) -> Frame:
    """A request as the server's decoder makes it from the wire."""
    fields.setdefault("epoch", EPOCH)
    if opcode in REQUEST_HAS_PAYLOAD:
        fields["length"] = len(payload)
    dec = FrameDecoder(replies=False)
    dec.receive_data(pack_header(opcode, 1, **fields) + payload)
    (decoded,) = dec.messages()
    return decoded


def result(service: ObjectService, f: Frame) -> int:
    sink = Sink()
    service.handle(f, sink)
    (code,) = sink.results
    return code


def test_service_refuses_every_mutation_older_than_a_fence(service: ObjectService) -> None:
    assert result(service, frame(Opcode.CREATE, oid=OID, payload=b"old", token=100)) == 0
    assert result(service, frame(Opcode.FENCE, oid=inode_oid(VDI), token=200, epoch=0)) == 0
    for f in (frame(Opcode.WRITE, oid=OID, payload=b"x", token=100),
              frame(Opcode.CREATE, oid=OID, payload=b"x", token=100),
              frame(Opcode.DISCARD, oid=OID, length=4096, token=100),
              frame(Opcode.REMOVE, oid=OID, token=100)):
        assert result(service, f) == Result.STALE_LOCK
    read = frame(Opcode.READ, oid=OID, length=3)
    sink = Sink()
    service.handle(read, sink)
    assert sink.results == [0]
    assert bytes(service._store.read(OID, 0, 3)) == b"old"


def test_service_takes_the_new_holders_writes_and_unlocked_ones(
    service: ObjectService,
) -> None:
    assert result(service, frame(Opcode.FENCE, oid=inode_oid(VDI), token=200, epoch=0)) == 0
    assert result(service, frame(Opcode.CREATE, oid=OID, payload=b"new", token=200)) == 0
    assert result(service, frame(Opcode.WRITE, oid=OID, payload=b"N", token=0)) == 0
    assert bytes(service._store.read(OID, 0, 3)) == b"New"


def test_stale_lock_is_its_own_result_code() -> None:
    assert StaleLock().code == Result.STALE_LOCK
    assert Result.STALE_LOCK not in (Result.FENCED, Result.IO_ERROR)
