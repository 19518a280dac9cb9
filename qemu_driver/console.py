"""A VM's serial console: its log file (kept whether or not anyone is attached) and the
interactive socket. Ctrl-] detaches, as with virsh and telnet."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import termios
import tty
from collections.abc import Awaitable, Callable
from pathlib import Path

from .errors import QemuFailed

DETACH = b"\x1d"  # Ctrl-]
# What a guest asks its terminal and the terminal answers on the input: cursor position and
# status reports (CSI 5n/6n), device attributes (CSI c, > c, = c), OSC colour and title
# queries. Live, the answer belongs to the guest; replayed from the log, the question is
# stale and the answer would reach the guest's shell as typed garbage.
_TERMINAL_QUERIES = re.compile(
    r"\x1b\[\??[56]n|\x1b\[[>=]?[0-9;]*c|\x1b\][^\x07\x1b]*\?(\x07|\x1b\\)")


def replayable(log: str) -> str:
    """Console output to show again, without the questions that make a terminal answer."""
    return _TERMINAL_QUERIES.sub("", log)


def read_log(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def send(socket_path: str | Path, text: str) -> None:
    """Type `text` on the console (e.g. a line for a job that reads the console)."""
    try:
        _, writer = await asyncio.open_unix_connection(str(socket_path))
    except OSError as exc:
        raise QemuFailed(f"cannot reach the console at {socket_path}: {exc}") from None
    writer.write(text.encode())
    await writer.drain()
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def attach(socket_path: str | Path, *, stdin_fd: int = 0, stdout=None,
                 keep_signals: bool = False) -> None:
    """Relay this terminal to the console socket until Ctrl-] (or end of input, or QEMU
    exits). With `keep_signals`, Ctrl-C still signals this process instead of going to the
    guest (`sheep up` stops everything on it)."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
    except OSError as exc:
        raise QemuFailed(f"cannot reach the console at {socket_path}: {exc}") from None
    try:
        await relay(lambda: reader.read(4096), writer.write, stdin_fd=stdin_fd, stdout=stdout,
                    keep_signals=keep_signals)
    finally:
        writer.close()


async def relay(read: Callable[[], Awaitable[bytes]], write: Callable[[bytes], None], *,
                stdin_fd: int = 0, stdout=None, keep_signals: bool = False) -> None:
    """Relay this terminal to a console, wherever it is: `read` gives its output (b"" at
    its end), `write` types on it (the socket here, or the node hosting the VM). Until
    Ctrl-], or end of input, or the console's end; an error reading the console is
    raised."""
    out = stdout or sys.stdout.buffer
    loop = asyncio.get_running_loop()
    is_tty = os.isatty(stdin_fd)
    saved = termios.tcgetattr(stdin_fd) if is_tty else None
    done = asyncio.Event()

    def on_input() -> None:
        data = os.read(stdin_fd, 4096)
        if is_tty and DETACH in data:
            data = data.split(DETACH)[0]
            done.set()
        elif not data:  # end of input: stop typing; the output goes on for `sheep up`
            loop.remove_reader(stdin_fd)
            if not keep_signals:
                done.set()
        if data:
            write(data.replace(b"\n", b"\r") if is_tty else data)

    async def pump() -> None:
        try:
            while chunk := await read():
                out.write(chunk)
                out.flush()
        finally:
            done.set()

    if is_tty:
        tty.setraw(stdin_fd)
        if keep_signals:
            mode = termios.tcgetattr(stdin_fd)
            mode[3] |= termios.ISIG
            termios.tcsetattr(stdin_fd, termios.TCSANOW, mode)
    with contextlib.suppress(OSError, ValueError):  # /dev/null, a file: output only
        loop.add_reader(stdin_fd, on_input)
    task = asyncio.ensure_future(pump())
    try:
        await done.wait()
    finally:
        loop.remove_reader(stdin_fd)
        task.cancel()
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
    with contextlib.suppress(asyncio.CancelledError):
        await task  # the console's end, or the error that ended it
