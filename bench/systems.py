"""The systems the NBD benchmark compares, each one NBD export on 127.0.0.1.

* sheep: a private etcd and three `sheep run` daemons (copies=3), node 0 serving NBD; the
  export is a thin VDI made with `dog vdi create`, so every write is replicated 3 times.
* sheep-auth: the same with every node holding a certificate of the cluster's own CA, as
  `sheep up` runs it: every data-plane link is authenticated by mutual TLS, then (being
  loopback) carries its frames in the clear: beside `sheep`, what authentication alone
  costs.
* sheep-tls: the same with `--encrypt-loopback`, so every data-plane link stays inside TLS
  as it would across a network: what authentication and encryption cost together.
* nbdkit: `nbdkit file` over a raw file of the same size in the same directory (one copy,
  the kernel page cache, no network between gateway and storage): the floor the NBD
  protocol and loopback leave for a server written in C.
* qemu-nbd: the same with `qemu-nbd -f raw`, what QEMU users would run.

Writeback defaults everywhere, so the comparison is fair: nbdkit's file plugin uses the
page cache (cache=default) and fdatasync()s on an NBD flush; qemu-nbd runs with
--cache=writeback --aio=threads; sheep does whatever its daemons do by default. fio sends
no flushes; between shapes the bench flushes every export (untimed) so one shape's dirty
data is not written back inside the next shape's window.

Why a module of its own: every process is started here with bounded waits and stopped here,
also on Ctrl-C (the servers run in their own sessions so the terminal's SIGINT reaches
only the bench, which stops them) and if the bench dies (setpriv --pdeathsig / nbdkit's
--exit-with-parent). Ports are free loopback ports chosen at run time. The sheep cluster
is launched, waited for and stopped by sheep/localcluster.py, as `sheep up` and the tests
launch theirs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sheep.children import die_with_parent
from sheep.localcluster import LocalCluster, free_port, stop_processes

NODES = 3
COPIES = 3
START_TIMEOUT = 60.0


# -- process helpers -------------------------------------------------------------------


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A server process in its own session, output to `log`, dying with the bench."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            die_with_parent(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_port(port: int, procs: list[subprocess.Popen], what: str, log: Path,
              timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(port):
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f}s:\n"
                               f"{tail(log)}")
        time.sleep(0.05)


def dog_binary() -> str:
    beside = Path(sys.executable).parent / "dog"
    if beside.exists():
        return str(beside)
    found = shutil.which("dog")
    if found is None:
        raise RuntimeError("the `dog` command is not installed (pip install -e .)")
    return found


def dog(address: str, *args: str, config: Path | None = None, timeout: float = 60.0) -> str:
    """dog at `address`, with the credentials `config` names (none for an open cluster)."""
    cmd = [dog_binary(), *args, "-a", address]
    env = {**os.environ, "SHEEP_CONFIG": str(config) if config else "none"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def nbd_flush(uri: str, timeout: float = 180.0) -> None:
    """Send one NBD flush (qemu-io opens the export, flushes and disconnects)."""
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "flush", uri],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"flush of {uri} failed ({proc.returncode}): "
                           f"{(proc.stdout + proc.stderr).strip()}")


# -- the systems -----------------------------------------------------------------------


@dataclass
class System:
    """One NBD export under test. `root` is a directory of its own."""

    root: Path
    size: int
    name: str = ""
    description: str = ""
    port: int = 0
    export: str = ""

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def check_alive(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        """The processes whose CPU counts as the server's."""
        raise NotImplementedError

    def ready(self) -> None:
        """Before each new client connection: wait until the export can be opened for
        writing again (untimed)."""

    def settle(self) -> None:
        """Untimed, between shapes: write back what the last shape dirtied."""
        self.ready()
        nbd_flush(self.uri)

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "uri": self.uri}


