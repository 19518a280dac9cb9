"""One process's identity in its cluster (its certificate, key and the CA it trusts), as
each transport wants it: an ssl.SSLContext for asyncio's planes (data plane, NBD), gRPC
credentials for the control plane, and the role of whoever is at the other end.

Peers are authenticated by their chain to the cluster's CA and by the role in their
certificate, not by host name (sheep/security/pki.py says why); gRPC, which always checks
a name, is told to expect SERVER_NAME.
"""

from __future__ import annotations

import functools
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from cryptography import x509

from .pki import SERVER_NAME, CertFiles, PkiError, name_of, role_of

GRPC_NAME_OPTION = ("grpc.ssl_target_name_override", SERVER_NAME)
C = TypeVar("C", bound=ssl.SSLContext)


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of an authenticated connection."""

    role: str  # node | admin | client | etcd
    name: str


@dataclass(frozen=True)
class Identity:
    files: CertFiles
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def load(cls, ca: str | Path, cert: str | Path, key: str | Path) -> Identity:
        """Read and check the three files; a key others can read is refused (it would be
        everyone's identity)."""
        files = CertFiles(Path(ca), Path(cert), Path(key))
        try:
            mode = files.key.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise PkiError(f"{files.key} is readable by others (mode "
                               f"{stat.S_IMODE(mode):o}): chmod 600 it")
            ca_pem, cert_pem, key_pem = (files.ca.read_bytes(), files.cert.read_bytes(),
                                         files.key.read_bytes())
        except OSError as exc:
            raise PkiError(f"cannot read {exc.filename}: {exc.strerror}") from None
        identity = cls(files, ca_pem, cert_pem, key_pem)
        identity.server_ssl()  # fails here, in one line, on a key that is not the cert's
        return identity

    @classmethod
    def from_files(cls, files: CertFiles) -> Identity:
        return cls.load(files.ca, files.cert, files.key)

    @functools.cached_property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def role(self) -> str:
        return role_of(self.certificate)

    def _context(self, purpose: int, kind: type[C]) -> C:
        side = (ssl.PROTOCOL_TLS_SERVER if purpose == ssl.Purpose.CLIENT_AUTH
                else ssl.PROTOCOL_TLS_CLIENT)
        ctx = kind(side)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.files.cert, self.files.key)
            ctx.load_verify_locations(cadata=self.ca_pem.decode())
        except (ssl.SSLError, ValueError) as exc:
            raise PkiError(f"{self.files.cert} and {self.files.key} do not make an identity "
                           f"with CA {self.files.ca}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def server_ssl(self, kind: type[C] = ssl.SSLContext) -> C:  # type: ignore[assignment]
        """For a listening plane: the peer must present a certificate of our CA (or, with
        a `kind` that knows other proofs, one of those: sheep/security/psk.py)."""
        return self._context(ssl.Purpose.CLIENT_AUTH, kind)

    def client_ssl(self) -> ssl.SSLContext:
        """For dialing a peer of our cluster, by address (see the module text)."""
        ctx = self._context(ssl.Purpose.SERVER_AUTH, ssl.SSLContext)
        ctx.check_hostname = False
        return ctx

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)],
                                           root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def grpc_channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem,
                                            private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)


@functools.lru_cache(maxsize=256)
def _peer(der: bytes) -> Peer:
    """Parsed once per certificate: peers reconnect with the same one."""
    cert = x509.load_der_x509_certificate(der)
    return Peer(role_of(cert), name_of(cert))


def peer_of_ssl(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Peer | None:
    """The verified peer of a TLS connection (None without one)."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return _peer(der) if der else None


def peer_of_grpc(context: grpc.aio.ServicerContext) -> Peer | None:
    """The verified peer of a gRPC call (None on an insecure port)."""
    pems = context.auth_context().get("x509_pem_cert")
    return _peer(ssl.PEM_cert_to_DER_cert(pems[0].decode())) if pems else None
