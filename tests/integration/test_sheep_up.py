"""`sheep up`: the embedded default cluster that `make run` starts."""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ..cluster import BIN, dog_json, free_port

pytestmark = pytest.mark.slow


def _free_base_port() -> int:
    rnd = random.Random()
    for _ in range(200):
        base = rnd.randrange(20000, 50000)
        ports = [base, base + 1, base + 2, base + 100, base + 101, base + 102, base + 379,
                 base + 380]
        socks = []
        try:
            for port in ports:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _processes_using(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline:
            pids.append(int(entry.name))
    return pids


class Up:
    def __init__(self, root: Path, base: int, *extra: str, sigint_ignored: bool = False
                 ) -> None:
        self.root = root
        self.address = f"127.0.0.1:{base}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [str(BIN / "sheep"), "up", "--nodes", "3", "--copies", "3", "--dir", str(root),
             "--base-port", str(base), "--nbd-port", str(free_port()),
             "--iscsi-port", str(free_port()), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
            if sigint_ignored else None,
        )
        self._buf = b""

    def type(self, line: str) -> None:
        """A line on sheep up's input, which it relays to the demo VM's console."""
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def _read(self, until: str | None, timeout: float) -> bool:
        """Collect output until `until` shows (or, for None, until it ends); whether it did."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            chunk = os.read(fd, 65536) if ready else b""
            self._buf += chunk
            self.lines = self._buf.decode(errors="replace").splitlines()
            if until is not None and until.encode() in self._buf:
                return True
            if ready and not chunk:
                return until is None  # EOF: sheep up exited
        return False

    def wait_for(self, text: str, timeout: float = 60) -> None:
        if not self._read(text, timeout):
            raise AssertionError(f"no {text!r} from sheep up; output:\n{self._buf.decode()}")

    def interrupt(self) -> int:
        """Ctrl-C; its exit code once it has stopped, all its output read."""
        self.proc.send_signal(signal.SIGINT)
        return self.wait_stopped()

    def wait_stopped(self) -> int:
        try:
            if not self._read(None, 40):
                self.proc.send_signal(signal.SIGUSR1)  # its stacks, to see where it is stuck
                self._read(None, 1)
                raise AssertionError("sheep up did not stop within 40 s of Ctrl-C; its output:\n"
                                     + self._buf.decode(errors="replace"))
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                for pid in _processes_using(self.root):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def test_sheep_up_runs_three_nodes_and_sigint_stops_every_child(tmp_path: Path) -> None:
    root = tmp_path / "var"
    base = _free_base_port()
    up = Up(root, base)
    try:
        up.wait_for("Ctrl-C stops")
        assert any("formatted cluster" in line for line in up.lines)
        nodes = dog_json("node", "list", address=f"127.0.0.1:{base}")["nodes"]
        assert len(nodes) == 3
        assert {n["node"]["control_port"] for n in nodes} == {base, base + 1, base + 2}
        assert len(_processes_using(root)) >= 4  # etcd + 3 daemons
    finally:
        code = up.interrupt()
    assert code == 0
    assert _processes_using(root) == []


def test_sigint_stops_sheep_up_started_as_a_background_job_of_a_script(
        tmp_path: Path) -> None:
    """A non-interactive shell starts `cmd &` with SIGINT ignored, and Python keeps it
    ignored: a plain KeyboardInterrupt never came, and `kill -INT` did nothing."""
    root = tmp_path / "var"
    up = Up(root, _free_base_port(), sigint_ignored=True)
    try:
        up.wait_for("Ctrl-C stops")
    finally:
        code = up.interrupt()
    assert code == 0
    assert _processes_using(root) == []


def test_sheep_up_again_reuses_the_data(tmp_path: Path) -> None:
    root = tmp_path / "var"
    base = _free_base_port()
    first = Up(root, base)
    try:
        first.wait_for("Ctrl-C stops")
        cluster_id = dog_json("cluster", "info", address=f"127.0.0.1:{base}")["cluster_id"]
    finally:
        first.interrupt()
    second = Up(root, base)
    try:
        second.wait_for("Ctrl-C stops")
        assert not any("formatted cluster" in line for line in second.lines)
        info = dog_json("cluster", "info", address=f"127.0.0.1:{base}")
        assert info["cluster_id"] == cluster_id
    finally:
        assert second.interrupt() == 0


def test_sheep_up_with_a_vm_shows_the_demo_guests_console_and_ctrl_c_powers_it_off(
        tmp_path: Path) -> None:
    root = tmp_path / "var"
    up = Up(root, _free_base_port(), "--vm")
    try:
        up.wait_for("/ # ", timeout=90)  # the guest's shell prompt: typing earlier is lost
        vm = dog_json("vm", "info", "demo", address=up.address)
        assert vm["state"] == "running" and vm["disks"] == ["demo-disk"]
        up.type("echo $((6 * 7))")
        up.wait_for("42", timeout=30)  # typed on its console, answered on sheep up's output
    finally:
        code = up.interrupt()
    assert code == 0
    assert "vm: demo powered off" in up.lines
    assert _processes_using(root) == []  # QEMU and its supervisor too
