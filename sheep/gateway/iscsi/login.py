"""The login phase (RFC 7143 §6.2-6.3, §12.1.3), sans-I/O: Login Requests in, Login
Responses out, and at the end a LoginInfo saying who logged in to what.

Stages: security negotiation (AuthMethod; CHAP with MD5, one-way or mutual), operational
negotiation (text.negotiate_key), then full feature phase. The initiator proposes each
transition with the T bit; the target follows only when it has nothing left to do in the
current stage (CHAP unfinished keeps it in security negotiation).

The last response is not sent by this module on its own: when the initiator asks to enter
the full feature phase, `receive` sets `ready` and returns nothing, and the owner (which
may have to open the volume, or reinstate a session, first) calls `accept(tsih)` for the
final response or `refuse(status)` for a failure. Every failure is one Login Response with
a nonzero status, after which the connection must close (`failed`).

Randomness (CHAP challenges) comes from the portal, so tests are deterministic.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from dataclasses import dataclass, field
from typing import Protocol

from sheep.errors import ProtocolError

from .text import Limits, Params, TextError, encode, finish, negotiate_key, parse
from .wire import (
    MAX_TEXT,
    LoginFlag,
    LoginStatus,
    Opcode,
    Pdu,
    SeqNumbers,
    Stage,
    login_response,
)

CHAP_MD5 = 5
CHALLENGE_BYTES = 16
MIN_SECRET = 12  # bytes of a CHAP secret, at least (RFC 7143 §12.1.3: 96 bits)
NORMAL, DISCOVERY = "Normal", "Discovery"
_SECURITY_KEYS = ("AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R")


@dataclass(frozen=True)
class Chap:
    """One CHAP identity: the name sent in CHAP_N and the shared secret."""

    user: str
    secret: bytes

    @classmethod
    def parse(cls, spec: str) -> Chap:
        """USER:SECRET (the secret may contain ':'), with a secret of at least
        MIN_SECRET bytes: RFC 7143 §12.1.3 asks for 96 bits, and a short one is guessed
        offline from one captured exchange."""
        user, sep, secret = spec.partition(":")
        if not sep or not user or not secret:
            raise ValueError("expected USER:SECRET")
        if len(secret.encode()) < MIN_SECRET:
            raise ValueError(f"the secret of {user!r} is {len(secret.encode())} bytes; CHAP "
                             f"secrets must be at least {MIN_SECRET} (96 bits)")
        return cls(user, secret.encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Chap:
        """USER:SECRET from the first line of a file only its owner may read: secrets on
        a command line are visible to every user in `ps`."""
        try:
            st = os.stat(path)
            if st.st_mode & 0o077:
                raise ValueError(f"{path} may be read by others (mode "
                                 f"{stat.S_IMODE(st.st_mode):o}): chmod 600 it")
            with open(path, encoding="utf-8") as f:
                line = f.readline().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text") from None
        try:
            return cls.parse(line)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class AuthPolicy:
    """What a target demands at login. With `chap`, the initiator must prove it knows that
    secret; with `mutual` as well, the initiator must also challenge us, and we prove we
    know this one (a login without the mutual challenge is refused). Without `chap`,
    `refused` says why this initiator may not log in at all (a loopback client of another
    local user, sheep/netpeer.py): it is refused at its first request, discovery too."""

    chap: Chap | None = None
    mutual: Chap | None = None
    refused: str = ""


class Portal(Protocol):
    """What login needs to know about the targets behind this portal."""

    def canonical_target(self, name: str) -> str | None:
        """The target a name sent by an initiator designates, in its one spelling; None
        for no target (or one it cannot designate safely)."""
        ...

    def auth(self, target: str | None) -> AuthPolicy: ...

    def random(self, n: int) -> bytes: ...


@dataclass
class LoginInfo:
    session_type: str
    initiator_name: str
    target_name: str | None  # lower case; None for a discovery session
    isid: int
    tsih: int  # 0 for a new session
    cid: int
    cmdsn: int  # the session's ExpCmdSN from here on
    params: Params
    initiator_alias: str = ""


class LoginFailed(ProtocolError):
    def __init__(self, status: LoginStatus, why: str) -> None:
        super().__init__(why)
        self.status = status


def chap_response(ident: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994: MD5 over the identifier byte, the secret and the challenge."""
    return hashlib.md5(bytes([ident]) + secret + challenge).digest()


