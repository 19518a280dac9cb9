"""py-spy on the object benchmark's daemons and client (`python -m bench.objects
--profile`), recording for the length of the shapes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy record on the daemons and on this process, for the length of the shapes."""

    def __init__(self, py_spy: str, out_dir: Path, fmt: str, rate: int) -> None:
        self.py_spy = py_spy
        self.out_dir = out_dir
        self.fmt = fmt
        self.rate = rate
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, targets: dict[str, int]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ext = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[self.fmt]
        for name, pid in targets.items():
            with open(self.out_dir / f"{name}.py-spy.log", "ab") as log:
                proc = subprocess.Popen(
                    [
                        self.py_spy, "record", "--pid", str(pid), "--rate", str(self.rate),
                        "--nonblocking", "--format", self.fmt,
                        "-o", str(self.out_dir / f"{name}.{ext}"),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.procs.append((name, proc))

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        deadline = time.monotonic() + 60
        for name, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"py-spy for {name} did not finish; killing it", file=sys.stderr)
                proc.kill()
                proc.wait(5)
        self.procs.clear()
