"""The certificates of a cluster on one host (`sheep up`, the benchmarks, the tests), made
on first start and kept beside its data: ROOT/pki/ca holds the CA (its key never leaves
it), ROOT/pki/NAME each holder's certificate and key, and ROOT/dog.conf tells dog where the
admin's are (sheep/security/config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import write_config
from .pki import CertFiles, ClusterCA


@dataclass(frozen=True)
class LocalPki:
    root: Path  # ROOT/pki

    @classmethod
    def ensure(cls, root: Path, nodes: int) -> LocalPki:
        """The CA and certificates for `nodes` nodes, an admin and etcd: those missing are
        made, those there are kept (a restart keeps its identities)."""
        pki = cls(Path(root) / "pki")
        ca = ClusterCA.load_or_create(pki.root / "ca", cluster=Path(root).resolve().name)
        for name, role in [*((f"node{i}", "node") for i in range(nodes)),
                           ("admin", "admin"), ("etcd", "etcd"), ("client", "client")]:
            if not (pki.root / name / f"{name}.key").exists():
                ca.issue(pki.root / name, name, role)
        return pki

    def holder(self, name: str) -> CertFiles:
        where = self.root / name
        return CertFiles(where / "ca.crt", where / f"{name}.crt", where / f"{name}.key")

    def node(self, i: int) -> CertFiles:
        return self.holder(f"node{i}")

    @property
    def admin(self) -> CertFiles:
        return self.holder("admin")

    @property
    def etcd(self) -> CertFiles:
        return self.holder("etcd")

    @property
    def client(self) -> CertFiles:
        """For NBD and VM clients of the cluster (qemu, nbdinfo)."""
        return self.holder("client")

    def write_dog_config(self, path: Path, address: str) -> Path:
        """dog's config: the admin's certificate for dog, the client's for the disks of
        the VMs dog starts."""
        return write_config(path, address, self.admin, client=self.client)


def node_args(files: CertFiles) -> list[str]:
    """`sheep run` options that give a node its identity."""
    return ["--ca", str(files.ca), "--cert", str(files.cert), "--key", str(files.key)]
