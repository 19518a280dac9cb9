"""A private etcd on loopback, for the embedded cluster (`sheep up`) and for tests.

Given the cluster's etcd certificate (sheep/security/local.py), it serves https only and
only to holders of a certificate of the cluster's CA, on its client and its peer URL alike:
it holds the VDI registry and the locks, so whoever may write it may do anything.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from sheep.children import die_with_parent
from sheep.etcd_users import EtcdUsers, grant_users
from sheep.security.pki import CertFiles


class EtcdNotInstalled(RuntimeError):
    pass


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class EtcdServer:
    def __init__(self, data_dir: Path, client_port: int, peer_port: int, log_path: Path,
                 *, tls: CertFiles | None = None, users: EtcdUsers | None = None) -> None:
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.log_path = log_path
        self.tls = tls  # etcd's certificate and the CA its clients' must chain to
        self.users = users  # with tls: only these certificates' holders get in
        self.proc: subprocess.Popen | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    def tls_args(self) -> list[str]:
        """Client and peer listeners: TLS with etcd's certificate, and a client
        certificate of the same CA required of whoever connects."""
        if self.tls is None:
            return []
        cert, key, ca = str(self.tls.cert), str(self.tls.key), str(self.tls.ca)
        return ["--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca,
                "--client-cert-auth",
                "--peer-cert-file", cert, "--peer-key-file", key,
                "--peer-trusted-ca-file", ca, "--peer-client-cert-auth"]

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise EtcdNotInstalled("etcd is not installed (apt-get install etcd-server)")
        client = self.url
        peer = f"{self.scheme}://127.0.0.1:{self.peer_port}"
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
                *self.tls_args(),
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
        if self.tls is not None and self.users is not None:
            try:
                grant_users(self.client_port, self.users, max(1.0, deadline - time.monotonic()))
            except RuntimeError:
                self.stop()
                raise

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
