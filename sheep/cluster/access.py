"""What a process presents to etcd: TLS (the CA that vouches for etcd's certificate, and
a client certificate) and etcd's own user and password.

A node of a secure cluster reaches the cluster's private etcd with its own identity: the
cluster's CA signed etcd's certificate too, and that certificate names SERVER_NAME, as
every serving certificate of ours does (sheep/security/pki.py). An external etcd has its
own CA, and its certificate names its host: `--etcd-ca` (and `--etcd-cert/--etcd-key` if
it wants client certificates) say so, and the URL's host is then checked. A password is
read from a file only others cannot read, never from the command line (`ps` shows argv).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path

from sheep.security.identity import Identity
from sheep.security.pki import SERVER_NAME, PkiError

from .state import EtcdTarget

MAX_PASSWORD_FILE = 4096


class EtcdAccessError(ValueError):
    """Credentials for etcd that are missing, unreadable or unsafe, said in one line."""


@dataclass(frozen=True)
class EtcdAccess:
    """TLS material and etcd user for one etcd; empty: a plain, open etcd."""

    ca_pem: bytes = b""  # the CA etcd's certificate must chain to (b"": no TLS)
    cert_pem: bytes = b""  # our client certificate (b"": none)
    key_pem: bytes = field(default=b"", repr=False)
    server_name: str = ""  # the name etcd's certificate must hold ("": the URL's host)
    user: str = ""  # etcd's user/password auth ("": none)
    password: str = field(default="", repr=False)

    @classmethod
    def of_identity(cls, identity: Identity, user: str = "", password: str = "") -> EtcdAccess:
        """A cluster identity, for the cluster's own etcd (its certificate names
        SERVER_NAME whatever address it is dialed at)."""
        return cls(identity.ca_pem, identity.cert_pem, identity.key_pem, SERVER_NAME,
                   user, password)

    @property
    def tls(self) -> bool:
        return bool(self.ca_pem)

    def check(self, target: EtcdTarget) -> None:
        """Refuse what would not be what its user meant: https without a CA to check etcd
        by, or a password sent in clear."""
        if target.secure and not self.tls:
            raise EtcdAccessError(
                f"etcd at {target.url} speaks TLS: give this process a certificate "
                f"(--ca/--cert/--key, or --etcd-ca for etcd's own CA)")
        if not target.secure and self.tls:
            raise EtcdAccessError(f"TLS credentials for etcd, but {target.url} is plain "
                                  f"http: give an https:// etcd URL")
        if self.password and not target.secure and target.host not in LOOPBACK:
            raise EtcdAccessError(f"an etcd password would cross the network in clear to "
                                  f"{target.url}: use an https:// etcd URL")


LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def read_password_file(path: str | Path) -> str:
    """The first line of `path`, refused if others may read the file or it is empty."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise EtcdAccessError(f"etcd password file {path} is not a regular file")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise EtcdAccessError(f"etcd password file {path} is readable by others (mode "
                                  f"{stat.S_IMODE(mode):o}): chmod 600 it")
        with open(path, "rb") as f:
            data = f.read(MAX_PASSWORD_FILE + 1)
    except OSError as exc:
        raise EtcdAccessError(f"cannot read etcd password file {path}: "
                              f"{exc.strerror}") from None
    if len(data) > MAX_PASSWORD_FILE:
        raise EtcdAccessError(f"etcd password file {path} is over {MAX_PASSWORD_FILE} bytes")
    lines = data.decode("utf-8", errors="strict").splitlines()
    password = lines[0] if lines else ""
    if not password:
        raise EtcdAccessError(f"etcd password file {path} is empty")
    return password


def resolve_access(target: EtcdTarget, identity: Identity | None, *,
                   ca: str = "", cert: str = "", key: str = "",
                   user: str = "", password_file: str = "") -> EtcdAccess:
    """What `sheep run` presents to the etcd at `target`: its own identity by default on
    an https etcd, `--etcd-ca` (with `--etcd-cert/--etcd-key`) for an etcd with a CA of
    its own, and `--etcd-user` with the password in `--etcd-password-file`."""
    if bool(user) != bool(password_file):
        raise EtcdAccessError("--etcd-user and --etcd-password-file go together")
    if (cert or key) and not (cert and key and ca):
        raise EtcdAccessError("--etcd-cert and --etcd-key go together, with --etcd-ca")
    password = read_password_file(password_file) if password_file else ""
    if ca:
        if cert:
            try:
                own = Identity.load(ca, cert, key)
            except PkiError as exc:
                raise EtcdAccessError(f"etcd credentials: {exc}") from None
            access = EtcdAccess(own.ca_pem, own.cert_pem, own.key_pem, "", user, password)
        else:
            try:
                ca_pem = Path(ca).read_bytes()
            except OSError as exc:
                raise EtcdAccessError(f"cannot read --etcd-ca {ca}: {exc.strerror}") from None
            access = EtcdAccess(ca_pem, user=user, password=password)
    elif target.secure and identity is not None:
        access = EtcdAccess.of_identity(identity, user, password)
    else:
        access = EtcdAccess(user=user, password=password)
    access.check(target)
    return access
