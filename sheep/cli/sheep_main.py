"""sheep: the storage daemon (`sheep run`) and the embedded local cluster (`sheep up`)."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import signal
import sys
from pathlib import Path

from sheep.malloc import keep_freed_memory
from sheep.oid import DEFAULT_OBJECT_SIZE
from sheep.units import format_size, parse_size

from .output import (
    Parser,
    add_version,
    error_code,
    os_error_line,
    quiet_broken_pipe,
    report_error,
    stdout_closed,
)

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def install_event_loop_policy() -> None:
    """uvloop when present: the data plane's per-request cost roughly halves."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _run(args: argparse.Namespace) -> int:
    from qemu_driver.ha import watch_ha
    from qemu_driver.host import add_vm_host
    from sheep.cluster.access import resolve_access
    from sheep.cluster.state import EtcdTarget
    from sheep.node.daemon import NodeOptions, run_node
    from sheep.security.identity import Identity
    from sheep.security.pki import PkiError

    given = [f for f in (args.ca, args.cert, args.key) if f]
    if given and len(given) != 3:
        print("sheep: --ca, --cert and --key go together", file=sys.stderr)
        return 1
    if args.encrypt_loopback and not given:
        print("sheep: --encrypt-loopback needs the node's certificate (--ca/--cert/--key): "
              "an open node neither authenticates nor encrypts", file=sys.stderr)
        return 1
    try:
        identity = Identity.load(args.ca, args.cert, args.key) if given else None
        etcd_access = resolve_access(
            EtcdTarget.parse(args.etcd), identity, ca=args.etcd_ca, cert=args.etcd_cert,
            key=args.etcd_key, user=args.etcd_user, password_file=args.etcd_password_file)
    except (PkiError, ValueError) as exc:
        print(f"sheep: {exc}", file=sys.stderr)
        return 1

    opts = NodeOptions(
        dir=Path(args.dir),
        port=args.port,
        etcd=args.etcd,
        data_port=args.data_port,
        bind=args.bind,
        advertise=args.advertise,
        zone=args.zone,
        vnodes=args.vnodes,
        weight=args.weight,
        lease_ttl=args.lease_ttl,
        nbd_port=args.nbd_port,
        iscsi_port=args.iscsi_port,
        iscsi_chap_file=args.iscsi_chap_file,
        iscsi_mutual_chap_file=args.iscsi_mutual_chap_file,
        recovery_throttle=args.recovery_throttle,
        min_free=args.min_free,
        full_ratio=args.full_ratio,
        scrub_interval=args.scrub_interval,
        ready_file=Path(args.ready_file) if args.ready_file else None,
        identity=identity,
        encrypt_loopback=args.encrypt_loopback,
        etcd_access=etcd_access,
        nbd_tls=args.nbd_tls,
        nbd_tls_psk=args.nbd_tls_psk,
        control_services=(add_vm_host,),  # every node can host VMs
        node_tasks=(watch_ha,),  # and restarts the HA VMs that lost their host
    )
    install_event_loop_policy()
    keep_freed_memory()
    try:
        return asyncio.run(run_node(opts))
    except KeyboardInterrupt:
        return 0


def _up(args: argparse.Namespace) -> int:
    from sheep.embedded import EmbeddedCluster

    try:
        object_size = parse_size(args.object_size)
    except ValueError as exc:
        print(f"sheep: {exc}", file=sys.stderr)
        return 1
    cluster = EmbeddedCluster(
        Path(args.dir),
        nodes=args.nodes,
        copies=args.copies,
        base_port=args.base_port,
        object_size=object_size,
        nbd_port=args.nbd_port,
        iscsi_port=args.iscsi_port,
        vm=args.vm,
        restart=not args.no_restart,
        iscsi_chap_file=args.iscsi_chap_file,
    )
    return cluster.run_foreground()


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share in (0, 1]")
    return value


