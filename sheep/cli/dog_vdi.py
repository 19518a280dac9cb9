"""`dog vdi ...`: VDI commands. They read the cluster's etcd address from the node named by
-a, then act as a client of the cluster themselves (registry in etcd, objects over the data
plane), so bulk transfers never squeeze through the control plane."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator

from sheep.control import sheep_pb2 as pb
from sheep.gateway.iscsi.names import lun_identity
from sheep.gateway.loopback import loopback_nbd
from sheep.gateway.scsi.inquiry import unit_serial
from sheep.names import target_name
from sheep.units import format_size, parse_size, round_up
from sheep.vdi.check import check_vdi
from sheep.vdi.images import (
    FORMATS,
    ImageInfo,
    check_format,
    convert,
    format_for_path,
    local,
    probe,
    qemu_img_available,
)
from sheep.vdi.inode import max_vdi_size
from sheep.vdi.inodes import nblocks
from sheep.vdi.manager import VdiManager
from sheep.vdi.registry import RegistryState, VdiRecord
from sheep.vdi.transfer import export_file, import_file
from sheep.vdi.volume import Volume

from .common import (
    RPC_TIMEOUT,
    DogError,
    Interrupted,
    cluster_manager,
    free_space,
    print_check_report,
    progress_bar,
    progress_option,
    table,
    when,
)
from .output import emit

_WINDOW = 4  # block-sized reads or writes in flight


def _size(text: str, what: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise DogError(f"{what}: {exc}") from None


def _sectors(size: int, name: str) -> int:
    """A VDI's size in whole 512-byte sectors, rounded up with a notice on stderr: block
    devices (NBD, iSCSI, QEMU) see disks in sectors, and a part-sector tail made iSCSI
    report a block it could not read and disagree with NBD about the size."""
    whole = round_up(size)
    if whole != size:
        print(f"dog: note: VDI {name!r} size {size} bytes rounded up to {whole} bytes "
              f"(whole 512-byte sectors)", file=sys.stderr)
    return whole


def _record_dict(rec: VdiRecord, allocated: int, shared: int) -> dict:
    """`allocated`: bytes of the objects the VDI owns (its own written blocks), not bytes
    on disk, which `dog node info` calls Used."""
    return {"name": rec.name, "tag": rec.tag, "id": rec.id, "parent": rec.parent,
            "size": rec.size, "allocated": allocated, "shared": shared, "copies": rec.copies,
            "block_size": rec.block_size, "snapshot": rec.snapshot, "created": rec.created,
            "snap_time": rec.snap_time, "incomplete": rec.incomplete}


def _split_at(spec: str) -> tuple[str, str | None]:
    name, sep, tag = spec.partition("@")
    return name, (tag if sep else None)


async def _room(stub, copies: int) -> tuple[int, int]:
    """(bytes of VDI data the cluster can still store with `copies` replicas, and with
    nothing stored): free space, and free plus used, divided by the copies."""
    nodes = (await stub.NodeList(pb.Empty(), timeout=RPC_TIMEOUT)).nodes
    free = free_space(nodes)
    used = sum(s.used for s in nodes if s.reachable)
    return free // copies, (free + used) // copies


async def _check_room(stub, name: str, size: int, new_bytes: int, copies: int,
                      prealloc: bool) -> str:
    """Preallocating more than the cluster has free is refused before a byte is written.
    For a thin VDI larger than the whole cluster, returns the warning to print once the
    command succeeded (else "")."""
    free, whole = await _room(stub, copies)
    if prealloc and new_bytes > free:
        raise DogError(f"cannot preallocate {format_size(new_bytes)} for VDI {name!r}: "
                         f"with {copies} copies the cluster has room for {format_size(free)}")
    if not prealloc and size > whole:
        return (f"dog: warning: VDI {name!r} ({format_size(size)}) is larger than the "
                f"cluster can hold with {copies} copies ({format_size(whole)}); writes will "
                f"fail when space runs out")
    return ""


def _warn(warning: str) -> None:
    if warning:
        print(warning, file=sys.stderr)


# -- commands ------------------------------------------------------------------------------


async def vdi_create(stub, args) -> None:
    size = _sectors(_size(args.size, "VDI size"), args.name)
    async with cluster_manager(stub, args, "vdi") as m:
        config = m.client.view.config
        assert config is not None
        m.check_size(size, config.object_size)
        blocks = -(-size // config.object_size) * config.object_size
        warning = await _check_room(stub, args.name, size, blocks,
                                    args.copies if args.copies is not None else config.copies,
                                    args.prealloc)
        rec = await m.create(args.name, size, copies=args.copies, prealloc=args.prealloc)
    _warn(warning)
    if args.json:
        emit(_record_dict(rec, nblocks(rec) * rec.block_size if args.prealloc else 0, 0))
    else:
        print(f"VDI {rec.name} created: {format_size(rec.size)}, {rec.copies} copies, "
              f"id {rec.id}")


async def _listing(m: VdiManager, state: RegistryState, names: list[str]) -> list[dict]:
    out = []
    for name in names:
        for rec in state.family(name):
            usage = await m.usage(rec)
            out.append(_record_dict(rec, usage.used, usage.shared))
    return out


async def vdi_list(stub, args) -> None:
    async with cluster_manager(stub, args, "vdi") as m:
        state = await m.state()
        names = sorted(state.working) if args.name is None else [args.name]
        if args.name is not None and args.name not in state.working:
            raise DogError(f"no VDI named {args.name!r}")
        rows = await _listing(m, state, names)
    if args.json:
        emit({"vdis": rows})
        return
    listed = [["s" if r["snapshot"] else "",
              r["name"] + (" (incomplete)" if r["incomplete"] else ""), r["tag"] or "-",
              str(r["id"]),
              format_size(r["size"]), format_size(r["allocated"]), format_size(r["shared"]),
              str(r["copies"]), when(r["snap_time"] if r["snapshot"] else r["created"])]
             for r in rows]
    print(table(listed, ["", "Name", "Tag", "Id", "Size", "Allocated", "Shared", "Copies",
                          "Time"]))


async def vdi_tree(stub, args) -> None:
    async with cluster_manager(stub, args, "vdi") as m:
        state = await m.state()
    records = state.records
    roots = sorted((r for r in records.values() if r.parent not in records), key=lambda r: r.id)
    if args.json:
        def node(rec: VdiRecord) -> dict:
            return {"id": rec.id, "name": rec.name, "tag": rec.tag, "snapshot": rec.snapshot,
                    "children": [node(c) for c in state.children(rec.id)]}
        emit({"tree": [node(r) for r in roots]})
        return
    lines: list[str] = []

    def walk(rec: VdiRecord, prefix: str, last: bool, top: bool) -> None:
        label = f"{rec.name}@{rec.tag}" if rec.snapshot else f"{rec.name} (working)"
        lines.append(label if top else f"{prefix}{'└── ' if last else '├── '}{label}")
        kids = state.children(rec.id)
        for i, kid in enumerate(kids):
            walk(kid, "" if top else prefix + ("    " if last else "│   "),
                 i == len(kids) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    print("\n".join(lines))


_INCOMPLETE = ("incomplete: an import into it did not finish (import again with --force, "
               "or delete it)")


async def vdi_info(stub, args) -> None:
    async with cluster_manager(stub, args, "vdi") as m:
        state = await m.state()
        rec = state.lookup(args.name, args.snapshot)
        usage = await m.usage(rec)
        lock = state.locks.get(args.name)
    info = _record_dict(rec, usage.used, usage.shared)
    info["snapshots"] = [r.tag for r in state.family(args.name) if r.snapshot]
    info["objects"] = nblocks(rec)
    info["locked_by"] = lock.holder if lock is not None and not rec.snapshot else ""
    info["iscsi_target"] = target_name(rec.label)
    info["scsi_serial"] = unit_serial(lun_identity(rec, rec.snapshot))
    allow = state.nbd_allow.get(args.name)
    info["nbd_allow"] = sorted(allow) if allow is not None else None
    # the snapshot a clone or a snapshotted VDI grows from, as the user names it
    parent = state.records.get(rec.parent)
    info["parent_name"] = parent.label if parent is not None else ""
    if args.json:
        emit(info)
        return
    parent_line = f"{info['parent_name']} (id {rec.parent})" if rec.parent else "-"
    print(f"Name: {rec.label}\nId: {rec.id}\nParent: {parent_line}\n"
          f"Size: {format_size(rec.size)} ({rec.size} bytes)\n"
          f"Allocated: {format_size(usage.used)}\nShared: {format_size(usage.shared)}\n"
          f"Copies: {rec.copies}\nBlock size: {format_size(rec.block_size)}\n"
          f"Created: {when(rec.created)}\n"
          + (f"Status: {_INCOMPLETE}\n" if rec.incomplete else "")
          + (f"Snapshot time: {when(rec.snap_time)}\n" if rec.snapshot else "")
          + f"Snapshots: {', '.join(info['snapshots']) or '-'}\n"
          f"Locked by: {info['locked_by'] or '-'}\n"
          f"iSCSI target: {info['iscsi_target']} (SCSI serial {info['scsi_serial']})\n"
          f"NBD allow-list: {', '.join(info['nbd_allow']) if allow is not None else '-'}")


async def vdi_set(stub, args) -> None:
    """Settings kept with a VDI in the registry: for now who may attach it over NBD."""
    if args.nbd_allow is None and not args.nbd_allow_any:
        raise DogError("nothing to set: give --nbd-allow NAMES or --nbd-allow-any")
    if args.nbd_allow is not None and args.nbd_allow_any:
        raise DogError("--nbd-allow and --nbd-allow-any contradict each other")
    names = None
    if args.nbd_allow is not None:
        names = frozenset(n.strip() for n in args.nbd_allow.split(","))
        if not names or "" in names:
            raise DogError("--nbd-allow takes names separated by commas")
    async with cluster_manager(stub, args, "vdi") as m:
        await m.registry.set_nbd_allow(args.name, names)
    if args.json:
        emit({"name": args.name, "nbd_allow": sorted(names) if names is not None else None})
    elif names is None:
        print(f"VDI {args.name}: any client certificate of the cluster may attach it over NBD")
    else:
        print(f"VDI {args.name}: only {', '.join(sorted(names))} may attach it over NBD "
              f"(over TLS)")


async def vdi_snapshot(stub, args) -> None:
    async with cluster_manager(stub, args, "vdi") as m:
        rec = await m.snapshot(args.name, args.snapshot)
    if args.json:
        emit(_record_dict(rec, 0, 0))
    else:
        print(f"snapshot {rec.label} taken (id {rec.id})")


async def vdi_clone(stub, args) -> None:
    name, tag = _split_at(args.source)
    tag = args.snapshot or tag
    if not tag:
        raise DogError("clone needs a snapshot: NAME@TAG or -s TAG")
    async with cluster_manager(stub, args, "vdi") as m:
        rec = await m.clone(name, tag, args.new_name)
    if args.json:
        emit(_record_dict(rec, 0, 0))
    else:
        print(f"VDI {rec.name} cloned from {name}@{tag} (id {rec.id})")


async def vdi_rollback(stub, args) -> None:
    async with cluster_manager(stub, args, "vdi") as m:
        rec = await m.rollback(args.name, args.snapshot)
    if args.json:
        emit(_record_dict(rec, 0, 0))
    else:
        print(f"VDI {rec.name} rolled back to {args.snapshot} (id {rec.id})")


async def vdi_flatten(stub, args) -> None:
    async with cluster_manager(stub, args, "vdi") as m:
        rec = await m.flatten(args.name, progress_bar(args.progress, "flatten"))
    if args.json:
        emit(_record_dict(rec, 0, 0))
    else:
        print(f"VDI {rec.name} flattened")


async def vdi_delete(stub, args) -> None:
    if args.recursive and args.snapshot:
        raise DogError("-r deletes every snapshot of the VDI: give no -s with it")
    async with cluster_manager(stub, args, "vdi") as m:
        if args.recursive:
            deleted, removed = await m.delete_recursive(args.name)
        else:
            removed = await m.delete(args.name, args.snapshot)
            deleted = [f"{args.name}@{args.snapshot}" if args.snapshot else args.name]
        state = await m.state()
    remaining = [r.tag for r in state.family(args.name) if r.snapshot]
    if args.json:
        emit({"deleted": deleted, "reclaimed_objects": removed,
               "remaining_snapshots": remaining})
        return
    print(f"VDI {', '.join(deleted)} deleted; {removed} object(s) reclaimed")
    if remaining and not args.snapshot:
        print(f"its snapshots remain: {', '.join(remaining)} ('dog vdi delete -r "
              f"{args.name}' removes them too)")


async def vdi_resize(stub, args) -> None:
    size = _sectors(_size(args.size, "VDI size"), args.name)
    async with cluster_manager(stub, args, "vdi") as m:
        current = (await m.state()).lookup(args.name)
        bs = current.block_size
        new_bytes = max(0, -(-size // bs) - -(-current.size // bs)) * bs
        m.check_size(size, bs)
        warning = await _check_room(stub, args.name, size, new_bytes, current.copies,
                                    args.prealloc)
        rec = await m.resize(args.name, size, prealloc=args.prealloc)
    _warn(warning)
    if args.json:
        emit(_record_dict(rec, 0, 0))
    else:
        print(f"VDI {rec.name} is now {format_size(rec.size)}")


def _range(args: argparse.Namespace, size: int) -> tuple[int, int | None]:
    offset = _size(args.offset, "offset") if args.offset is not None else 0
    length = _size(args.length, "length") if args.length is not None else None
    if offset > size:
        raise DogError(f"offset {offset} is past the end of the VDI ({size} bytes)")
    if length is not None and offset + length > size:
        raise DogError(f"range [{offset}, {offset + length}) is past the end of the VDI "
                         f"({size} bytes)")
    return offset, length


async def vdi_read(stub, args) -> None:
    async with (cluster_manager(stub, args, "vdi") as m,
                await m.open(args.name, args.snapshot) as vol):
        offset, length = _range(args, vol.size)
        end = vol.size if length is None else offset + length
        out = sys.stdout.buffer
        window: collections.deque[asyncio.Task] = collections.deque()
        for pos, n in _chunks(offset, end, vol.block_size):
            window.append(asyncio.ensure_future(vol.read(pos, n)))
            if len(window) >= _WINDOW:
                out.write(await window.popleft())
        while window:
            out.write(await window.popleft())
        out.flush()


def _chunks(start: int, end: int, block_size: int) -> Iterator[tuple[int, int]]:
    """Block-aligned pieces of [start, end): each one touches a single object."""
    pos = start
    while pos < end:
        n = min(block_size - pos % block_size, end - pos)
        yield pos, n
        pos += n


async def vdi_write(stub, args) -> None:
    async with cluster_manager(stub, args, "vdi") as m:
        size = (await m.state()).lookup(args.name).size
        offset, length = _range(args, size)
        room = size - offset
        source = sys.stdin.buffer
        with contextlib.ExitStack() as stack:
            if length is None:
                if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
                    # a pipe: learn how much comes before writing anything
                    source = stack.enter_context(await asyncio.to_thread(_spool, source, room))
                length = os.fstat(source.fileno()).st_size - source.tell()
                if length > room:
                    raise DogError(f"standard input holds more than the {room} bytes that "
                                     f"fit from offset {offset}; nothing written")
            written = await _write_stream(m, args.name, source, offset, offset + length)
    if args.json:
        emit({"name": args.name, "offset": offset, "written": written})


def _spool(stream, room: int):
    """Copy at most room+1 bytes of `stream` into an unnamed temporary file."""
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - the caller's ExitStack closes it
    left = room + 1
    while left > 0:
        chunk = stream.read(min(left, 4 << 20))
        if not chunk:
            break
        spool.write(chunk)
        left -= len(chunk)
    spool.seek(0)
    return spool


async def _write_stream(m: VdiManager, name: str, source, offset: int, end: int) -> int:
    """Write `source` into [offset, end) of the VDI, or less if it ends first; returns how
    many bytes were written."""
    written = 0
    async with await m.open(name, writable=True) as vol:
        pending: set[asyncio.Task] = set()
        for pos, n in _chunks(offset, end, vol.block_size):
            data = await asyncio.to_thread(source.read, n)
            if data:
                pending.add(asyncio.ensure_future(vol.write(pos, data)))
                written += len(data)
            if len(pending) >= _WINDOW:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            if len(data) < n:
                break
        await asyncio.gather(*pending)
        await vol.flush()
    return written


async def vdi_import(stub, args) -> None:
    fmt = check_format(args.format) if args.format else None
    if not os.path.isfile(args.file):
        raise DogError(f"{args.file}: no such file")
    # without qemu-img, an image of unknown format is taken to be raw, as before formats
    if (fmt is None and qemu_img_available()) or fmt not in (None, "raw"):
        info = await probe(args.file, fmt)
        if info.format != "raw":
            await _import_image(stub, args, info)
            return
    size = os.path.getsize(args.file)
    if size == 0:
        raise DogError(f"{args.file} is empty")
    async with (cluster_manager(stub, args, "vdi") as m, _importing(m, args, size),
                await m.open(args.name, writable=True) as vol):
        written = await import_file(vol, args.file, progress_bar(args.progress, "import"))
        await _zero_tail(vol, size)
    if args.json:
        emit({"name": args.name, "format": "raw", "size": size, "written": written})
    else:
        print(f"imported {format_size(size)} into {args.name} "
              f"({format_size(written)} of data)")


@contextlib.asynccontextmanager
async def _importing(m: VdiManager, args: argparse.Namespace, size: int
                     ) -> AsyncIterator[None]:
    """The VDI an import writes into, marked incomplete until its last byte is flushed. A
    VDI the import created is deleted if the import fails or is interrupted (SIGINT, or
    SIGTERM: see dog.main); an existing one (only with --force) stays, marked incomplete.
    What happened is said in one line, and an interruption exits 130."""
    state = await m.state()
    created = args.name not in state.working
    if not created:
        current = state.lookup(args.name)
        if not args.force:
            raise DogError(f"VDI {args.name!r} exists; 'dog vdi import --force' replaces "
                             f"its content")
        if current.size < size:
            raise DogError(f"{args.file} is a {size}-byte disk, more than VDI "
                             f"{args.name!r} ({current.size} bytes); nothing written")
        await m.mark_incomplete(args.name, True)
    else:
        await m.create(args.name, _sectors(size, args.name), copies=args.copies,
                       incomplete=True)
    try:
        yield
    except BaseException as exc:
        fate = "left marked incomplete"
        if created:
            with contextlib.suppress(Exception):
                await m.delete(args.name)
                fate = "deleted"
        if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
            raise Interrupted(f"import interrupted: VDI {args.name!r} {fate}") from None
        raise
    await m.mark_incomplete(args.name, False)


async def _zero_tail(vol: Volume, size: int) -> None:
    """An image smaller than the VDI it replaces leaves no old bytes behind: from the
    image's end on, the VDI reads as zeros (its objects released)."""
    if vol.size > size:
        await vol.discard(size, vol.size - size)
        await vol.flush()


