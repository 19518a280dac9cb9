"""The NBD gateway's pre-shared keys (`sheep run --nbd-tls-psk FILE`), in the file format
of GnuTLS's psktool, which nbdkit --tls-psk, QEMU's tls-creds-psk (DIR/keys.psk) and
libnbd's tls-psk-file read too: one client a line, `IDENTITY:HEXKEY`. An identity with a
':' in it, which would end it early, psktool writes `#HEX:HEXKEY`, HEX being its bytes;
so does this parser read it. Blank lines are skipped.

Refused, in one line that names the line but never shows a key: a file others may read
(the keys are every client's password), an identity given twice, one that is not printable
UTF-8 text (it becomes a name in allow-lists and logs) or longer than OpenSSL takes, a key
that is not hex, and a key under 128 bits (psktool makes 256) or over OpenSSL's 512 bytes.

PskKeys re-reads the file when it changes (its mtime, ctime, size or inode), so that an
operator adds or removes a client without a restart. A file that no longer reads (a typo,
a chmod) admits no PSK client until it is fixed, and says why in the log: failing closed,
since the likely edit is a removal.
"""

from __future__ import annotations

import logging
import os
import stat
import unicodedata
from pathlib import Path

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 16  # 128 bits
MAX_KEY_BYTES = 512  # OpenSSL's PSK_MAX_PSK_LEN, psktool's --keysize limit
MAX_IDENTITY_BYTES = 256  # OpenSSL's PSK_MAX_IDENTITY_LEN: it skips longer ones
MAX_FILE_BYTES = 1 << 20


class PskFileError(ValueError):
    """A PSK file that cannot be used, said in one line."""


def _identity(text: str) -> bytes:
    if text.startswith("#"):
        try:
            raw = bytes.fromhex(text[1:])
        except ValueError:
            raise PskFileError("identity after '#' is not hex") from None
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise PskFileError("identity is not UTF-8 text") from None
    if not text:
        raise PskFileError("empty identity")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in text):
        raise PskFileError(f"identity {text!r} holds a control or invisible character")
    raw = text.encode()
    if len(raw) > MAX_IDENTITY_BYTES:
        raise PskFileError(f"identity is {len(raw)} bytes, over the {MAX_IDENTITY_BYTES} "
                           "TLS takes")
    return raw


def _key(hexkey: str) -> bytes:
    try:
        key = bytes.fromhex(hexkey.strip())
    except ValueError:
        raise PskFileError("key is not hex") from None
    if len(key) < MIN_KEY_BYTES:
        raise PskFileError(f"key is {len(key) * 8} bits, under the {MIN_KEY_BYTES * 8} "
                           "required (psktool makes 256)")
    if len(key) > MAX_KEY_BYTES:
        raise PskFileError(f"key is {len(key)} bytes, over the {MAX_KEY_BYTES} OpenSSL "
                           "takes")
    return key


def parse_psk(text: str) -> dict[bytes, bytes]:
    """{identity (UTF-8): key} from the text of a PSK file."""
    keys: dict[bytes, bytes] = {}
    first: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        ident, colon, hexkey = line.partition(":")
        try:
            if not colon:
                raise PskFileError("no ':' between identity and key")
            identity = _identity(ident)
            if identity in keys:
                raise PskFileError(f"identity {identity.decode()!r} again (first on line "
                                   f"{first[identity]})")
            keys[identity] = _key(hexkey)
        except PskFileError as exc:
            raise PskFileError(f"line {number}: {exc}") from None
        first[identity] = number
    return keys


def read_psk_file(path: str | os.PathLike) -> dict[bytes, bytes]:
    """The keys of the file at `path`, refused if others may read it."""
    try:  # O_NONBLOCK: a FIFO in its place must not hang the node
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise PskFileError(f"PSK file {path} is not a regular file")
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise PskFileError(f"PSK file {path} is readable by others (mode "
                                   f"{stat.S_IMODE(mode):o}): chmod 600 it")
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PskFileError(f"cannot read PSK file {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise PskFileError(f"PSK file {path} is over {MAX_FILE_BYTES} bytes")
    try:
        return parse_psk(data.decode())
    except UnicodeDecodeError:
        raise PskFileError(f"PSK file {path} is not UTF-8 text") from None
    except PskFileError as exc:
        raise PskFileError(f"PSK file {path}, {exc}") from None


class PskKeys:
    """The keys of one PSK file, as it is now (see the module text)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._seen = self._signature()
        self._keys = read_psk_file(self.path)  # a bad file at start stops the start

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, identity: bytes) -> bytes | None:
        """The key of `identity` (None: no such identity, or the file is unusable)."""
        self._refresh()
        return self._keys.get(identity)

    def _signature(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino

    def _refresh(self) -> None:
        seen = self._signature()
        if seen == self._seen:
            return
        self._seen = seen  # taken before reading: a change while we read is seen next time
        try:
            self._keys = read_psk_file(self.path)
        except PskFileError as exc:
            self._keys = {}
            log.error("%s; no client is admitted by PSK until it is fixed", exc)
            return
        log.info("re-read PSK file %s: %d identities", self.path, len(self._keys))
