"""What hostile-client tests share: a daemon's resident memory, read from /proc, and a raw
iSCSI initiator over a socket (the unit tests' PDU builder, sending to a real portal)."""

from __future__ import annotations

import socket

from .cluster import SheepProcess
from .unit.iscsi_initiator import TARGET, In, Initiator, split, text  # noqa: F401


def rss(pid: int) -> int:
    """Resident set size of process `pid`, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS for pid {pid}")


class LimitedNode(SheepProcess):
    """A node started with soft and hard descriptor limits of 1024 (many hosts' default)."""

    def argv(self) -> list[str]:
        return ["prlimit", "--nofile=1024:1024", "--", *super().argv()]


class _SocketSink:
    """Stands in for a Connection: what the Initiator 'feeds' goes out on the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def receive_data(self, data: bytes) -> None:
        self.sock.sendall(data)


class RawInitiator(Initiator):
    """An iSCSI initiator that sends exactly the PDUs a test builds, to a real target."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        super().__init__(_SocketSink(self.sock))  # type: ignore[arg-type]
        self._buf = b""

    def read_pdu(self) -> In:
        """The next PDU from the target (no digests)."""
        while True:
            if len(self._buf) >= 48:
                dsl = int.from_bytes(self._buf[5:8], "big")
                size = 48 + dsl + (-dsl % 4)
                if len(self._buf) >= size:
                    [pdu] = split([self._buf[:size]])
                    self._buf = self._buf[size:]
                    return pdu
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the target closed the connection")
            self._buf += chunk

    def log_in(self, target: str, **operational: str) -> None:
        """A plain login (no CHAP) to `target` with `operational` keys."""
        self.login(text(InitiatorName="iqn.1994-05.com.example:hostile", SessionType="Normal",
                        TargetName=target, AuthMethod="None"), csg=0, nsg=1)
        first = self.read_pdu()
        assert first.login_status == 0, hex(first.login_status)
        self.expstatsn = first.statsn + 1
        self.login(text(**operational), csg=1, nsg=3)
        final = self.read_pdu()
        assert final.login_status == 0 and final.flags & 0x80, hex(final.login_status)
        self.expstatsn = final.statsn + 1

    def close(self) -> None:
        self.sock.close()
