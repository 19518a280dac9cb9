"""Faults a unit test injects into the system calls the store makes."""

from __future__ import annotations

import errno
import os

import pytest


def fail_fdatasync_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The next fdatasync fails with EIO, as a disk's lost write shows; later ones run.
    Returns the list that gets the failed descriptor."""
    real, failed = os.fdatasync, []

    def fail_once(fd: int) -> None:
        if not failed:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fail_once)
    return failed
