"""Live migration's source end, and what it reports: QEMU's pre-copy migration driven over
QMP (auto-converge: a guest dirtying memory faster than the link carries it is slowed
until the last round fits the downtime limit), its progress polled and passed on.

The destination end is the incoming mode of the supervisor (supervisor.py), the lock
handover is sheep/vdi/handover.py, and the order of it all is dog's (sheep/cli/dog_vm.py):
the destination is started first, then the source sends, then the destination's
supervisor takes the VM's runtime record and lets the guest run.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

from sheep.security.pki import SERVER_NAME

from .cmdline import MIGRATION_TLS_ID
from .errors import QemuFailed, VmError
from .qmp import monitor

POLL = 0.5  # s between progress reports
DEFAULT_BANDWIDTH = 1 << 30  # bytes/s: QEMU's own default (32 MiB/s) is a WAN's
DEFAULT_TIMEOUT = 600.0  # s a migration may take before it is called off


class MigrationFailed(VmError):
    """the migration did not complete: the VM runs on at its source"""


@dataclass(frozen=True)
class Progress:
    """One look at a migration, as QEMU's query-migrate tells it."""

    status: str  # setup, active, device, completed, failed, cancelled...
    transferred: int = 0  # bytes of RAM sent so far
    remaining: int = 0
    total: int = 0  # the guest's RAM
    mbps: float = 0.0
    dirty_rate: int = 0  # pages/s the guest dirties
    expected_downtime_ms: int = 0
    downtime_ms: int = 0  # once completed: how long the guest was stopped
    total_ms: int = 0
    iterations: int = 0  # dirty-sync rounds
    throttle: int = 0  # % of CPU auto-converge takes from the guest
    error: str = ""

    @classmethod
    def from_query(cls, q: dict) -> Progress:
        ram = q.get("ram", {})
        return cls(str(q.get("status", "none")), int(ram.get("transferred", 0)),
                   int(ram.get("remaining", 0)), int(ram.get("total", 0)),
                   float(ram.get("mbps", 0.0)), int(ram.get("dirty-pages-rate", 0)),
                   int(q.get("expected-downtime", 0)), int(q.get("downtime", 0)),
                   int(q.get("total-time", 0)), int(ram.get("dirty-sync-count", 0)),
                   int(q.get("cpu-throttle-percentage", 0)), str(q.get("error-desc", "")))

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @property
    def percent(self) -> float:
        """Of the RAM, sent (a guest that dirties pages sends some twice: capped)."""
        if self.status == "completed":
            return 100.0
        if not self.total:
            return 0.0
        return min(99.9, 100.0 * (self.total - self.remaining) / self.total)

    def dump(self) -> dict:
        return asdict(self)


async def migrate_out(qmp: str | Path, uri: str, *, bandwidth: int = DEFAULT_BANDWIDTH,
                      timeout: float = DEFAULT_TIMEOUT,
                      tls_dir: Path | None = None) -> AsyncIterator[Progress]:
    """Send the VM whose monitor is `qmp` to the QEMU listening at `uri`; its progress
    every POLL seconds, the last one completed. MigrationFailed when QEMU gives up, or the
    migration outlasts `timeout` (then it is cancelled): the guest then runs on here.
    `tls_dir`: the certificate (endpoint=client) to send under TLS with; QEMU reads it at
    once, and the directory is removed."""
    async with monitor(qmp) as mon:
        await _tls(mon, tls_dir)
        # events: the source's supervisor sees the guest stop for good at once
        await mon.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "auto-converge", "state": True},
            {"capability": "events", "state": True}]})
        await mon.execute("migrate-set-parameters", {"max-bandwidth": bandwidth})
        await mon.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + timeout
        try:
            while True:
                reply = await mon.execute("query-migrate")
                assert isinstance(reply, dict)
                progress = Progress.from_query(reply)
                yield progress
                if progress.status == "completed":
                    return
                if progress.done:
                    raise MigrationFailed(f"the migration {progress.status}"
                                          f"{': ' + progress.error if progress.error else ''}")
                if time.monotonic() > deadline:
                    raise MigrationFailed(f"the migration did not complete within "
                                          f"{timeout:.0f}s")
                await asyncio.sleep(POLL)
        except BaseException:
            await _cancel(mon)
            raise


async def _tls(mon, tls_dir: Path | None) -> None:
    """The migration's TLS parameters: the node's certificate, and the name every node's
    certificate bears; none without `tls_dir` (a cluster without certificates)."""
    with contextlib.suppress(QemuFailed):  # an earlier migration's, if any
        await mon.execute("object-del", {"id": MIGRATION_TLS_ID})
    if tls_dir is None:
        await mon.execute("migrate-set-parameters", {"tls-creds": ""})
        return
    try:
        await mon.execute("object-add", {"qom-type": "tls-creds-x509", "id": MIGRATION_TLS_ID,
                                         "dir": str(tls_dir), "endpoint": "client",
                                         "verify-peer": True})
    finally:
        shutil.rmtree(tls_dir, ignore_errors=True)
    await mon.execute("migrate-set-parameters", {"tls-creds": MIGRATION_TLS_ID,
                                                 "tls-hostname": SERVER_NAME})


async def _cancel(mon) -> None:
    """Call the migration off; QEMU lets the guest run on here."""
    try:
        await mon.execute("migrate_cancel")
    except Exception:
        return
