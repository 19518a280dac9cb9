"""Benchmarks of sheep against real processes (`python -m bench.objects`); not timed tests."""
