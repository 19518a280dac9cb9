"""Live migration of the demo guest between two nodes: `python -m bench.migration`.

    python -m bench.migration [--rounds 6] [--memory 256] [--out FILE]

Brings up a private etcd and a 2-node cluster (copies=2) whose nodes both serve NBD (a VM's
disks go through its host's gateway), boots the demo guest on node 0 with a job that keeps
writing its disk (O_DIRECT, 1 MiB a round) and dirtying 32 MiB of its memory, and migrates
it back and forth --rounds times with `dog vm migrate --json`. Reports, as medians: the
whole migration as dog sees it, QEMU's downtime, the switch-over at the destination (the
record and the disks' locks taken, the guest let run), and the RAM sent. Under TCG here
unless the accelerator probe proves KVM. Everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu_driver.guest import guest_artifacts, job_append
from sheep.localcluster import LocalCluster, free_port

DOG = [sys.executable, "-m", "sheep.cli.dog"]
JOB = """
dd if=/dev/zero of=/dev/shm/dirty bs=1048576 count=32 2>/dev/null
i=0
while true; do
  dd if=/dev/urandom of=/dev/shm/dirty bs=1048576 count=32 conv=notrunc 2>/dev/null
  dd if=/dev/urandom of=/dev/vda bs=1048576 count=1 seek=$((i % 16)) oflag=direct \\
     conv=notrunc 2>/dev/null
  i=$((i + 1))
done
"""


def dog(address: str, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run([*DOG, *args, "-a", address], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"dog {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--memory", type=int, default=256, help="the guest's MiB")
    parser.add_argument("--out", type=Path, help="results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sheep-migration-") as tmp:
        ports = [free_port(), free_port()]
        cluster = LocalCluster(Path(tmp) / "cluster", 2,
                               node_extra=lambda i: ["--nbd-port", str(ports[i])])
        try:
            cluster.up(copies=2)
            return run(cluster, Path(tmp), args)
        finally:
            subprocess.run([*DOG, "vm", "stop", "bench", "--timeout", "1", "-a",
                            cluster.address], capture_output=True, timeout=120)
            cluster.stop()


def run(cluster: LocalCluster, tmp: Path, args: argparse.Namespace) -> int:
    a = cluster.address
    ids = {n["node"]["control_port"]: n["node"]["id"]
           for n in json.loads(dog(a, "node", "list", "--json"))["nodes"]}
    nodes = [ids[n.port] for n in cluster.nodes]
    guest = guest_artifacts()
    dog(a, "vdi", "create", "bench", "64M")
    dog(a, "vm", "create", "bench", "--vdi", "bench", "--memory", str(args.memory),
        "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
        "--append", job_append(JOB))
    rt = json.loads(dog(a, "vm", "start", "bench", "--on", nodes[0], "--run-dir",
                        str(tmp / "vms"), "--json"))
    print(f"guest: {args.memory} MiB under {rt['accel']}; waiting for its job", flush=True)
    time.sleep(20)
    runs = []
    for i in range(args.rounds):
        to = nodes[(i + 1) % 2]
        done = json.loads(dog(a, "vm", "migrate", "bench", "--to", to, "--json"))
        runs.append({k: done[k] for k in ("seconds", "downtime_ms", "switchover_ms",
                                          "paused_ms", "transferred")})
        print(f"round {i + 1}: {runs[-1]}", flush=True)
    summary = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    report = {"accel": rt["accel"], "memory_mib": args.memory, "cpus": os.cpu_count(),
              "median": summary, "runs": runs}
    print(f"median over {len(runs)} migrations of a {args.memory} MiB guest under "
          f"{rt['accel']}: {summary['seconds']:.2f} s, downtime {summary['downtime_ms']:.0f} "
          f"ms, switch-over {summary['switchover_ms']:.0f} ms, guest paused "
          f"{summary['paused_ms']:.0f} ms, {summary['transferred'] / (1 << 20):.0f} MiB sent")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
