"""One storage node: object store, data-plane server, control service, cluster membership.

Start-up refuses loudly rather than half-starting: a data dir of another cluster, a data
dir in use by another daemon, or a port in use are each a one-line error and exit code 1.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from sheep.cluster.access import EtcdAccess
from sheep.cluster.etcd import EtcdCluster
from sheep.cluster.membership import Membership
from sheep.cluster.ring import DEFAULT_VNODES, vnodes_for_weight
from sheep.cluster.state import EtcdTarget, NodeInfo, dump
from sheep.cluster.view import ClusterView, follow
from sheep.control import service as control
from sheep.control.handle import NodeHandle, NodeStatus, RecoveryStatus, ScrubStatus
from sheep.dataplane import server as dataplane
from sheep.dataplane.client import PeerPool
from sheep.dataplane.wire import MUTATIONS
from sheep.errors import Fenced, SheepError
from sheep.fdlimit import object_cache_size, raise_to_hard_limit
from sheep.gateway.exports import VolumeCache
from sheep.gateway.iscsi.login import Chap
from sheep.gateway.iscsi.server import IscsiConfig, IscsiGateway, serve_iscsi
from sheep.gateway.nbd.server import NO_TLS, NbdTls, serve_nbd
from sheep.gateway.nbd.tls import TlsMode, choose_mode
from sheep.netaddr import family, host_port
from sheep.node.exposure import Exposure, refusal
from sheep.node.fences import Fences
from sheep.node.ready import remove_ready_file, write_ready_file
from sheep.node.recovery import Recovery
from sheep.node.repair import Repairer
from sheep.node.scrub import Replicas, Scrubber
from sheep.node.service import InProcess, ObjectService
from sheep.objclient import ObjectClient
from sheep.security.identity import Identity
from sheep.security.psk import PskServerContext, PskUnavailable
from sheep.security.pskfile import PskFileError, PskKeys
from sheep.store import ObjectStore
from sheep.store.fileio import private_dir
from sheep.store.space import FULL_RATIO
from sheep.vdi.registry import VdiRegistry

log = logging.getLogger("sheep.daemon")


STOP_STEP_TIMEOUT = 10.0  # s for each step of a stop


async def _bounded(step, what: str) -> None:
    try:
        await asyncio.wait_for(step, STOP_STEP_TIMEOUT)
    except TimeoutError:
        log.warning("stopping: %s took over %.0fs; going on", what, STOP_STEP_TIMEOUT)
    except Exception as exc:
        log.warning("stopping: %s failed: %s", what, exc)


class StartupError(SheepError):
    """the node cannot start"""


@dataclass
class NodeOptions:
    dir: Path
    port: int
    etcd: str
    data_port: int = 0
    bind: str = "127.0.0.1"
    advertise: str = ""
    zone: str = ""
    vnodes: int = 0
    weight: float = 1.0
    lease_ttl: int = 4  # a dead node stops writes for about this long (+ 0.5 s)
    recovery_throttle: int = 0  # bytes/s of recovery reads per node; 0 = unbounded
    min_free: int = 256 << 20  # recovery never fills the disk below this
    full_ratio: float = FULL_RATIO  # past this share of the disk used, no new objects
    scrub_interval: float = 7 * 86400  # seconds between scrub passes; 0: on demand only
    nbd_port: int | None = None  # serve VDIs over NBD on this port (0: any free one)
    iscsi_port: int | None = None  # serve VDIs over iSCSI on this port (0: any free one)
    iscsi_chap_file: str = ""  # file: USER:SECRET initiators must prove (CHAP), every target
    iscsi_mutual_chap_file: str = ""  # file: USER:SECRET we prove to them (mutual CHAP)
    ready_file: Path | None = None  # written once the node serves (sheep/node/ready.py)
    identity: Identity | None = None  # None: an open node (loopback only)
    encrypt_loopback: bool = False  # also encrypt data-plane links within this host
    # what to show etcd (sheep/cluster/access.py); None: `identity` on an https etcd
    etcd_access: EtcdAccess | None = None
    nbd_tls: str | None = None  # require | allow | off; None: by the bind (gateway/nbd/tls.py)
    nbd_tls_psk: str = ""  # file: IDENTITY:HEXKEY lines, NBD clients' pre-shared keys
    # more services on the control port (`sheep run` adds the VM host, qemu_driver/host.py)
    control_services: tuple[control.ExtraService, ...] = ()
    # tasks that run as long as the node serves (`sheep run` adds the VMs' HA watcher,
    # qemu_driver/ha.py), each given the node; cancelled when it stops
    node_tasks: tuple[Callable[[NodeHandle], Awaitable[None]], ...] = ()


def gateway_holder(node_id: str) -> str:
    """The holder named in the VDI locks of `node_id`'s gateways: a lock whose holder's
    node is gone can be broken safely (fencing refuses its late writes; qemu_driver/ha.py)."""
    return f"{GATEWAY_HOLDER}{node_id[:8]}"


GATEWAY_HOLDER = "the gateway of sheep node "


def _check_exposure(opts: NodeOptions) -> None:
    """Refuse, before anything binds, a node others could reach without authenticating
    (sheep/node/exposure.py)."""
    reason = refusal(Exposure(bind=opts.bind, advertise=opts.advertise,
                              identity=opts.identity is not None,
                              iscsi=opts.iscsi_port is not None,
                              iscsi_chap=bool(opts.iscsi_chap_file)))
    if reason is not None:
        raise StartupError(reason)


def _bind_error(what: str, host: str, port: int, exc: OSError) -> StartupError:
    where = host_port(host, port)
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"{what} port {where} is already in use")
    return StartupError(f"cannot bind {what} port {where}: {exc}")


def _check_port_free(host: str, port: int, what: str) -> None:
    if port == 0:
        return
    with socket.socket(family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise _bind_error(what, host, port, exc) from None


def _bound_port(server: asyncio.Server) -> int:
    return server.sockets[0].getsockname()[1]


def _nbd_tls(opts: NodeOptions) -> NbdTls:
    try:
        mode = choose_mode(opts.nbd_tls, opts.bind, opts.identity is not None)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    if opts.nbd_tls_psk and (mode is TlsMode.OFF or opts.identity is None):
        raise StartupError("--nbd-tls-psk needs NBD over TLS: the node's certificate "
                           "(--ca/--cert/--key) and --nbd-tls require or allow")
    if mode is TlsMode.OFF or opts.identity is None:
        return NbdTls()
    if not opts.nbd_tls_psk:
        return NbdTls(mode, opts.identity.server_ssl())
    try:
        keys = PskKeys(opts.nbd_tls_psk)
        context = opts.identity.server_ssl(PskServerContext)
        context.accept_psk(keys.key)
    except (PskFileError, PskUnavailable) as exc:
        raise StartupError(str(exc)) from None
    log.info("NBD clients may also prove a pre-shared key of %s (%d identities)",
             keys.path, len(keys))
    return NbdTls(mode, context)


def _iscsi_config(opts: NodeOptions) -> IscsiConfig:
    try:
        chap = Chap.load(opts.iscsi_chap_file) if opts.iscsi_chap_file else None
        mutual = (Chap.load(opts.iscsi_mutual_chap_file) if opts.iscsi_mutual_chap_file
                  else None)
    except ValueError as exc:
        raise StartupError(f"bad iSCSI CHAP setting: {exc}") from None
    if mutual is not None and chap is None:
        raise StartupError("--iscsi-mutual-chap-file needs --iscsi-chap-file")
    if mutual is not None and chap is not None and mutual.secret == chap.secret:
        raise StartupError("mutual CHAP needs two secrets: the target's must differ from "
                           "the initiators' (RFC 7143 §12.1.3)")
    return IscsiConfig(chap, mutual)


class DataDir:
    """A node's data dir, held exclusively (flock) while open: two daemons on one dir
    would each believe its store is theirs."""

    def __init__(self, root: Path, full_ratio: float = FULL_RATIO) -> None:
        private_dir(root)
        self._fd = os.open(root / "sheep.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise StartupError(f"data dir {root} is in use by another sheep daemon") from None
        try:
            self.store = ObjectStore(root, full_ratio=full_ratio)
        except BaseException:
            os.close(self._fd)
            raise
        if self.store.meta.get("node_id") is None:
            self.store.meta.set("node_id", uuid.uuid4().hex)

    @property
    def node_id(self) -> str:
        return self.store.meta.get("node_id")

    def adopt(self, cluster_id: str | None, etcd: str, *, refuse: bool) -> bool:
        """Bind the data dir to the cluster at `etcd`; False (or StartupError) if the dir
        is another cluster's: its objects must never mix with this one's."""
        meta, root = self.store.meta, self.store.root
        mine = meta.get("cluster_id")
        if cluster_id is None:
            if mine is not None and refuse:
                raise StartupError(
                    f"data dir {root} belongs to cluster {mine}, but the cluster "
                    f"at {etcd} is not formatted (wrong --etcd, or wipe the dir)"
                )
            return True
        if mine is None:
            meta.set("cluster_id", cluster_id)
            return True
        if mine != cluster_id:
            if refuse:
                raise StartupError(
                    f"data dir {root} belongs to cluster {mine}, not to cluster "
                    f"{cluster_id} at {etcd}"
                )
            return False
        return True

    def close(self) -> None:
        self.store.close()
        os.close(self._fd)


def _listen(host: str, port: int, what: str) -> socket.socket:
    """A listening socket, bound before the node's parts are built: the data port is part
    of what the node tells the cluster about itself."""
    try:
        return socket.create_server((host, port), family=family(host), backlog=256,
                                    reuse_port=False)
    except OSError as exc:
        raise _bind_error(what, host, port, exc) from None


async def open_node(opts: NodeOptions) -> Node:
    """Everything a node needs before it serves, checked in the order a user fixes them
    (who may reach it, its dir, its ports, its cluster); a StartupError leaves nothing
    open."""
    _check_exposure(opts)
    limit = raise_to_hard_limit()
    try:
        etcd = EtcdCluster(EtcdTarget.parse(opts.etcd), identity=opts.identity,
                           access=opts.etcd_access)
    except ValueError as exc:  # a bad URL, or an https etcd and nothing to show it
        raise StartupError(str(exc)) from None
    data_dir = DataDir(opts.dir, opts.full_ratio)
    data_sock = None
    try:
        _check_port_free(opts.bind, opts.port, "control")
        data_sock = _listen(opts.bind, opts.data_port, "data")
        # a mode the node cannot serve, or a bad PSK file, stops it here, before anything
        nbd_tls = _nbd_tls(opts) if opts.nbd_port is not None else NO_TLS
        if opts.nbd_port:
            _check_port_free(opts.bind, opts.nbd_port, "NBD")
        if opts.iscsi_port:
            _check_port_free(opts.bind, opts.iscsi_port, "iSCSI")
        iscsi_config = _iscsi_config(opts)
        await etcd.connect()
        config = await etcd.config()
        data_dir.adopt(config.cluster_id if config else None, opts.etcd, refuse=True)
        if config is not None:
            data_dir.store.set_object_size(config.object_size)
        log.info("file descriptors: %d, up to %d objects kept open", limit,
                 object_cache_size())
        return Node(opts, data_dir, etcd, data_sock, iscsi_config, nbd_tls)
    except BaseException:
        if data_sock is not None:
            data_sock.close()
        await _bounded(etcd.close(), "closing the etcd client")
        data_dir.close()
        raise


class Node:
    """One storage node, its parts built together from what open_node checked; start()
    puts them to work."""

    def __init__(self, opts: NodeOptions, data_dir: DataDir, etcd: EtcdCluster,
                 data_sock: socket.socket, iscsi_config: IscsiConfig,
                 nbd_tls: NbdTls) -> None:
        self.opts = opts
        self.identity = opts.identity
        self.etcd = etcd
        self.stopped = asyncio.Event()
        self._dir = data_dir
        self.store = data_dir.store
        self.meta = self.store.meta
        self.view = ClusterView()
        node_id = data_dir.node_id
        self._pool = PeerPool(identity=opts.identity, encrypt_loopback=opts.encrypt_loopback)
        self.recovery = Recovery(node_id, self.store, self.view, self._pool, etcd,
                                 throttle=opts.recovery_throttle, min_free=opts.min_free)
        self.repairer = Repairer(node_id, self.store, self.view, self._pool)
        self._registry = VdiRegistry(etcd)
        self._fences = Fences()
        self._service = ObjectService(
            self.store, lambda: self.view.epoch if self.view.formatted else 0,
            guard=self._guard, repair=self.repairer.repair, fences=self._fences)
        self.scrubber = Scrubber(self.store, self.recovery, self.repairer,
                                 Replicas(node_id, self.view, self._pool, VdiRegistry(etcd)),
                                 interval=opts.scrub_interval, throttle=opts.recovery_throttle)
        used, free = self.store.usage()
        self.info = NodeInfo(
            node_id=node_id,
            host=opts.advertise or opts.bind,
            data_port=data_sock.getsockname()[1],
            control_port=opts.port,
            zone=opts.zone,
            vnodes=opts.vnodes or vnodes_for_weight(opts.weight, DEFAULT_VNODES),
            capacity=used + free,
        )
        self._membership = Membership(etcd, self.info, lease_ttl=opts.lease_ttl)
        self._data_sock = data_sock
        self._iscsi_config = iscsi_config
        self._nbd_tls = nbd_tls
        # the volumes every gateway on this node shares: an NBD and an iSCSI client of one
        # VDI write through one Volume (one lock, one owner table); the gateways read and
        # write this node's own replicas in its own store, with no network hop
        self.client = ObjectClient(self.view, self._pool, etcd=etcd,
                                   local=(node_id, InProcess(self._service)))
        self._volumes = VolumeCache(self.client, VdiRegistry(etcd), gateway_holder(node_id),
                                    node_id)
        # what start() starts, as it does
        self._data_server: dataplane.Listening | None = None
        self._control_server: grpc.aio.Server | None = None
        self._gateways: list[asyncio.Server] = []
        self._nbd_mode = TlsMode.OFF  # the NBD gateway's, once it serves
        self._joined = False
        self._iscsi: IscsiGateway | None = None
        self._tasks: list[asyncio.Task] = []
        self.view.add_listener(self._on_view_change)
        self.view.add_listener(self.recovery.on_view)

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        opts = self.opts
        self._data_server = await dataplane.serve(self._service, self._data_sock,
                                                  identity=opts.identity,
                                                  encrypt_loopback=opts.encrypt_loopback)
        try:
            self._control_server = await control.serve(self, opts.bind, opts.port, opts.identity,
                                                       opts.control_services)
        except RuntimeError as exc:
            raise StartupError(f"cannot bind control port {host_port(opts.bind, opts.port)}: "
                               f"{exc}") from None
        await self._membership.join()
        self._joined = True
        # the VDI lock tokens, read after joining and before the view takes an epoch
        # (until then every write is refused): a holder that fenced while this node was
        # away recorded its token before, or fences this node's new ring (vdi/fence.py)
        await self._load_fences()
        await self.view.refresh(self.etcd)
        self._tasks = [
            asyncio.ensure_future(self.etcd.watch(self._load_fences, poll=5.0,
                                                  prefix=self._registry.fences_prefix())),
            asyncio.ensure_future(self._membership.keep_alive()),
            asyncio.ensure_future(follow(self.view, self.etcd)),
            asyncio.ensure_future(self._reconcile_loop()),
            asyncio.ensure_future(self.store.run_upkeep()),
        ]
        self.scrubber.start()
        nbd = iscsi = None
        if opts.nbd_port is not None:
            nbd = await self._start_gateway(opts.nbd_port)
        if opts.iscsi_port is not None:
            iscsi = await self._start_iscsi(opts.iscsi_port)
        if nbd is not None or iscsi is not None:
            # clients (dog vm) find gateways in the node records: say which ones are up
            self.info = replace(self.info, nbd_port=nbd, iscsi_port=iscsi,
                                iscsi_chap=iscsi is not None
                                and self._iscsi_config.chap is not None,
                                nbd_tls=self._nbd_mode.value if nbd is not None else "")
            await self._membership.publish(self.info)
        self._tasks += [asyncio.ensure_future(task(self)) for task in opts.node_tasks]
        log.info(
            "node %s up: control %s, data %s, zone %r, vnodes %d, epoch %d",
            self.info.node_id[:8],
            host_port(opts.bind, opts.port),
            host_port(opts.bind, self.info.data_port),
            self.info.zone,
            self.info.vnodes,
            self.view.epoch,
        )

    async def _start_gateway(self, port: int) -> int:
        """Serve VDIs over NBD from this node; returns the bound port."""
        tls = self._nbd_tls
        try:
            server = await serve_nbd(self._volumes, self.opts.bind, port, tls=tls)
        except OSError as exc:
            raise _bind_error("NBD", self.opts.bind, port, exc) from None
        self._gateways.append(server)
        self._nbd_mode = tls.mode  # published in the node's record, for dog vm
        bound = _bound_port(server)
        log.info("nbd gateway on nbd://%s/ (TLS %s)", host_port(self.opts.bind, bound),
                 tls.mode.value)
        return bound

    async def _start_iscsi(self, port: int) -> int:
        """Serve every VDI as an iSCSI target from this node, beside NBD; returns the
        bound port."""
        try:
            self._iscsi, server = await serve_iscsi(self._volumes, self.opts.bind, port,
                                                    self._iscsi_config)
        except OSError as exc:
            raise _bind_error("iSCSI", self.opts.bind, port, exc) from None
        self._gateways.append(server)
        bound = _bound_port(server)
        log.info("iscsi gateway on %s (%s)", host_port(self.opts.bind, bound),
                 "CHAP" if self._iscsi_config.chap else "no authentication")
        return bound

    async def stop(self) -> None:
        log.info("stopping")
        for server in self._gateways:
            server.close()
        if self._iscsi is not None:
            self._iscsi.close()
        # each step bounded: with etcd gone (its host died, or sheep up was killed), closing
        # a volume's lock or flushing for a new ring would wait for ever
        await _bounded(self._volumes.close(), "closing the gateways' volumes")
        await _bounded(self.scrubber.close(), "stopping the scrub")
        await _bounded(self.recovery.close(), "stopping recovery")
        await _bounded(self._pool.close(), "closing peer connections")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._joined:
            try:
                await asyncio.wait_for(self._membership.leave(), 5)
            except Exception as exc:
                log.warning("could not leave the cluster cleanly: %s", exc)
        if self._data_server is not None:
            self._data_server.close()
        self._data_sock.close()
        if self._control_server is not None:
            await self._control_server.stop(grace=1)
        await _bounded(self.etcd.close(), "closing the etcd client")
        self._dir.close()
        log.info("stopped")

    # -- internals --------------------------------------------------------------------

    def _on_view_change(self, view: ClusterView) -> None:
        if view.config is not None:
            if not self._dir.adopt(view.config.cluster_id, self.opts.etcd, refuse=False):
                log.error("the cluster was re-formatted under this node; shutting down")
                self.stopped.set()
                return
            self.store.set_object_size(view.config.object_size)
        if view.record is not None:
            self.meta.put_epoch(view.record.epoch, dump(view.record))

    async def _load_fences(self) -> None:
        """Raise this node's fencing floors to the tokens recorded in etcd: at start, and
        whenever a holder records one (a FENCE request that did not reach this node)."""
        for vdi_id, token in (await self._registry.fences()).items():
            self._fences.raise_to(vdi_id, token)

    async def _reconcile_loop(self) -> None:
        """Notice nodes whose lease expired and write the epoch without them."""
        while True:
            try:
                await self._membership.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reconcile failed: %s", exc)
            await self.view.wait_for_change(self.view.epoch, 0.5)

    @property
    def etcd_url(self) -> str:
        return self.opts.etcd

    def status(self) -> NodeStatus:
        used, free = self.store.usage()
        space = self.store.space()
        return NodeStatus(node=self.info, used=used, free=free,
                          objects=len(self.store.list_oids()), epoch=self.view.epoch,
                          recovery=self._recovery_status(), scrub=self._scrub_status(),
                          filesystem=f"{socket.gethostname()}:{os.stat(self.store.root).st_dev}",
                          space=space.state, space_used=space.ratio)

    def _guard(self, oid: int, opcode: int, fresh: bool) -> asyncio.Future[None] | None:
        """Every client operation on this node's store passes here: writes are refused while
        the node may have lost its lease, and any operation on an object still being
        recovered waits for it."""
        if opcode in MUTATIONS and self._membership.fenced:
            raise Fenced("this node's cluster lease may have expired; it takes no writes")
        return self.repairer.guard(oid) or self.recovery.guard(oid, opcode, fresh)

    def _recovery_status(self) -> RecoveryStatus:
        s = self.recovery.status
        return RecoveryStatus(epoch=s.epoch, state=s.state, done=s.done, total=s.total,
                              rate=s.rate, throttle=self.recovery.throttle, lost=s.lost)

    def _scrub_status(self) -> ScrubStatus:
        s, r = self.scrubber.status, self.repairer.stats
        return ScrubStatus(state=s.state, passes=s.passes, done=s.done, total=s.total,
                           bad_blocks=s.bad_blocks, repaired=s.repaired, started=s.started,
                           finished=s.finished, interval=self.scrubber.interval,
                           blocks_repaired=r.repaired, blocks_accepted=r.accepted,
                           diverged=s.diverged, reconciled=s.reconciled,
                           blocks_lost=r.lost)

    def start_scrub(self) -> None:
        self.scrubber.request()

    def set_recovery_throttle(self, bytes_per_second: int) -> None:
        """One bound for background reads: recovery's and the scrub's."""
        self.scrubber.throttle = bytes_per_second
        self.recovery.throttle = bytes_per_second
        log.info("recovery throttle: %s", f"{bytes_per_second} B/s" if bytes_per_second
                     else "unbounded")


def _refused(exc: SheepError) -> int:
    log.error("%s", exc)
    print(f"sheep: {exc}", flush=True, file=sys.stderr)
    return 1


async def run_node(opts: NodeOptions) -> int:
    """Run until SIGTERM/SIGINT; the exit code for the process."""
    import signal

    try:
        node = await open_node(opts)
    except SheepError as exc:
        return _refused(exc)
    try:
        await node.start()
    except SheepError as exc:
        await node.stop()
        return _refused(exc)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.stopped.set)
    if opts.ready_file is not None:
        write_ready_file(opts.ready_file, node.info)
    await node.stopped.wait()
    if opts.ready_file is not None:
        remove_ready_file(opts.ready_file)
    await node.stop()
    return 0
