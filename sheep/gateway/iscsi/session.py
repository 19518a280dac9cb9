"""Sessions (RFC 7143 §4.2.2, §6.3.5), sans-I/O: the CmdSN window, command ordering,
TSIH allocation, session reinstatement and the unit attentions a reset leaves behind.

A session outlives none of its connections here (ErrorRecoveryLevel 0, MaxConnections 1):
it ends when its connection ends. Still the session is its own object, because CmdSN
numbering, the ISID/TSIH identity and unit attentions belong to the session (the I_T
nexus), not to a TCP connection, and a new login may reinstate it.

The window is a credit scheme: MaxCmdSN = ExpCmdSN - 1 + (depth - commands in progress),
so an initiator that respects it never has more than `depth` SCSI commands with us, and
MaxCmdSN never moves backwards (RFC 7143 §4.2.2.1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .text import Params

MASK = 0xFFFFFFFF
QUEUE_DEPTH = 128


def sn_lt(a: int, b: int) -> bool:
    """a < b in 32-bit serial number arithmetic (RFC 1982)."""
    return a != b and ((b - a) & MASK) < (1 << 31)


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


@dataclass
class Session:
    tsih: int
    isid: int
    initiator_name: str
    target_name: str | None  # None: a discovery session
    params: Params
    exp_cmdsn: int
    depth: int = QUEUE_DEPTH
    in_flight: int = 0  # admitted non-immediate SCSI commands not yet answered
    unit_attention: bool = False  # a reset happened: the next command hears of it
    connection: Any = None  # the connection core serving the session
    _held: dict[int, Any] = field(default_factory=dict)  # CmdSN -> item, ahead of ExpCmdSN

    @property
    def discovery(self) -> bool:
        return self.target_name is None

    @property
    def max_cmdsn(self) -> int:
        return (self.exp_cmdsn - 1 + max(self.depth - self.in_flight, 0)) & MASK

    def in_window(self, cmdsn: int) -> bool:
        return sn_le(self.exp_cmdsn, cmdsn) and sn_le(cmdsn, self.max_cmdsn)

    def admit(self, cmdsn: int, item: Any) -> list[Any]:
        """Items (in CmdSN order) that may be acted on now that `item` arrived with
        `cmdsn`. An item ahead of ExpCmdSN waits for the gap to fill; one outside the
        window is dropped silently, as RFC 7143 §4.2.2.1 demands (returns [])."""
        if not self.in_window(cmdsn) or cmdsn in self._held:
            return []
        if cmdsn != self.exp_cmdsn:
            self._held[cmdsn] = item
            return []
        out = [item]
        self.exp_cmdsn = (self.exp_cmdsn + 1) & MASK
        while self.exp_cmdsn in self._held:
            out.append(self._held.pop(self.exp_cmdsn))
            self.exp_cmdsn = (self.exp_cmdsn + 1) & MASK
        return out

    def held(self) -> Iterator[Any]:
        return iter(list(self._held.values()))


class SessionTable:
    """Every session of one portal: by TSIH, and by the (initiator, ISID, target) triple
    that identifies a session across logins."""

    def __init__(self) -> None:
        self._by_tsih: dict[int, Session] = {}
        self._next = 1

    def __len__(self) -> int:
        return len(self._by_tsih)

    def get(self, tsih: int) -> Session | None:
        return self._by_tsih.get(tsih)

    def find(self, initiator: str, isid: int, target: str | None) -> Session | None:
        for session in self._by_tsih.values():
            if (session.initiator_name, session.isid, session.target_name) == (
                    initiator, isid, target):
                return session
        return None

    def of_target(self, target: str) -> list[Session]:
        return [s for s in self._by_tsih.values() if s.target_name == target]

    def create(self, isid: int, initiator: str, target: str | None, params: Params,
               exp_cmdsn: int, depth: int = QUEUE_DEPTH) -> Session:
        tsih = self._allocate()
        session = Session(tsih, isid, initiator, target, params, exp_cmdsn, depth)
        self._by_tsih[tsih] = session
        return session

    def remove(self, session: Session) -> None:
        if self._by_tsih.get(session.tsih) is session:
            del self._by_tsih[session.tsih]

    def reset(self, target: str) -> None:
        """A LOGICAL UNIT RESET or TARGET WARM RESET on `target`: every nexus to it
        (the one that asked too, SAM-5 §5.11) gets a unit attention."""
        for session in self.of_target(target):
            session.unit_attention = True

    def _allocate(self) -> int:
        for _ in range(0x10000):
            tsih, self._next = self._next, self._next % 0xFFFF + 1  # never 0
            if tsih not in self._by_tsih:
                return tsih
        raise RuntimeError("no free TSIH")