async def _import_image(stub, args, info: ImageInfo) -> None:
    """Through qemu-img into a loopback NBD export of the VDI. A VDI with no data yet is
    declared zero to qemu-img, which then writes only the image's data: the VDI stays thin."""
    size = info.virtual_size
    async with cluster_manager(stub, args, "vdi") as m:
        async with _importing(m, args, size), loopback_nbd(
                m.client, m.registry, m.holder, args.name, writable=True) as gateway:
            vol = gateway.volume
            await convert(local(args.file), info.format, gateway.url, "raw",
                          target_exists=True, target_is_zero=not any(vol.table),
                          size=size, progress=progress_bar(args.progress, "import"))
            await _zero_tail(vol, size)
        used = (await m.usage((await m.state()).lookup(args.name))).used
    if args.json:
        emit({"name": args.name, "format": info.format, "size": size, "allocated": used})
    else:
        print(f"imported {format_size(size)} {info.format} image into {args.name} "
              f"({format_size(used)} allocated)")


async def vdi_export(stub, args) -> None:
    name, tag = _split_at(args.name)
    if tag is not None and args.snapshot is not None and tag != args.snapshot:
        raise DogError(f"two snapshots named: {args.name} and -s {args.snapshot}")
    tag = tag if tag is not None else args.snapshot
    fmt = check_format(args.format) if args.format else format_for_path(args.file)
    label = f"{name}@{tag}" if tag else name
    async with cluster_manager(stub, args, "vdi") as m:
        if fmt == "raw":
            async with await m.open(name, tag) as vol:
                written = await export_file(vol, args.file, progress_bar(args.progress, "export"))
            if args.json:
                emit({"name": label, "format": fmt, "size": vol.size, "written": written})
            else:
                print(f"exported {label} to {args.file}: {format_size(vol.size)} "
                      f"({format_size(written)} of data)")
            return
        size = await _export_image(m, name, tag, args.file, fmt, args.progress)
    on_disk = os.stat(args.file).st_blocks * 512
    if args.json:
        emit({"name": label, "format": fmt, "size": size, "file_size": on_disk})
    else:
        print(f"exported {label} to {args.file} ({fmt}): {format_size(size)} "
              f"({format_size(on_disk)} on disk)")


