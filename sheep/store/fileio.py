"""The object store's system calls: whole reads and writes, hole punching, and the one place
where an OSError becomes the store's typed error (a full disk is NoSpace, so a node keeps
serving reads and deletes and refuses only what allocates)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from sheep.errors import NoSpace, SheepError, StoreIOError

OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC
CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
REPLACE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC

_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})  # not an I/O error: close some
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_syncfs = _libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int


def io_error(e: OSError, what: str) -> SheepError:
    if e.errno in _NO_SPACE_ERRNOS:
        return NoSpace(f"{what}: {e.strerror}")
    return StoreIOError(f"{what}: {e}")


def pread_full(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `offset`; what lies past the end of the (sparse) file reads as 0."""
    length = len(view)
    got = os.preadv(fd, [view], offset)
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            view[got:] = bytes(length - got)
            return
        got += n


def pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    """Write all of `view` at `offset` (a pwrite may write less than asked)."""
    done = os.pwrite(fd, view, offset)
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def deallocate(fd: int, offset: int, length: int) -> None:
    """Make a range read as zeros: a punched hole, or zeros written where the file system
    punches none."""
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    end = min(offset + length, os.fstat(fd).st_size)  # past the end it reads as 0 already
    if end > offset:
        pwrite_full(fd, memoryview(bytes(end - offset)), offset)


def syncfs(fd: int) -> None:
    """Sync the whole file system `fd` lives on: the commit worker's way to make a file
    durable when it has no descriptor left to open it by (Linux 5.8+ reports writeback
    errors of the file system here, so a failed write is not missed)."""
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def private_dir(path: Path) -> None:
    """Make `path` (and its parents) a directory only its owner may enter: the objects
    in it are other people's disks. An existing one is closed up too."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def dup_or_none(fd: int | None) -> int | None:
    """A duplicate for the commit worker, or None: the worker then opens it by path."""
    if fd is None:
        return None
    try:
        return os.dup(fd)
    except OSError as e:
        if e.errno in OUT_OF_DESCRIPTORS:
            raise  # the store closes some and tries again
        return None


def unlink_missing_ok(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
