"""Disk image files in the formats qemu-img knows (qcow2, vmdk, ...), read and written by
qemu-img itself: we only probe files and run conversions, so every format, and every
quirk of one, is qemu's to get right. The VDI end of a conversion is an NBD URL (see
sheep.gateway.loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from sheep.errors import InvalidParams, SheepError

FORMATS = ("qcow2", "vmdk", "vdi", "vhdx", "vpc", "raw")

_EXTENSIONS = {".qcow2": "qcow2", ".qcow": "qcow2", ".vmdk": "vmdk", ".vdi": "vdi",
               ".vhdx": "vhdx", ".vhd": "vpc", ".vpc": "vpc"}
_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_TIMEOUT = 60.0  # for probes; conversions run as long as they need

Progress = Callable[[int, int], None]


class ImageError(SheepError):
    """qemu-img cannot read or write the image"""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidParams(f"unknown image format {fmt!r} (one of {', '.join(FORMATS)})")
    return fmt


def format_for_path(path: str) -> str:
    """The format an export writes when not told: the file's extension if it names one we
    know (disk.qcow2, disk.vhd), else raw, which is what export wrote before formats."""
    return _EXTENSIONS.get(os.path.splitext(path)[1].lower(), "raw")


def local(path: str) -> str:
    """A file name qemu-img cannot take for a protocol ("nbd:x", "json:{...}"): it looks
    for "proto:" only before the first slash."""
    return os.path.abspath(path)


def qemu_img_available() -> bool:
    return shutil.which("qemu-img") is not None


def _qemu_img() -> str:
    found = shutil.which("qemu-img")
    if found is None:
        raise ImageError("qemu-img is not installed (apt install qemu-utils)")
    return found


def _reason(stderr: bytes) -> str:
    """qemu-img's own complaint, on one line and without its "qemu-img: " prefix."""
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    text = "; ".join(ln.removeprefix("qemu-img: ") for ln in lines[-3:])
    return text or "failed"


async def _run(*args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        _qemu_img(), *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(_TIMEOUT):
            out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise ImageError(_reason(err))
    return out


async def probe(path: str, fmt: str | None = None) -> ImageInfo:
    """The image's format (detected unless `fmt` is given) and virtual size."""
    args = ["info", "--output=json"] + (["-f", fmt] if fmt else []) + [local(path)]
    try:
        info = json.loads(await _run(*args))
    except ImageError as exc:
        reason = str(exc).removeprefix(f"Could not open '{local(path)}': ")
        raise ImageError(f"{path}: {reason}") from None
    return ImageInfo(str(info["format"]), int(info["virtual-size"]))


async def convert(source: str, source_fmt: str, target: str, target_fmt: str, *,
                  target_exists: bool = False, target_is_zero: bool = False,
                  options: tuple[str, ...] = (), size: int = 0,
                  progress: Progress | None = None) -> None:
    """qemu-img convert, thin: zero ranges of the source are not written (-S, the
    default), and `target_is_zero` tells qemu-img it need not zero the target first.
    `progress` gets (done, size) from qemu-img's percentages."""
    args = ["convert", "-p", "-W", "-f", source_fmt, "-O", target_fmt]
    if target_exists:
        args.append("-n")
        if target_is_zero:
            args.append("--target-is-zero")
    for opt in options:
        args += ["-o", opt]
    proc = await asyncio.create_subprocess_exec(
        _qemu_img(), *args, source, target, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.ensure_future(proc.stderr.read())
    try:
        await _follow(proc.stdout, size, progress)
        err = await errors
        await proc.wait()
    except BaseException:
        errors.cancel()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise ImageError(f"qemu-img convert: {_reason(err)}")
    if progress is not None:
        progress(size, size)


async def _follow(stdout: asyncio.StreamReader, size: int, progress: Progress | None) -> None:
    """Read qemu-img -p's "(12.50/100%)\\r" updates until it closes its stdout."""
    pending = b""
    while chunk := await stdout.read(4096):
        pending += chunk
        found = _PERCENT.findall(pending)
        pending = pending[-32:]
        if found and progress is not None:
            progress(min(size, int(float(found[-1]) * size / 100)), size)