async def _export_image(m: VdiManager, name: str, tag: str | None, path: str, fmt: str,
                        progress: bool) -> int:
    """Through qemu-img from a read-only loopback NBD export: qemu-img asks the gateway
    for block status and skips unallocated ranges, so a thin VDI makes a small image."""
    # vpc would round the disk up to a whole CHS geometry; force_size keeps it exact
    options = ("force_size=on",) if fmt == "vpc" else ()
    async with loopback_nbd(m.client, m.registry, m.holder, name, tag) as gateway:
        existed = os.path.lexists(path)
        try:
            await convert(gateway.url, "raw", local(path), fmt, options=options,
                          size=gateway.volume.size, progress=progress_bar(progress, "export"))
            fd = os.open(path, os.O_RDONLY)  # durable on return, as a raw export is
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            if not existed:  # a half-written image is worse than none
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        return gateway.volume.size


async def vdi_check(stub, args) -> None:
    async with cluster_manager(stub, args, "vdi") as m:
        rec = (await m.state()).lookup(args.name, args.snapshot)
        report = await check_vdi(m.client, rec, repair=args.repair,
                                 progress=progress_bar(args.progress, "check", objects=True))
    print_check_report(report, args)


async def lock_list(stub, args) -> None:
    async with cluster_manager(stub, args, "vdi") as m:
        locks = sorted((await m.state()).locks.values(), key=lambda lock: lock.name)
    if args.json:
        emit({"locks": [{"name": x.name, "holder": x.holder, "host": x.host, "pid": x.pid,
                          "since": x.since} for x in locks]})
        return
    print(table([[x.name, x.holder, x.host, str(x.pid), when(x.since)] for x in locks],
                 ["Name", "Holder", "Host", "Pid", "Since"]))


