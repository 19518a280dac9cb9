"""`sheep up`: the embedded default cluster that `make run` starts."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..cluster import BIN, dog, dog_json, free_port, processes_mentioning, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def dog_finds_the_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dog as a user runs it beside `sheep up`: credentials from the dog.conf it wrote."""
    monkeypatch.setenv("SHEEP_CONFIG", str(tmp_path / "var" / "dog.conf"))


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
    return list(processes_mentioning(str(path)))


class Up:
    def __init__(self, root: Path, base: int, *extra: str, sigint_ignored: bool = False
                 ) -> None:
        self.root = root
        self.address = f"127.0.0.1:{base}"
        self.iscsi_port = free_port()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [str(BIN / "sheep"), "up", "--nodes", "3", "--copies", "3", "--dir", str(root),
             "--base-port", str(base), "--nbd-port", str(free_port()),
             "--iscsi-port", str(self.iscsi_port), *extra],
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

    def pid_of(self, name: str) -> int:
        """The pid sheep up printed for `name` ('etcd', 'node 1') when it came up."""
        return int(re.search(rf"^{name}: pid (\d+)", self._buf.decode(), re.M).group(1))

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


def iscsi_ls(up: Up, auth: str = "") -> subprocess.CompletedProcess:
    """iscsi-ls against sheep up's portal, as USER%SECRET when `auth` is given."""
    who = f"{auth}@" if auth else ""
    return subprocess.run(["iscsi-ls", "-s", f"iscsi://{who}127.0.0.1:{up.iscsi_port}"],
                          capture_output=True, text=True, timeout=60)


def test_sheep_up_serves_iscsi_on_loopback_without_chap_by_default(root: Path) -> None:
    up = Up(root, _free_base_port())
    try:
        up.wait_for("Ctrl-C stops")
        dog("vdi", "create", "open", "8M", address=up.address)
        listed = iscsi_ls(up)
        assert listed.returncode == 0 and "open" in listed.stdout
    finally:
        assert up.interrupt() == 0


