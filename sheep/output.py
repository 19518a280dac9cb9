"""Output that a vanished reader cannot break: `sheep up 2>&1 | tee log` loses tee first on
Ctrl-C, and the next print must not raise out of the loop that stops every child.

SIGPIPE stays ignored (Python's default), so a closed pipe is an EPIPE on write; on that (or
any other write error, such as EIO from a hung-up terminal) the stream's descriptor is
pointed at /dev/null and everything after, ours or a library's, goes there quietly."""

from __future__ import annotations

import os
import sys
from typing import TextIO


def to_devnull(fd: int) -> None:
    """Point `fd` at /dev/null: whatever is written to it after is dropped quietly."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


class _Unbreakable:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._to_devnull()
            self._stream.flush()  # what was buffered goes to /dev/null now

    def _to_devnull(self) -> None:
        to_devnull(self._stream.fileno())

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def unbreakable_output() -> None:
    """From now on, writes to sys.stdout and sys.stderr never raise."""
    if not isinstance(sys.stdout, _Unbreakable):
        sys.stdout = _Unbreakable(sys.stdout)
    if not isinstance(sys.stderr, _Unbreakable):
        sys.stderr = _Unbreakable(sys.stderr)
