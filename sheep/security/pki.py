"""The cluster's certificate authority: one CA per cluster, and certificates from it that
say who their holder is (a role) and what it is called.

A certificate's role is its subject's organizational unit: `node` (a storage daemon: it
serves every plane and dials its peers), `admin` (dog: may do anything), `client` (a VM
host or a user's NBD client: may attach disks) and `etcd` (the private etcd's server).
Every certificate that serves also names SERVER_NAME among its DNS names: peers dial
nodes by address, and an address says nothing about who answers; the chain to the
cluster's CA and the role do. All crypto is the `cryptography` package's.

Files are PEM: `ca.crt`, `ca.key` (kept only where certificates are issued), and
`NAME.crt`, `NAME.key` per holder; keys are 0600 in a 0700 directory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("node", "admin", "client", "etcd")
SERVER_NAME = "sheep"  # the DNS name every serving certificate holds (see the module text)
PSK_PREFIX = "psk:"  # names of NBD clients known by a pre-shared key (gateway/nbd/tls.py)
CA_DAYS = 3650
LEAF_DAYS = 825


class PkiError(Exception):
    """A CA or certificate that cannot be made or used, said in one line."""


@dataclass(frozen=True)
class CertFiles:
    """Where one holder's certificate and key lie, and the CA that vouches for them."""

    ca: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Written 0600 from the first byte: a key is never readable by others, not even
    between its creation and a chmod."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class ClusterCA:
    """A CA's certificate and key, loaded from or created in `dir`."""

    def __init__(self, dir: Path, cert: x509.Certificate,
                 key: ec.EllipticCurvePrivateKey) -> None:
        self.dir = dir
        self.cert = cert
        self._key = key

    @property
    def cert_path(self) -> Path:
        return self.dir / "ca.crt"

    @classmethod
    def create(cls, dir: Path, cluster: str = "sheep") -> ClusterCA:
        """A new CA in `dir` (refused if one is there: its certificates would be orphaned)."""
        dir = _private_dir(Path(dir))
        if (dir / "ca.key").exists() or (dir / "ca.crt").exists():
            raise PkiError(f"{dir} already holds a CA")
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sheep"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} cluster CA")])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, encipher_only=False,
                    decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        _write_private(dir / "ca.key", _key_pem(key))
        (dir / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(dir, cert, key)

    @classmethod
    def load(cls, dir: Path) -> ClusterCA:
        dir = Path(dir)
        try:
            cert = x509.load_pem_x509_certificate((dir / "ca.crt").read_bytes())
            key = serialization.load_pem_private_key((dir / "ca.key").read_bytes(), None)
        except FileNotFoundError as exc:
            raise PkiError(f"no CA in {dir}: {exc.filename} is missing") from None
        except ValueError as exc:
            raise PkiError(f"the CA in {dir} cannot be read: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"the CA key in {dir} is not an EC key")
        return cls(dir, cert, key)

    @classmethod
    def load_or_create(cls, dir: Path, cluster: str = "sheep") -> ClusterCA:
        return cls.load(dir) if (Path(dir) / "ca.key").exists() else cls.create(dir, cluster)

    def issue(self, out: Path, name: str, role: str, *, ips: tuple[str, ...] = (),
              dns: tuple[str, ...] = (), days: int = LEAF_DAYS) -> CertFiles:
        """`out`/NAME.crt and NAME.key for a holder of `role`. Nodes and etcd serve, so their
        certificates also carry SERVER_NAME, loopback and the addresses given; admins and
        clients only dial."""
        if role not in ROLES:
            raise PkiError(f"unknown role {role!r} (one of: {', '.join(ROLES)})")
        if not name or "/" in name or name.startswith("."):
            raise PkiError(f"bad certificate name {name!r}")
        if name.startswith(PSK_PREFIX):
            raise PkiError(f"certificate name {name!r}: names starting {PSK_PREFIX!r} are "
                           "NBD clients' pre-shared key identities")
        out = _private_dir(Path(out))
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sheep"),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        serves = role in ("node", "etcd")
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if serves:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        alt: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(
            ((SERVER_NAME, "localhost") if serves else ()) + dns)]
        try:
            addresses = dict.fromkeys(
                (("127.0.0.1", "::1") if serves else ()) + ips)
            alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        except ValueError as exc:
            raise PkiError(str(exc)) from None
        now = _now()
        builder = (x509.CertificateBuilder()
                   .subject_name(subject).issuer_name(self.cert.subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, key_encipherment=False, key_cert_sign=False,
                       crl_sign=False, content_commitment=False, data_encipherment=False,
                       key_agreement=False, encipher_only=False, decipher_only=False),
                       critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self._key.public_key()), critical=False))
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        _write_private(out / f"{name}.key", _key_pem(key))
        (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        ca_copy = out / "ca.crt"
        if ca_copy.resolve() != self.cert_path.resolve():
            ca_copy.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return CertFiles(ca_copy, out / f"{name}.crt", out / f"{name}.key")


def role_of(cert: x509.Certificate) -> str:
    """The holder's role, '' when the certificate names none of ours."""
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = str(units[0].value) if units else ""
    return role if role in ROLES else ""


def name_of(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