class _RefuseSecret(argparse.Action):
    """An option that exists only to refuse a secret on the command line, where `ps` and
    shell history show it to everyone (and so that no abbreviation of a *-file option
    takes the secret for a file name)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is not an option: a password on the command line is "
                     f"visible to every user (ps); put it in a file of mode 600 and give "
                     f"{option_string}-file FILE")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sheep", description="sheep storage daemon")
    add_version(parser)
    cmds = parser.add_subparsers(dest="cmd", required=True)

    run = cmds.add_parser("run", help="run one storage node")
    run.add_argument("--dir", required=True, help="data directory of this node")
    run.add_argument("--port", type=int, default=7000, help="control (gRPC) port")
    run.add_argument("--data-port", type=int, default=0,
                     help="data-plane port (default: any free port, published in etcd)")
    run.add_argument("--etcd", required=True,
                     help="etcd URL, optionally with a key prefix: http[s]://HOST:PORT[/PREFIX]")
    run.add_argument("--bind", default="127.0.0.1",
                     help="address to listen on (IPv4 or IPv6); any but loopback needs "
                          "--ca/--cert/--key, and --iscsi-chap-file with --iscsi-port")
    run.add_argument("--advertise", default="",
                     help="address peers dial (default: --bind; required with --bind "
                          "0.0.0.0 or ::)")
    run.add_argument("--zone", default="", help="failure zone; replicas go to distinct zones")
    run.add_argument("--vnodes", type=int, default=0, help="ring vnodes (default: from weight)")
    run.add_argument("--weight", type=float, default=1.0,
                     help="share of data relative to other nodes (scale with capacity)")
    run.add_argument("--lease-ttl", type=int, default=4,
                     help="seconds after which a silent node leaves the cluster")
    run.add_argument("--nbd-port", type=int, default=None,
                     help="also serve every VDI over NBD on this port (0: any free port)")
    run.add_argument("--nbd-tls", choices=("require", "allow", "off"), default=None,
                     help="NBD over TLS (NBD_OPT_STARTTLS, client certificates of the "
                          "cluster's CA): require it, allow it, or off. Default: require "
                          "on a non-loopback --bind, allow on loopback with an identity, "
                          "off without one")
    run.add_argument("--nbd-tls-psk", default="", metavar="FILE",
                     help="NBD clients may also prove a pre-shared key instead of a "
                          "certificate (TLS 1.3 PSK, as QEMU's tls-creds-psk and libnbd's "
                          "tls-psk-file): FILE holds IDENTITY:HEXKEY lines as psktool writes "
                          "them, keys of 128+ bits, mode 600; re-read when it changes. Such a "
                          "client is named psk:IDENTITY in `dog vdi set --nbd-allow`")
    run.add_argument("--iscsi-port", type=int, default=None,
                     help="also serve every VDI as an iSCSI target on this port "
                          "(0: any free port; the standard port is 3260)")
    run.add_argument("--iscsi-chap-file", default="", metavar="FILE",
                     help="iSCSI initiators must log in with the CHAP user and secret in "
                          "FILE (USER:SECRET, secret of 12+ bytes, mode 600; every target "
                          "and discovery)")
    run.add_argument("--iscsi-mutual-chap-file", default="", metavar="FILE",
                     help="with --iscsi-chap-file: also prove ourselves to initiators with "
                          "the CHAP user and (another) secret in FILE (mutual CHAP)")
    run.add_argument("--recovery-throttle", type=parse_size, default=0, metavar="BYTES/S",
                     help="bound recovery reads per node (e.g. 50M; default unbounded)")
    run.add_argument("--min-free", type=parse_size, default=256 << 20, metavar="BYTES",
                     help="free space recovery leaves on this node (default 256M)")
    run.add_argument("--full-ratio", type=_ratio, default=0.95, metavar="RATIO",
                     help="past this share of its disk used, the node takes no new objects "
                          "(reads, overwrites, discards and deletes go on); warnings start "
                          "at 0.85 (default 0.95)")
    run.add_argument("--scrub-interval", type=float, default=7 * 86400, metavar="SECONDS",
                     help="check every replica's checksums this often (default a week; "
                          "0: only on `dog node scrub start`); paced by --recovery-throttle")
    run.add_argument("--ready-file", metavar="PATH",
                     help="once the node serves, write PATH (JSON: pid and bound ports, "
                          "written whole); removed when the node stops. Launchers wait for it")
    tls = run.add_argument_group(
        "identity", "the node's certificate from its cluster's CA (`sheep up` makes them; "
        "`dog cluster certs` for your own CA): every plane then authenticates its peers")
    tls.add_argument("--ca", default="", metavar="FILE", help="the cluster CA's certificate")
    tls.add_argument("--cert", default="", metavar="FILE", help="this node's certificate")
    tls.add_argument("--key", default="", metavar="FILE", help="its key (mode 0600)")
    tls.add_argument("--encrypt-loopback", action="store_true",
                     help="encrypt data-plane links between processes of this host too "
                          "(default: authenticate them, then send in the clear, since "
                          "loopback traffic never leaves the host; links across a "
                          "network are always encrypted)")
    ext = run.add_argument_group(
        "etcd credentials", "an https:// etcd is shown the node's identity (--ca/--cert/"
        "--key) by default; an etcd with a CA of its own takes these instead")
    ext.add_argument("--etcd-ca", default="", metavar="FILE",
                     help="the CA etcd's certificate chains to (its name must match the "
                          "URL's host)")
    ext.add_argument("--etcd-cert", default="", metavar="FILE",
                     help="a client certificate for etcd (with --etcd-key)")
    ext.add_argument("--etcd-key", default="", metavar="FILE", help="its key (mode 0600)")
    ext.add_argument("--etcd-user", default="", metavar="NAME",
                     help="log in to etcd as NAME (etcd's user/password auth)")
    ext.add_argument("--etcd-password-file", default="", metavar="FILE",
                     help="NAME's password: the file's first line (mode 600; a password is "
                          "never taken on the command line, where ps shows it)")
    ext.add_argument("--etcd-password", action=_RefuseSecret, help=argparse.SUPPRESS)
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=_run)

    up = cmds.add_parser("up", help="run a local cluster with its own etcd in the foreground")
    up.add_argument("--nodes", type=int, default=3, help="storage nodes to run")
    up.add_argument("--copies", type=int, default=3,
                    help="replicas per object (the cluster is formatted with it)")
    up.add_argument("--dir", default="./var", help="where the nodes and etcd keep data")
    up.add_argument("--base-port", type=int, default=7000,
                    help="node i listens on control port BASE+i and data port BASE+100+i")
    up.add_argument("--object-size", default=format_size(DEFAULT_OBJECT_SIZE),
                    help="data object size, a power of two (also bounds a VDI's size)")
    up.add_argument("--nbd-port", type=int, default=10809, help="NBD gateway port (node 0)")
    up.add_argument("--iscsi-port", type=int, default=3260,
                    help="iSCSI portal port (node 0)")
    up.add_argument("--iscsi-chap-file", default="", metavar="FILE",
                    help="require iSCSI CHAP with the USER:SECRET in FILE (mode 600, a "
                         "secret of 12+ bytes)")
    up.add_argument("--vm", action="store_true",
                    help="also boot the demo VM (the small guest on VDI demo-disk) and show "
                         "its console")
    up.add_argument("--no-restart", action="store_true",
                    help="leave a node (or etcd) that dies down; by default it is started "
                         "again after 1 s, doubling up to 30 s while it keeps dying")
    up.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    up.set_defaults(func=_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    """A failure of the system under the user's command (a path that cannot be created, a
    closed stdout) ends in one line, not a traceback."""
    args = build_parser().parse_args(argv)
    # `kill -USR1` prints every thread's stack to stderr (the log): how to see where a
    # daemon that does not answer, or does not stop, is stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT, stream=sys.stderr
    )
    try:
        return args.func(args)
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) and stdout_closed():
            return quiet_broken_pipe()
        return report_error("sheep", os_error_line(exc), error_code(exc), as_json=False)


if __name__ == "__main__":
    sys.exit(main())
