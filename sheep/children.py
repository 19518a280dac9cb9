"""The child processes of `sheep up`: each dies with its parent, reports only what this run
of it wrote to its (appended) log, and is started again after a backoff when it dies."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def die_with_parent(argv: list[str]) -> list[str]:
    """The child gets SIGTERM when the process that started it dies, even of SIGKILL, so
    nothing of `sheep up` outlives it holding its ports. Through setpriv, not a preexec_fn:
    forking a process that runs gRPC without exec'ing at once trips gRPC's fork handlers,
    which abort the child. The signal follows the *thread* that forked: start children
    from the main thread only."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


def exit_reason(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def death_line(name: str, returncode: int, tail: str = "") -> str:
    """'NAME died (why)', with `tail` (what it last logged) when there is one."""
    why = exit_reason(returncode)
    return f"{name} died ({why}" + (f": {tail})" if tail else ")")


@dataclass
class Backoff:
    """Seconds to wait before a restart: doubling at each death, at most `cap`, back to
    `first` once the child had stayed up `stable` seconds (a node that crashes at once
    must not spin; one that crashed once a day must not wait long)."""

    first: float = 1.0
    cap: float = 30.0
    stable: float = 60.0
    _next: float = 0.0

    def delay(self, uptime: float) -> float:
        if uptime >= self.stable or not self._next:
            self._next = self.first
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay


class Child:
    """One supervised process: `launch` starts it (and waits until it is usable, if it
    likes) and returns it."""

    def __init__(self, name: str, log: Path, launch: Callable[[], subprocess.Popen]) -> None:
        self.name = name
        self.log = log
        self._launch = launch
        self.proc: subprocess.Popen | None = None
        self.backoff = Backoff()
        self.restart_at: float | None = None  # dead, to be started again then
        self._log_start = 0
        self._started = 0.0

    def start(self) -> None:
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        self._started = time.monotonic()
        self.restart_at = None
        self.proc = self._launch()

    def dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def uptime(self) -> float:
        return time.monotonic() - self._started

    def tail(self, lines: int = 3) -> str:
        """The last lines this run of it wrote (the log also holds older runs)."""
        try:
            with self.log.open("rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def death(self) -> str:
        """'NAME died (why)': with what this run last logged when it exited on its own."""
        assert self.proc is not None and self.proc.returncode is not None
        tail = self.tail() if self.proc.returncode > 0 else ""
        return death_line(self.name, self.proc.returncode, tail)
