"""`dog cluster certs`: a CA the operator keeps, and certificates from it for the nodes,
admins and clients of a real cluster (`sheep up` makes its own, sheep/security/local.py).
Offline: nothing here talks to a cluster."""

from __future__ import annotations

import argparse
from pathlib import Path

from sheep.security.pki import ROLES, ClusterCA, PkiError

from .common import DogError
from .output import emit


async def certs_ca(_stub, args: argparse.Namespace) -> None:
    try:
        ca = ClusterCA.create(Path(args.dir), args.name)
    except PkiError as exc:
        raise DogError(str(exc)) from None
    if args.json:
        emit({"ca": str(ca.cert_path), "key": str(ca.dir / "ca.key")})
    else:
        print(f"CA created: {ca.cert_path} (its key {ca.dir / 'ca.key'} signs every "
              f"certificate of the cluster: keep it off the nodes)")


async def certs_issue(_stub, args: argparse.Namespace) -> None:
    out = Path(args.out or args.name)
    try:
        files = ClusterCA.load(Path(args.ca)).issue(out, args.name, args.role,
                                                     ips=tuple(args.ip), dns=tuple(args.dns))
    except PkiError as exc:
        raise DogError(str(exc)) from None
    if args.json:
        emit({"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key),
              "role": args.role})
        return
    print(f"{args.role} certificate for {args.name}: {files.cert}, key {files.key}")
    if args.role == "node":
        print(f"  sheep run ... --ca {files.ca} --cert {files.cert} --key {files.key}")


def add_certs_commands(cluster: argparse._SubParsersAction,
                       common: argparse.ArgumentParser) -> None:
    certs = cluster.add_parser("certs", help="a CA of your own, and certificates from it"
                               ).add_subparsers(dest="certs_cmd", required=True)
    ca = certs.add_parser("ca", parents=[common], help="create a cluster CA in DIR")
    ca.add_argument("dir", help="directory for ca.crt and ca.key (made 0700)")
    ca.add_argument("--name", default="sheep", help="the cluster's name in the CA's subject")
    ca.set_defaults(func=certs_ca, offline=True)
    issue = certs.add_parser("issue", parents=[common],
                             help="a certificate and key for a node, an admin or a client")
    issue.add_argument("name", help="the holder's name (its certificate's CN)")
    issue.add_argument("--ca", required=True, metavar="DIR", help="the CA's directory")
    issue.add_argument("--role", required=True, choices=ROLES,
                       help="node: a storage daemon; admin: dog; client: NBD/VM hosts")
    issue.add_argument("--ip", action="append", default=[], metavar="ADDR",
                       help="an address the holder serves on (nodes; repeatable)")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME",
                       help="a host name the holder serves as (nodes; repeatable)")
    issue.add_argument("--out", default="", metavar="DIR",
                       help="where NAME.crt, NAME.key and ca.crt go (default ./NAME)")
    issue.set_defaults(func=certs_issue, offline=True)