@dataclass
class SheepSystem(System):
    """etcd + 3 daemons, copies=3; node 0 is the NBD gateway (nbd=False: no gateway)."""

    vdi: str = "bench"
    nbd: bool = True
    secure: bool = False  # every node with a certificate: a mutual-TLS data plane
    encrypt: bool = False  # secure, and the loopback links encrypted too
    cluster: LocalCluster | None = None
    dog_config: Path | None = None  # the admin's credentials on a secure cluster

    def __post_init__(self) -> None:
        self.name = self.name or ("sheep-tls" if self.encrypt else
                                  "sheep-auth" if self.secure else "sheep")
        self.export = self.vdi
        self.description = (f"{NODES} sheep daemons, copies={COPIES}, node 0 serving NBD; "
                            f"thin VDI made with `dog vdi create`")
        if self.secure:
            self.description += ("; every node holds a certificate of the cluster's CA: "
                                 "the data-plane links are authenticated by mutual TLS")
            self.description += (", and encrypted (--encrypt-loopback)" if self.encrypt else
                                 ", then in the clear (loopback)")

    @property
    def address(self) -> str:
        assert self.cluster is not None
        return self.cluster.address

    def start(self) -> None:
        if self.nbd:
            self.port = free_port()
        gateway = ["--nbd-port", str(self.port)] if self.nbd else []
        encrypt = ["--encrypt-loopback"] if self.encrypt else []
        self.cluster = LocalCluster(
            self.root, NODES, prefix="/bench",
            node_extra=lambda i: encrypt + (gateway if i == 0 else []),
            node_names=lambda i: f"sheep node {i}",
            own_session=True, die_with_parent=True, secure=self.secure,
        )
        self.cluster.start()
        self.cluster.wait_ready(START_TIMEOUT)  # node 0 ready: its NBD gateway listens
        self.cluster.format(COPIES)
        self.dog_config = self.cluster.write_dog_config()
        if self.nbd:
            dog(self.address, "vdi", "create", self.vdi, str(self.size),
                config=self.dog_config)

    def ready(self, timeout: float = 60.0) -> None:
        """Wait until no one holds the VDI's write lock. The gateway gives up the lock of a
        closed connection asynchronously, and a client that connects before that is offered
        the export read-only (as to a second writer): fio would then fail on writes."""
        deadline = time.monotonic() + timeout
        while True:
            locks = json.loads(dog(self.address, "vdi", "lock", "list", "--json",
                                   config=self.dog_config))
            if not any(lock.get("name") == self.vdi for lock in locks.get("locks", [])):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"VDI {self.vdi} still locked after {timeout:.0f}s: {locks}")
            time.sleep(0.05)

    def check_alive(self) -> None:
        if self.cluster is not None:
            self.cluster.check_alive()

    def pids(self) -> list[int]:
        if self.cluster is None:
            return []
        etcd = self.cluster.etcd_pid()
        return self.cluster.pids() + ([etcd] if etcd else [])

    def logs(self) -> str:
        return self.cluster.logs() if self.cluster is not None else ""

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


@dataclass
class SheepAuthSystem(SheepSystem):
    secure: bool = True


@dataclass
class SheepTlsSystem(SheepSystem):
    secure: bool = True
    encrypt: bool = True


@dataclass
class FileServer(System):
    """A C NBD server over a raw file of `size` bytes (created sparse, filled through NBD)."""

    proc: subprocess.Popen | None = None

    @property
    def file(self) -> Path:
        return self.root / f"{self.name}.raw"

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.file, "wb") as f:
            f.truncate(self.size)
        self.port = free_port()
        self.proc = spawn(self.command(), self.log)
        wait_port(self.port, [self.proc], self.name, self.log)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"{self.name} exited with {code}:\n{tail(self.log)}")

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def logs(self) -> str:
        return f"--- {self.log.name} (tail) ---\n{tail(self.log)}"

    def stop(self) -> None:
        stop_processes([self.proc])


@dataclass
class NbdkitSystem(FileServer):
    def __post_init__(self) -> None:
        self.name = "nbdkit"
        self.description = ("nbdkit file plugin over a raw file (cache=default: page cache, "
                            "fdatasync on flush), default threads")

    def command(self) -> list[str]:
        return ["nbdkit", "-f", "--exit-with-parent", "-p", str(self.port), "-i", "127.0.0.1",
                "file", str(self.file)]


@dataclass
class QemuNbdSystem(FileServer):
    def __post_init__(self) -> None:
        self.name = "qemu-nbd"
        self.export = "bench"
        self.description = ("qemu-nbd -f raw --cache=writeback --aio=threads over a raw file")

    def command(self) -> list[str]:
        return ["qemu-nbd", "-f", "raw", "-p", str(self.port), "-b", "127.0.0.1",
                "-x", self.export, "--persistent", "--shared=8", "--cache=writeback",
                "--aio=threads", str(self.file)]


SYSTEMS = {"sheep": SheepSystem, "sheep-auth": SheepAuthSystem, "sheep-tls": SheepTlsSystem,
           "nbdkit": NbdkitSystem, "qemu-nbd": QemuNbdSystem}


def make_system(name: str, root: Path, size: int) -> System:
    return SYSTEMS[name](root=root / name, size=size)


def tool_versions() -> dict[str, str]:
    """First line of each tool's --version (or why not)."""
    def first_line(cmd: list[str]) -> str:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable ({type(exc).__name__})"
        lines = (proc.stdout or proc.stderr).strip().splitlines()
        return lines[0].strip() if lines else "?"

    return {
        "fio": first_line(["fio", "--version"]),
        "qemu-img": first_line(["qemu-img", "--version"]),
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "etcd": first_line(["etcd", "--version"]),
    }


def sheep_commit() -> str:
    """HEAD of the checkout the bench runs from, with "-dirty" if the work tree differs."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty else "")
