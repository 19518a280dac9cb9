"""A private etcd on loopback, for the embedded cluster (`sheep up`) and for tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from sheep.children import die_with_parent


class EtcdNotInstalled(RuntimeError):
    pass


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class EtcdServer:
    def __init__(self, data_dir: Path, client_port: int, peer_port: int, log_path: Path) -> None:
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise EtcdNotInstalled("etcd is not installed (apt-get install etcd-server)")
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # the cluster's registry: etcd itself wants 0700
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            die_with_parent([
                binary,
                "--name", "sheep",
                "--data-dir", str(self.data_dir),
                "--listen-client-urls", client,
                "--advertise-client-urls", client,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"sheep={peer}",
                "--log-level", "warn",
                "--logger", "zap",
            ]),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not _port_open(self.client_port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd did not start within {timeout}s; see {self.log_path}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
