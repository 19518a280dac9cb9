"""The object benchmark still runs end to end (its numbers are reported, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SHAPES = {"write-4k-d1", "write-4k-d32", "write-1m-d8", "read-4k-d32", "read-1m-d8"}


def test_quick_object_bench_reports_every_shape(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.objects", "--quick", "--json", str(out),
         "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| shape |" in proc.stdout
    report = json.loads(out.read_text())
    assert {r["shape"] for r in report["results"]} == SHAPES
    for r in report["results"]:
        assert r["ops"] > 0 and r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"]
    assert report["machine"]