def test_sheep_up_with_a_chap_file_lets_only_its_user_into_the_portal(root: Path) -> None:
    root.mkdir(parents=True)
    chap = root.parent / "chap"
    chap.write_text("alice:alice-secret-1\n")
    chap.chmod(0o600)
    up = Up(root, _free_base_port(), "--iscsi-chap-file", str(chap))
    try:
        up.wait_for("Ctrl-C stops")
        dog("vdi", "create", "guarded", "8M", address=up.address)
        assert iscsi_ls(up).returncode != 0
        assert iscsi_ls(up, "alice%wrong-secret-1").returncode != 0
        listed = iscsi_ls(up, "alice%alice-secret-1")
        assert listed.returncode == 0 and "guarded" in listed.stdout
        assert any("CHAP" in line for line in up.lines if line.startswith("iscsi:"))
    finally:
        assert up.interrupt() == 0


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
        # its loopback gateway allows TLS: QEMU starts it, with the cluster's client cert
        assert vm["runtime"]["gateway"]["tls"]
        assert any("over nbd+TLS" in line for line in up.lines)
        up.type("echo $((6 * 7))")
        up.wait_for("42", timeout=30)  # typed on its console, answered on sheep up's output
        console = up.lines[next(i for i, line in enumerate(up.lines) if "console follows" in line):]
        # the guest's console has the terminal: no status line of sheep up's in its middle
        assert not any("cluster running" in line for line in console), console
    finally:
        code = up.interrupt()
    assert code == 0
    assert "vm: demo powered off" in up.lines
    assert _processes_using(root) == []  # QEMU and its supervisor too


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """sheep up's --dir; whatever still runs from it after the test (a failure) is killed,
    so one failed test cannot leave a cluster holding ports for the next."""
    yield tmp_path / "var"
    for pid in _processes_using(tmp_path / "var"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _node_count(address: str) -> int:
    """How many nodes `dog node list` shows; 0 while it cannot answer (etcd coming back)."""
    listing = dog("node", "list", "--json", address=address, check=False)
    return len(json.loads(listing.stdout)["nodes"]) if listing.returncode == 0 else 0


def test_a_killed_node_is_restarted_and_the_data_written_before_reads_back(root: Path) -> None:
    """A node crash must not take the embedded cluster down: it runs degraded, says so,
    and brings the node back, so self-healing can be watched with the README's set-up."""
    up = Up(root, _free_base_port())
    try:
        up.wait_for("Ctrl-C stops")
        data = os.urandom(1 << 20)
        dog("vdi", "create", "disk", "8M", address=up.address)
        subprocess.run([str(BIN / "dog"), "vdi", "write", "disk", "-a", up.address],
                       input=data, check=True, timeout=60)
        os.kill(up.pid_of("node 1"), signal.SIGKILL)
        up.wait_for("node 1 died (killed by SIGKILL); restarting it in 1s")
        up.wait_for("node 1 restarted", timeout=30)
        wait_until(lambda: _node_count(up.address) == 3, 30, "node 1 back in the node list")
        read = subprocess.run([str(BIN / "dog"), "vdi", "read", "disk", "0", str(len(data)),
                               "-a", up.address], capture_output=True, check=True, timeout=60)
        assert read.stdout == data
    finally:
        code = up.interrupt()
    assert code == 0
    assert _processes_using(root) == []


def test_with_no_restart_a_killed_node_stays_down_and_the_cluster_runs_on(root: Path) -> None:
    """--no-restart leaves the dead node down (to watch the cluster without it), and
    sheep up keeps running instead of stopping every other process."""
    up = Up(root, _free_base_port(), "--no-restart")
    try:
        up.wait_for("Ctrl-C stops")
        os.kill(up.pid_of("node 2"), signal.SIGKILL)
        up.wait_for("node 2 died (killed by SIGKILL); not restarting it (--no-restart)")
        up.wait_for("2 node(s)", timeout=30)  # its lease expired: the epoch without it
        assert up.proc.poll() is None
    finally:
        code = up.interrupt()
    assert code == 0
    assert not any("node 2 restarted" in line for line in up.lines)
    assert _processes_using(root) == []


def test_a_killed_etcd_is_restarted_and_the_nodes_carry_on(root: Path) -> None:
    """Without etcd no node can serve; sheep up notices its death like a node's."""
    up = Up(root, _free_base_port())
    try:
        up.wait_for("Ctrl-C stops")
        os.kill(up.pid_of("etcd"), signal.SIGKILL)
        up.wait_for("etcd died (killed by SIGKILL); restarting it in 1s")
        up.wait_for("etcd restarted", timeout=30)
        wait_until(lambda: _node_count(up.address) == 3, 30, "the nodes through the new etcd")
    finally:
        code = up.interrupt()
    assert code == 0
    assert _processes_using(root) == []


def test_nothing_outlives_a_sigkilled_sheep_up(root: Path) -> None:
    """SIGKILL runs no stop path: the children must die with their parent on their own,
    or etcd and the nodes keep every port with PPID 1."""
    up = Up(root, _free_base_port())
    try:
        up.wait_for("Ctrl-C stops")
        up.proc.kill()
        up.proc.wait(10)
        wait_until(lambda: _processes_using(root) == [], 30, "etcd and the nodes to exit")
    finally:
        up.wait_stopped()


def test_nothing_of_the_demo_vm_outlives_a_sigkilled_sheep_up(root: Path) -> None:
    """The demo VM's supervisor and QEMU are tied to sheep up (a VM started by `dog vm
    start` is not: it outlives dog on purpose)."""
    up = Up(root, _free_base_port(), "--vm")
    try:
        up.wait_for("/ # ", timeout=90)
        up.proc.kill()
        up.proc.wait(10)
        # the gateway node stops within its bounded steps though etcd died first
        wait_until(lambda: _processes_using(root) == [], 60,
                   "etcd, the nodes, the VM's supervisor and QEMU to exit")
        for log in root.glob("node*.log"):
            assert "Task exception was never retrieved" not in log.read_text(), log
    finally:
        up.wait_stopped()


def test_a_closed_output_pipe_does_not_skip_the_stop_path(root: Path) -> None:
    """`sheep up 2>&1 | tee log`: Ctrl-C kills tee first, and the print of 'stopping...'
    then met a broken pipe and raised out before anything was stopped."""
    up = Up(root, _free_base_port())
    try:
        up.wait_for("Ctrl-C stops")
        up.proc.stdout.close()  # the reader is gone: sheep up's next write is an EPIPE
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(40) == 0
        assert _processes_using(root) == []
    finally:
        if up.proc.poll() is None:
            up.proc.kill()


def test_a_busy_port_is_one_line_naming_it_and_starts_nothing(root: Path) -> None:
    """Found late, a busy port left etcd and two nodes running and ended in a traceback
    from the demo VM's teardown of a cluster that never formatted."""
    base = _free_base_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base + 1))
        squatter.listen()
        up = Up(root, base, "--vm")
        assert up.wait_stopped() == 1
    assert up.lines == [f"sheep: port {base + 1} (node 1's control port; choose others "
                        f"with --base-port) is in use"]
    assert _processes_using(root) == []


def test_a_start_up_failure_shows_this_runs_log_lines_not_older_ones(root: Path) -> None:
    """Logs are appended across runs: the reason given must be what this run wrote."""
    (root / "node1").mkdir(parents=True)
    (root / "node1.log").write_text("STALE: an older run's complaint\n" * 3)
    with open(root / "node1" / "sheep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a daemon still running on this dir would
        up = Up(root, _free_base_port())
        assert up.wait_stopped() == 1
    reason = next(line for line in up.lines if line.startswith("sheep: node 1 died"))
    assert "is in use by another sheep daemon" in reason
    assert "STALE" not in "\n".join(up.lines)
    assert _processes_using(root) == []


def test_make_run_passes_its_port_variables_to_sheep_up(root: Path) -> None:
    """`make run BASE_PORT=...`: the only way to move make run off ports in use."""
    base = _free_base_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base))
        squatter.listen()
        run = subprocess.run(
            ["make", "-s", "run", f"BASE_PORT={base}", f"NBD_PORT={free_port()}",
             f"ISCSI_PORT={free_port()}", f"UP_ARGS=--dir {root}"],
            cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert f"sheep: port {base} (node 0's control port" in run.stderr
