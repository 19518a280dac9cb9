"""The cluster's records in etcd: read, format, watch, and epoch transactions.

Every change of membership is one etcd transaction guarded by the epoch key's revision,
so two nodes that race to bump the epoch cannot both win; the loser re-reads and retries.

`AetcdKv` is the `Kv` (sheep/cluster/kv.py) over a real etcd: the one module that imports
aetcd. Everything else reads and writes etcd through `EtcdCluster.kv`. aetcd only dials
plain channels; `_TlsClient` gives it TLS (sheep/cluster/access.py says with what).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc

from sheep.clock import SYSTEM, Clock
from sheep.errors import ClusterError, InvalidParams
from sheep.oid import validate_copies, validate_object_size
from sheep.security.identity import Identity

from . import kv as tx
from .access import EtcdAccess
from .kv import KeyValue, Kv, Lease, LeaseGone, lease_id
from .state import (
    ClusterConfig,
    EpochRecord,
    EtcdTarget,
    NodeInfo,
    dump,
    load_config,
    load_epoch,
    load_node,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class AlreadyFormatted(ClusterError):
    """the cluster is already formatted"""


class EtcdUnavailable(ClusterError):
    """etcd cannot be reached"""


class EtcdRefused(ClusterError):
    """etcd does not let us in: a wrong password, or a user (or certificate name) it does
    not know or has not granted the keys. Trying again would not help."""


_REFUSALS = ("authentication failed", "permission denied", "user name not found",
             "user name is empty")


def _refusal(exc: Exception) -> EtcdRefused | None:
    detail = str(exc)
    if any(r in detail for r in _REFUSALS):
        return EtcdRefused(f"etcd refused us: {detail.removeprefix('etcdserver: ')}")
    return None


def _lease_gone(exc: Exception) -> bool:
    return "lease not found" in str(exc)


class _AetcdLease:
    def __init__(self, lease: aetcd.Lease, kv: AetcdKv) -> None:
        self._lease = lease
        self._kv = kv

    @property
    def id(self) -> int:
        return self._lease.id

    async def refresh(self) -> int:
        return (await self._kv._call(self._lease.refresh)).TTL

    async def revoke(self) -> None:
        try:
            await self._kv._call(self._lease.revoke)
        except aetcd.exceptions.ClientError as exc:
            if _lease_gone(exc):
                raise LeaseGone(f"lease {self.id:x} is gone") from None
            raise


class _AetcdWatch:
    def __init__(self, watch) -> None:
        self._watch = watch

    async def _keys(self) -> AsyncIterator[bytes]:
        async for event in self._watch:
            yield bytes(event.kv.key)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._keys()

    async def cancel(self) -> None:
        await self._watch.cancel()


def _kv(raw) -> KeyValue:
    return KeyValue(bytes(raw.key), bytes(raw.value), raw.create_revision, raw.mod_revision,
                    raw.version, raw.lease)


class _TlsClient(aetcd.Client):
    """aetcd's client over a TLS channel. aetcd 1.0's connect() only ever opens an
    insecure one, so this is its connect with the channel made secure; the rest
    (etcd's user/password token, the stubs, the watcher) is aetcd's as it is."""

    def __init__(self, *, credentials: grpc.ChannelCredentials, server_name: str,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials
        if server_name:
            self._options = {**self._options, "grpc.ssl_target_name_override": server_name}

    async def connect(self) -> None:
        try:
            await self._connect_tls()
        except aetcd.rpc.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)

    async def _connect_tls(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = grpc.aio.secure_channel(target, self._credentials,
                                                   options=list(self._options.items()))
            if self._username is not None and self._password is not None:
                self.auth_stub = aetcd.rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    aetcd.rpc.AuthenticateRequest(name=self._username,
                                                  password=self._password),
                    timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(aetcd.rpc.WatchStub(self.channel),
                                                  timeout=self._timeout,
                                                  metadata=self.metadata)
            self._connected.set()
        except BaseException:
            if self.channel is not None:
                await self.channel.close()
            self._init_channel_attrs()
            raise
        finally:
            self._is_connecting = False


def _client(host: str, port: int, access: EtcdAccess, timeout: float) -> aetcd.Client:
    auth = {"username": access.user, "password": access.password} if access.user else {}
    if not access.tls:
        return aetcd.Client(host=host, port=port, timeout=timeout, **auth)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=access.ca_pem, private_key=access.key_pem or None,
        certificate_chain=access.cert_pem or None)
    return _TlsClient(host=host, port=port, timeout=timeout, credentials=credentials,
                      server_name=access.server_name, **auth)


class AetcdKv:
    """`Kv` over a real etcd, through aetcd: the one place its client and types are used."""

    def __init__(self, host: str, port: int, *, timeout: float = 5.0,
                 access: EtcdAccess | None = None) -> None:
        self._client = _client(host, port, access or EtcdAccess(), timeout)
        self._logins = 0  # how many times we logged in anew (see _call)
        self._login_lock = asyncio.Lock()

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        """`op()`, and once more after logging in anew if etcd forgot our user's token:
        etcd keeps its tokens in memory only, so a restart of etcd (or a token idle past
        its TTL) would otherwise lock this process out for good. EtcdRefused when etcd
        will not let us in at all."""
        logins = self._logins
        try:
            return await self._refusing(op)
        except aetcd.exceptions.UnauthenticatedError as exc:
            if self._client._username is None or "invalid auth token" not in str(exc):
                raise
        async with self._login_lock:
            if self._logins == logins:  # nobody else did it meanwhile
                log.info("etcd forgot our auth token; logging in again")
                await self._client.close()
                await self._refusing(self._client.connect)
                self._logins += 1
        return await self._refusing(op)

    @staticmethod
    async def _refusing(op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except aetcd.exceptions.ClientError as exc:
            if (refused := _refusal(exc)) is not None:
                raise refused from None
            raise

    async def connect(self) -> None:
        await self._refusing(self._client.connect)

    async def close(self) -> None:
        await self._client.close()

    async def get(self, key: bytes) -> KeyValue | None:
        raw = await self._call(lambda: self._client.get(key))
        return _kv(raw) if raw is not None else None

    async def get_prefix(self, prefix: bytes) -> list[KeyValue]:
        return [_kv(raw) for raw in await self._call(lambda: self._client.get_prefix(prefix))]

    async def put(self, key: bytes, value: bytes, *, lease: Lease | int | None = None) -> None:
        try:
            await self._call(lambda: self._client.put(key, value, lease=lease_id(lease) or None))
        except aetcd.exceptions.ClientError as exc:
            if _lease_gone(exc):
                raise LeaseGone(f"lease {lease_id(lease):x} is gone") from None
            raise

    async def delete(self, key: bytes) -> bool:
        return await self._call(lambda: self._client.delete(key)) is not None

    def _op(self, op: tx.Put | tx.Delete):
        ops = self._client.transactions
        if isinstance(op, tx.Put):
            return ops.put(op.key, op.value, lease=op.lease or None)
        return ops.delete(op.key)

    def _compare(self, c: tx.Compare):
        ops = self._client.transactions
        target = {"version": ops.version, "mod": ops.mod, "create": ops.create,
                  "value": ops.value}[c.field](c.key)
        if c.op == "==":
            return target == c.operand
        if c.op == "!=":
            return target != c.operand
        return target < c.operand if c.op == "<" else target > c.operand

    async def transaction(self, compare: Sequence[tx.Compare],
                          success: Sequence[tx.Put | tx.Delete],
                          failure: Sequence[tx.Put | tx.Delete] = ()) -> bool:
        try:
            ok, _ = await self._call(lambda: self._client.transaction(
                compare=[self._compare(c) for c in compare],
                success=[self._op(op) for op in success],
                failure=[self._op(op) for op in failure]))
        except aetcd.exceptions.ClientError as exc:
            if _lease_gone(exc):
                raise LeaseGone("a lease of the transaction is gone") from None
            raise
        return bool(ok)

    async def lease(self, ttl: int) -> Lease:
        return _AetcdLease(await self._call(lambda: self._client.lease(ttl)), self)

    async def watch_prefix(self, prefix: bytes) -> _AetcdWatch:
        return _AetcdWatch(await self._call(lambda: self._client.watch_prefix(prefix)))


class EtcdCluster:
    """The cluster's records, over `kv` (default: the etcd at `target`, via AetcdKv)."""

    def __init__(self, target: EtcdTarget, *, timeout: float = 5.0, kv: Kv | None = None,
                 clock: Clock = SYSTEM, identity: Identity | None = None,
                 access: EtcdAccess | None = None) -> None:
        """`identity`: this process's certificate of the cluster, used for an https etcd
        (the cluster's own); `access`, if given, says exactly what to present instead.
        EtcdAccessError (a ValueError) for an https etcd with neither."""
        self.target = target
        self.identity = identity  # what a process this one starts shows etcd (a VM's)
        if kv is None:
            if access is None:
                access = (EtcdAccess.of_identity(identity)
                          if identity is not None and target.secure else EtcdAccess())
            access.check(target)
            kv = AetcdKv(target.host, target.port, timeout=timeout, access=access)
        self.kv: Kv = kv
        self._clock = clock

    async def connect(self, wait: float = 10.0) -> None:
        """Connect, retrying for `wait` seconds: etcd may still be starting."""
        deadline = time.monotonic() + wait
        while True:
            try:
                await self.kv.connect()
                await self.kv.get(self.target.config_key)
                break
            except EtcdRefused:
                await self.kv.close()
                raise
            except Exception as exc:
                if time.monotonic() >= deadline:
                    raise EtcdUnavailable(
                        f"cannot reach etcd at {self.target.url}: {exc}"
                    ) from None
                await asyncio.sleep(0.2)

        await self._refuse_nesting_inside()

    async def _refuse_nesting_inside(self) -> None:
        """A prefix inside another cluster's keys (`/a/vdi` under `/a`) would write node
        and VDI keys that cluster reads as its own, breaking its registry for good."""
        parts = self.target.prefix.strip("/").split("/")
        for i in range(1, len(parts)):
            outer = "/" + "/".join(parts[:i])
            if await self.kv.get(f"{outer}/config".encode()) is not None:
                raise InvalidParams(
                    f"etcd prefix {self.target.prefix} lies inside the keys of the cluster at "
                    f"{outer}: give this cluster a prefix beside it (e.g. {outer}-2)")

    async def _refuse_nesting_below(self) -> None:
        """Formatting a prefix that holds another cluster's keys would make them ours."""
        for kv in await self.kv.get_prefix(self.target.key("").rstrip(b"/") + b"/"):
            key = kv.key.decode(errors="replace")
            if key.endswith("/config") and kv.key != self.target.config_key:
                raise InvalidParams(
                    f"etcd prefix {self.target.prefix} holds the keys of the cluster at "
                    f"{key.removesuffix('/config')}: give this cluster a prefix of its own")

    async def close(self) -> None:
        await self.kv.close()

    # -- reads ------------------------------------------------------------------------

    async def config(self) -> ClusterConfig | None:
        kv = await self.kv.get(self.target.config_key)
        return load_config(kv.value) if kv is not None else None

    async def epoch(self) -> tuple[EpochRecord | None, int]:
        """The current epoch record and its key's mod revision (0 when absent)."""
        kv = await self.kv.get(self.target.epoch_key)
        if kv is None:
            return None, 0
        return load_epoch(kv.value), kv.mod_revision

    async def live_nodes(self) -> list[NodeInfo]:
        kvs = await self.kv.get_prefix(self.target.nodes_prefix)
        return sorted((load_node(kv.value) for kv in kvs), key=lambda n: n.node_id)

    async def epoch_history(self) -> list[EpochRecord]:
        kvs = await self.kv.get_prefix(self.target.epoch_log_prefix)
        return sorted((load_epoch(kv.value) for kv in kvs), key=lambda r: r.epoch)

    async def recovered_members(self, epoch: int) -> set[str]:
        """Ids of the nodes that finished recovering `epoch`."""
        prefix = self.target.recovered_prefix(epoch)
        kvs = await self.kv.get_prefix(prefix)
        return {bytes(kv.key)[len(prefix):].decode() for kv in kvs}

    async def mark_recovered(self, epoch: int, node_id: str) -> None:
        await self.kv.put(self.target.recovered_key(epoch, node_id), b"1")

    # -- writes -----------------------------------------------------------------------

    async def format(self, copies: int, object_size: int) -> ClusterConfig:
        """InvalidParams for what a VDI could not use: the copies an object id carries, an
        object size the data plane can move."""
        validate_copies(copies)
        validate_object_size(object_size)
        await self._refuse_nesting_inside()
        await self._refuse_nesting_below()
        config = ClusterConfig(
            cluster_id=uuid.uuid4().hex, copies=copies, object_size=object_size, created=time.time()
        )
        ok = await self.kv.transaction(
            compare=[tx.version(self.target.config_key) == 0],
            success=[tx.put(self.target.config_key, dump(config))],
        )
        if not ok:
            raise AlreadyFormatted("the cluster is already formatted")
        await self.bump_epoch(lambda current: current)  # a new epoch starts the formatted era
        return config

    async def bump_epoch(
        self,
        members: Callable[[list[NodeInfo]], list[NodeInfo]],
        *,
        extra_success: Callable[[], list[tx.Put | tx.Delete]] | None = None,
        only_if_changed: bool = False,
    ) -> EpochRecord | None:
        """Write epoch N+1 whose members are `members(live nodes)`, in one transaction.

        `extra_success` adds operations to the same transaction (registering or removing
        this node's own key). With `only_if_changed`, nothing is written when the current
        epoch already has exactly those members.
        """
        for _ in range(100):
            current, rev = await self.epoch()
            nodes = sorted(members(await self.live_nodes()), key=lambda n: n.node_id)
            if only_if_changed and current is not None and current.same_members(nodes):
                return None
            record = EpochRecord(
                epoch=(current.epoch if current else 0) + 1, time=time.time(), nodes=tuple(nodes)
            )
            guard = (
                tx.mod(self.target.epoch_key) == rev
                if rev
                else tx.version(self.target.epoch_key) == 0
            )
            ops = [
                tx.put(self.target.epoch_key, dump(record)),
                tx.put(self.target.epoch_log_key(record.epoch), dump(record)),
            ]
            if extra_success is not None:
                ops.extend(extra_success())
            ok = await self.kv.transaction(compare=[guard], success=ops)
            if ok:
                log.info(
                    "epoch %d: %d node(s) %s",
                    record.epoch,
                    len(nodes),
                    ",".join(n.node_id[:8] for n in nodes),
                )
                return record
            await self._clock.sleep(0.01)
        raise ClusterError("could not bump the epoch: too much contention")

    async def lease(self, ttl: int) -> Lease:
        """A lease of `ttl` seconds, kept alive by its holder's refresh()."""
        return await self.kv.lease(ttl)

    # -- watching ---------------------------------------------------------------------

    async def watch(self, on_change: Callable[[], Awaitable[None]], poll: float = 2.0, *,
                    prefix: bytes | None = None) -> None:
        """Call `on_change` at once and after every change under `prefix` (default: the
        whole cluster's), forever; at least every `poll` seconds too.

        The watch stream is re-established after etcd errors; the poll covers the window
        while it is down. The one watch loop of the code base: its Python 3.11
        workarounds live here only.
        """
        prefix = prefix if prefix is not None else self.target.prefix.encode() + b"/"
        while True:
            changed = asyncio.Event()
            pump: asyncio.Future | None = None
            try:
                watch = await self.kv.watch_prefix(prefix)
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    # aetcd creates the watch under asyncio.wait_for, which on 3.11 can
                    # swallow a cancel that lands just then: honour it here
                    with contextlib.suppress(Exception):
                        await watch.cancel()
                    raise asyncio.CancelledError

                async def drain(watch=watch, changed=changed) -> None:
                    async for _event in watch:
                        changed.set()

                pump = asyncio.ensure_future(drain())
                while not pump.done():
                    await on_change()
                    # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel
                    # that lands as the event fires, and the watcher never stops
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(poll):
                            await changed.wait()
                    changed.clear()
                pump.result()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("etcd watch broke (%s); retrying", exc)
                await self._clock.sleep(min(poll, 1.0))
            finally:
                if pump is not None:
                    pump.cancel()
