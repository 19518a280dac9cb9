"""The NBD benchmark (`python -m bench`) and `python -m bench.vdi_rw` still run end to end
and leave a complete report. Their numbers are never asserted: only that every shape ran
on every system, every run is in the JSON, and the chart is a PNG."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fio import SHAPES

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2]
SYSTEMS = ("sheep", "sheep-auth", "sheep-tls", "nbdkit", "qemu-nbd")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc


def _table_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    """(shape label, system) -> the other cells of the main table's rows."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] in SYSTEMS:
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


@pytest.mark.timeout(900)
def test_quick_nbd_bench_reports_every_shape_on_every_system(tmp_path: Path) -> None:
    """--quick, with shorter runs and a smaller volume still: what is checked is that every
    shape runs on every system and lands in the report, which takes no 2 s of fio each."""
    out = tmp_path / "out"
    proc = _run(["-m", "bench", "--quick", "--seconds", "0.5", "--ramp", "0.2", "--size", "32M",
                 "--vdi-rw-size", "16M", "--out", str(out), "--dir", str(tmp_path)],
                timeout=840)

    report = (out / "report.md").read_text()
    assert report in proc.stdout  # the table is printed as well as written
    assert "| shape | system | IOPS | MB/s | p50 µs | p99 µs | vs nbdkit |" in report
    rows = _table_rows(report)
    assert set(rows) == {(s.label, system) for s in SHAPES for system in SYSTEMS}
    for cells in rows.values():
        assert all(re.fullmatch(r"[\d,.]+x?", c) for c in cells), cells
    assert "dog vdi" in report and "| write |" in report and "| read |" in report
    assert "machine:" in report
    for title in ("Cost of authentication alone", "Cost of authentication and encryption"):
        cost = report.split(title, 1)[1].split("\n\n", 1)[0]
        assert [line.split(":")[0] for line in cost.splitlines()[1:]] == [
            f"- {s.label}" for s in SHAPES]

    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] is True
    assert (doc["config"]["repeat"], doc["config"]["seconds"], doc["config"]["ramp"],
            doc["config"]["volume_size"], doc["config"]["vdi_rw_size"]) == (
        1, 0.5, 0.2, 32 << 20, 16 << 20)  # --quick's repeat, the explicit options' values
    assert {(r["shape"], r["system"]) for r in doc["runs"]} == {
        (s.key, system) for s in SHAPES for system in SYSTEMS}
    assert len(doc["runs"]) == len(SHAPES) * len(SYSTEMS)
    for r in doc["runs"]:
        assert r["ios"] > 0 and r["iops"] > 0 and r["mb_per_s"] > 0, r
        assert 0 < r["p50_us"] <= r["p99_us"], r
        assert (out / r["fio_output"]).is_file()
    assert {f["system"] for f in doc["fills"]} == set(SYSTEMS)
    assert set(doc["summary"]) == {s.key for s in SHAPES}
    assert all(set(cells) == set(SYSTEMS) for cells in doc["summary"].values())
    assert {r["op"] for r in doc["vdi_rw"]["runs"]} == {"write", "read"}
    assert all(r["mb_per_s"] > 0 for r in doc["vdi_rw"]["runs"])
    assert len(doc["targets"]) == 6 and all(t["value"] is not None for t in doc["targets"])
    machine = doc["machine"]
    assert machine["cores"] and machine["memory_gib"] and machine["kernel"]
    assert machine["python"] and machine["sheep_commit"]
    assert set(machine["versions"]) >= {"fio", "qemu-img", "nbdkit"}

    chart = out / "chart.png"
    assert chart.read_bytes()[:8] == PNG_MAGIC and chart.stat().st_size > 10_000

    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("sheep-bench-")]
    assert leftovers == [], f"data directory not removed: {leftovers}"


@pytest.mark.timeout(400)
def test_quick_vdi_rw_reports_write_and_read(tmp_path: Path) -> None:
    out = tmp_path / "vdi_rw.json"
    proc = _run(["-m", "bench.vdi_rw", "--quick", "--json", str(out), "--dir", str(tmp_path)],
                timeout=360)
    assert "| dog vdi | size | MB/s (median) |" in proc.stdout
    doc = json.loads(out.read_text())
    assert [(r["op"], r["repeat"]) for r in doc["runs"]] == [("write", 0), ("read", 0)]
    for r in doc["runs"]:
        assert r["bytes"] == 64 << 20 and r["seconds"] > 0 and r["mb_per_s"] > 0
    assert set(doc["summary"]) == {"write", "read"}
