"""Benchmarks of sheep against real processes; never timed tests.

`python -m bench` (`make bench`): sheep over NBD next to nbdkit and qemu-nbd, driven by fio,
plus `dog vdi write`/`read` (also alone: `python -m bench.vdi_rw`). `python -m bench.objects`:
replicated object I/O from an in-process client, without the gateway.
"""