def decode_binary(value: str) -> bytes | None:
    """A CHAP binary value: 0x-prefixed hex or 0b-prefixed base64 (RFC 7143 §6.1)."""
    prefix, body = value[:2].lower(), value[2:]
    try:
        if prefix == "0x":
            return bytes.fromhex(body if len(body) % 2 == 0 else "0" + body)
        if prefix == "0b":
            return base64.b64decode(body, validate=True)
    except ValueError:
        return None
    return None


def _stage_bits(flags: int) -> tuple[int, int]:
    return (flags >> 2) & 3, flags & 3


@dataclass
class _Chap:
    ident: int = 0
    challenge: bytes = b""
    state: str = "want_a"  # want_a -> want_r -> done


@dataclass
class Login:
    """One connection's login phase. Feed each Login Request PDU to `receive`."""

    portal: Portal
    limits: Limits = field(default_factory=Limits)
    window: int = 128  # MaxCmdSN - ExpCmdSN + 1 announced during login
    statsn: int = 0
    info: LoginInfo | None = None
    ready: bool = False  # the initiator asked for the full feature phase: accept or refuse
    failed: bool = False
    refused: LoginStatus | None = None  # why, once failed
    _stage: int = -1  # -1 before the first request
    _itt: int = 0
    _pending: bytearray = field(default_factory=bytearray)
    _policy: AuthPolicy = field(default_factory=AuthPolicy)
    _authenticated: bool = False
    _method: str | None = None
    _chap: _Chap = field(default_factory=_Chap)
    _declared: bool = False
    _tpgt_sent: bool = False
    _final_pairs: list[tuple[str, str]] = field(default_factory=list)
    _final_flags: int = 0

    def receive(self, pdu: Pdu) -> list:
        """The response to one Login Request (an empty list when `ready`)."""
        try:
            return self._receive(pdu)
        except LoginFailed as exc:
            return self.refuse(exc.status)
        except TextError:
            return self.refuse(LoginStatus.INITIATOR_ERROR)

    def accept(self, tsih: int) -> list:
        """The final Login Response: the session is in the full feature phase after it."""
        assert self.ready and self.info is not None
        self.info.tsih = tsih
        return self._respond(self._final_flags, self._final_pairs, tsih=tsih)

    def refuse(self, status: LoginStatus) -> list:
        self.failed = True
        self.refused = status
        self.ready = False
        return self._respond(self._stage_flags(), [], status=status)

    # -- internals ----------------------------------------------------------------------

    def _seq(self) -> SeqNumbers:
        expcmdsn = self.info.cmdsn if self.info else 0
        return SeqNumbers(self.statsn, expcmdsn, (expcmdsn + self.window - 1) & 0xFFFFFFFF)

    def _stage_flags(self) -> int:
        return max(self._stage, 0) << 2

    def _respond(self, flags: int, pairs: list[tuple[str, str]], *, tsih: int = 0,
                 status: LoginStatus = LoginStatus.SUCCESS) -> list:
        info = self.info
        isid = info.isid if info else 0
        out = login_response(self._itt, isid, tsih, flags, self._seq(), status, encode(pairs))
        self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        return out

    def _receive(self, pdu: Pdu) -> list:
        if self.failed or self.ready:
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, "login request after the end")
        if pdu.opcode != Opcode.LOGIN_REQUEST:
            raise LoginFailed(LoginStatus.INVALID_DURING_LOGIN, "not a login request")
        flags = pdu.flags
        transit = bool(flags & LoginFlag.TRANSIT)
        more = bool(flags & LoginFlag.CONTINUE)
        csg, nsg = _stage_bits(flags)
        first = self._stage < 0
        self._itt = pdu.itt
        if first:
            if pdu.u8(3) > 0:  # Version-min: we speak version 0 only
                self._stage = csg if csg in (0, 1) else 0
                raise LoginFailed(LoginStatus.UNSUPPORTED_VERSION, "unsupported version")
            self.statsn = pdu.expstatsn
            self.info = LoginInfo(NORMAL, "", None, pdu.isid, pdu.tsih, pdu.cid, pdu.cmdsn,
                                  Params())
        assert self.info is not None
        if csg not in (Stage.SECURITY, Stage.OPERATIONAL) or (not first and csg != self._stage):
            self._stage = max(self._stage, 0)
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, f"bad current stage {csg}")
        if transit and more:
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, "T and C bits both set")
        if transit and (nsg <= csg or nsg == 2):
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, f"bad next stage {nsg}")
        self._stage = csg
        if len(self._pending) + len(pdu.data) > MAX_TEXT:
            raise LoginFailed(LoginStatus.INITIATOR_ERROR,
                              f"login text continued past {MAX_TEXT} bytes")
        self._pending += pdu.data
        if more:  # the text continues in the next request: ask for it
            return self._respond(csg << 2, [])
        pairs = parse(self._pending)
        self._pending.clear()
        out: list[tuple[str, str]] = []
        if first:
            self._first(dict(pairs), out)
        if csg == Stage.SECURITY:
            done = self._security(pairs, out)
        else:
            if self._policy.chap is not None and not self._authenticated:
                raise LoginFailed(LoginStatus.AUTH_FAILED, "authentication required")
            done = self._operational(pairs, out)
        if not (transit and done):
            return self._respond(csg << 2, out)
        flags = LoginFlag.TRANSIT | (csg << 2) | nsg
        if nsg == Stage.FULL_FEATURE:
            finish(self.info.params)
            self.ready = True
            self._final_pairs, self._final_flags = out, flags
            return []
        self._stage = nsg
        return self._respond(flags, out)

    def _first(self, keys: dict[str, str], out: list[tuple[str, str]]) -> None:
        info = self.info
        assert info is not None
        info.initiator_name = keys.get("InitiatorName", "")
        info.initiator_alias = keys.get("InitiatorAlias", "")
        if not info.initiator_name:
            raise LoginFailed(LoginStatus.MISSING_PARAMETER, "no InitiatorName")
        info.session_type = keys.get("SessionType", NORMAL)
        if info.session_type not in (NORMAL, DISCOVERY):
            raise LoginFailed(LoginStatus.SESSION_TYPE_UNSUPPORTED, "unknown SessionType")
        if info.session_type == NORMAL:
            sent = keys.get("TargetName", "")
            if not sent:
                raise LoginFailed(LoginStatus.MISSING_PARAMETER, "no TargetName")
            target = self.portal.canonical_target(sent)
            if target is None:
                raise LoginFailed(LoginStatus.NOT_FOUND, f"no target {sent}")
            info.target_name = target
            out.append(("TargetPortalGroupTag", "1"))
        self._policy = self.portal.auth(info.target_name)
        if self._policy.chap is None and self._policy.refused:
            raise LoginFailed(LoginStatus.AUTH_FAILED, self._policy.refused)

    # -- security negotiation ------------------------------------------------------------

    def _security(self, pairs: list[tuple[str, str]], out: list[tuple[str, str]]) -> bool:
        """Answer the security keys; True when authentication is complete."""
        keys = dict(pairs)
        policy = self._policy
        if self._method is None:
            offered = [m.strip() for m in keys.get("AuthMethod", "None").split(",")]
            if policy.chap is not None:
                if "CHAP" not in offered:
                    out.append(("AuthMethod", "Reject"))
                    raise LoginFailed(LoginStatus.AUTH_FAILED, "CHAP required")
                self._method = "CHAP"
            elif "None" in offered:
                self._method = "None"
                self._authenticated = True
            else:
                raise LoginFailed(LoginStatus.AUTH_FAILED, "no acceptable AuthMethod")
            if "AuthMethod" in keys:
                out.append(("AuthMethod", self._method))
        for key, value in pairs:  # operational keys may come early (RFC 7143 §6.3)
            if key not in _SECURITY_KEYS:
                answer = negotiate_key(key, value, self.info.params, self.limits)
                if answer is not None:
                    out.append(answer)
        if self._method == "CHAP" and not self._authenticated:
            self._chap_step(keys, out)
        return self._authenticated

    def _chap_step(self, keys: dict[str, str], out: list[tuple[str, str]]) -> None:
        chap = self._chap
        if chap.state == "want_a":
            if "CHAP_A" not in keys:
                return  # AuthMethod alone: the initiator sends CHAP_A next
            algorithms = [a.strip() for a in keys["CHAP_A"].split(",")]
            if str(CHAP_MD5) not in algorithms:
                out.append(("CHAP_A", "Reject"))
                raise LoginFailed(LoginStatus.AUTH_FAILED, "no CHAP algorithm in common")
            rnd = self.portal.random(1 + CHALLENGE_BYTES)
            chap.ident, chap.challenge = rnd[0], rnd[1:]
            chap.state = "want_r"
            out += [("CHAP_A", str(CHAP_MD5)), ("CHAP_I", str(chap.ident)),
                    ("CHAP_C", "0x" + chap.challenge.hex())]
            return
        if chap.state != "want_r":
            return
        policy = self._policy
        assert policy.chap is not None
        name, response = keys.get("CHAP_N"), decode_binary(keys.get("CHAP_R", ""))
        if name is None or response is None:
            raise LoginFailed(LoginStatus.AUTH_FAILED, "CHAP_N/CHAP_R missing")
        expected = chap_response(chap.ident, policy.chap.secret, chap.challenge)
        if name != policy.chap.user or not hmac.compare_digest(response, expected):
            raise LoginFailed(LoginStatus.AUTH_FAILED, "CHAP authentication failed")
        their_i, their_c = keys.get("CHAP_I"), keys.get("CHAP_C")
        if their_i is None and their_c is None:
            if policy.mutual is not None:
                raise LoginFailed(LoginStatus.AUTH_FAILED, "mutual CHAP required")
        else:
            challenge = decode_binary(their_c or "")
            if (policy.mutual is None or their_i is None or not their_i.isdigit()
                    or int(their_i) > 255 or not challenge):
                raise LoginFailed(LoginStatus.AUTH_FAILED, "mutual CHAP not possible")
            if challenge == chap.challenge:  # a reflection of our own challenge
                raise LoginFailed(LoginStatus.AUTH_FAILED, "reflected CHAP challenge")
            answer = chap_response(int(their_i), policy.mutual.secret, challenge)
            out += [("CHAP_N", policy.mutual.user), ("CHAP_R", "0x" + answer.hex())]
        chap.state = "done"
        self._authenticated = True

    # -- operational negotiation ---------------------------------------------------------

    def _operational(self, pairs: list[tuple[str, str]], out: list[tuple[str, str]]) -> bool:
        params = self.info.params
        for key, value in pairs:
            if key in _SECURITY_KEYS:
                raise LoginFailed(LoginStatus.INITIATOR_ERROR, f"{key} after security")
            answer = negotiate_key(key, value, params, self.limits)
            if answer is not None:
                out.append(answer)
        if not self._declared:
            self._declared = True
            out.append(("MaxRecvDataSegmentLength",
                        str(self.limits.max_recv_data_segment_length)))
        return True