async def lock_unlock(stub, args) -> None:
    async with cluster_manager(stub, args, "vdi") as m:
        (await m.state()).lookup(args.name)
        broken = await m.registry.break_lock(args.name, force=args.force)
    if broken is None:
        raise DogError(f"VDI {args.name!r} is not locked")
    if args.json:
        emit({"unlocked": args.name, "holder": broken.holder, "host": broken.host,
               "pid": broken.pid})
    else:
        print(f"lock on {args.name} broken (it was held by {broken.who})")


# -- parser --------------------------------------------------------------------------------


def add_vdi_commands(kinds: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    vdi = kinds.add_parser("vdi", help="virtual disk images").add_subparsers(
        dest="cmd", required=True)

    def cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        p = vdi.add_parser(name, parents=[common], help=help)
        p.set_defaults(func=func)
        return p

    def snap_opt(p: argparse.ArgumentParser, required: bool = False) -> None:
        p.add_argument("-s", "--snapshot", metavar="TAG", required=required,
                       help="the snapshot's tag")

    p = cmd("create", vdi_create, "create a thin VDI")
    p.description = (f"Create a thin VDI. Its size is at most (OBJECT_SIZE - 4096) / 4 "
                     f"objects: {max_vdi_size(4 << 20) >> 30} GiB "
                     f"({max_vdi_size(4 << 20)} bytes) with the default 4 MiB objects.")
    p.add_argument("name", help="the new VDI's name")
    p.add_argument("size", help="bytes, or with a suffix: 10G, 512M (see the maximum above)")
    p.add_argument("-c", "--copies", type=int, help="replicas (default: the cluster's)")
    p.add_argument("-P", "--prealloc", action="store_true", help="allocate every object now")
    p = cmd("list", vdi_list, "VDIs and snapshots with their space")
    p.add_argument("name", nargs="?", help="only this VDI and its snapshots")
    cmd("tree", vdi_tree, "the snapshot and clone tree")
    p = cmd("info", vdi_info, "one VDI or snapshot")
    p.add_argument("name", help="the VDI's name")
    snap_opt(p)
    p = cmd("set", vdi_set, "settings kept with a VDI (who may attach it over NBD)")
    p.add_argument("name", help="the VDI (its snapshots follow it)")
    p.add_argument("--nbd-allow", metavar="NAME[,NAME...]",
                   help="only clients whose certificate has one of these names (or, as "
                        "psk:IDENTITY, who prove that identity's pre-shared key: sheep run "
                        "--nbd-tls-psk) may attach it over NBD, and only over TLS (a node "
                        "with --nbd-tls off refuses)")
    p.add_argument("--nbd-allow-any", action="store_true",
                   help="any client certificate of the cluster (or PSK identity) may "
                        "attach it (the default)")
    p = cmd("snapshot", vdi_snapshot, "snapshot a VDI (also while it is in use)")
    p.add_argument("name", help="the VDI to snapshot")
    snap_opt(p, required=True)
    p = cmd("clone", vdi_clone, "writable copy-on-write clone of a snapshot")
    p.add_argument("source", metavar="NAME@TAG", help="the snapshot to clone")
    p.add_argument("new_name", metavar="NEWNAME", help="the clone's name")
    snap_opt(p)
    p = cmd("rollback", vdi_rollback, "make a VDI the content of one of its snapshots")
    p.add_argument("name", help="the VDI to roll back")
    snap_opt(p, required=True)
    p = cmd("flatten", vdi_flatten, "copy a clone's shared blocks so it stands alone")
    p.add_argument("name", help="the clone to flatten")
    progress_option(p)
    p = cmd("delete", vdi_delete, "delete a VDI or one snapshot, reclaiming its objects")
    p.add_argument("name", help="the VDI (with -s, the VDI whose snapshot goes)")
    snap_opt(p)
    p.add_argument("-r", "--recursive", action="store_true",
                   help="the VDI and every snapshot of it (clones of them stay)")
    p = cmd("resize", vdi_resize, "grow a VDI")
    p.add_argument("name", help="the VDI to grow")
    p.add_argument("size", help="its new size: bytes, or with a suffix (20G)")
    p.add_argument("-P", "--prealloc", action="store_true",
                   help="allocate every object of the new part now")
    for name, func, help in (("read", vdi_read, "VDI bytes to stdout"),
                             ("write", vdi_write, "stdin to VDI bytes")):
        p = cmd(name, func, help)
        p.add_argument("name", help="the VDI's name")
        p.add_argument("offset", nargs="?", help="first byte (a size: 0, 4M; default 0)")
        p.add_argument("length", nargs="?",
                       help="how many bytes (default: " + ("to the end of the VDI)"
                                                           if name == "read" else
                                                           "all of stdin)"))
        if name == "read":
            snap_opt(p)
    formats = ", ".join(FORMATS)
    p = cmd("import", vdi_import, "copy a disk image into a VDI (created if missing), thin")
    p.add_argument("name", help="the VDI to fill")
    p.add_argument("file", help="the disk image to read")
    p.add_argument("-f", "--format", metavar="FMT",
                   help=f"the image's format: {formats} (default: what qemu-img detects)")
    p.add_argument("-c", "--copies", type=int, help="replicas, when the VDI is created")
    p.add_argument("--force", action="store_true",
                   help="import into an existing VDI, replacing all of its content")
    progress_option(p)
    p = cmd("export", vdi_export, "copy a VDI or snapshot into a disk image file, thin")
    p.add_argument("name", metavar="NAME[@TAG]", help="the VDI, or one of its snapshots")
    p.add_argument("file", help="the image file to write (replaced if it exists)")
    p.add_argument("-f", "--format", metavar="FMT",
                   help=f"{formats} (default: from FILE's extension .qcow2 .vmdk .vdi .vhdx "
                        f".vhd, else raw)")
    snap_opt(p)
    progress_option(p)
    p = cmd("check", vdi_check, "compare every replica of every object; --repair fixes")
    p.add_argument("name", help="the VDI to check")
    snap_opt(p)
    p.add_argument("--repair", action="store_true", help="rewrite bad replicas from good ones")
    progress_option(p)
    lock = vdi.add_parser("lock", help="write locks").add_subparsers(dest="lock_cmd",
                                                                     required=True)
    p = lock.add_parser("list", parents=[common], help="who holds which VDI open for writing")
    p.set_defaults(func=lock_list)
    p = lock.add_parser("unlock", parents=[common],
                        help="break a VDI's write lock (of a holder that is gone)")
    p.add_argument("name", help="the locked VDI")
    p.add_argument("--force", action="store_true",
                   help="break it even though its holder runs (that writer stops)")
    p.set_defaults(func=lock_unlock)
