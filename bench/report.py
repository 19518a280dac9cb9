"""What a run of `python -m bench` leaves behind: a Markdown table, a JSON file, a PNG chart.

Kept apart from the running so it can be rebuilt from a results.json (`regenerate`) and
tested without a cluster. Every number in the table is the median over the repeats of one
shape on one system (each metric's own median); the JSON keeps every run with the path of
fio's own output. "vs nbdkit" is the shape's headline number (IOPS for 4 KiB, MB/s for
1 MiB) divided by nbdkit's: nbdkit's file plugin is the yardstick, one local copy served
by a C server, so for sheep it says how much replication and Python cost.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from sheep.units import format_size

from .fio import SHAPES_BY_KEY, Shape

# the team's aims for sheep (issue 5): (shape or "vdi-write", metric, ">=" or "<=", value)
TARGETS = (
    ("randread-4k-d32", "iops", ">=", 20_000),
    ("randwrite-4k-d32", "iops", ">=", 6_000),
    ("randwrite-4k-d1", "p50_us", "<=", 400),
    ("read-1m-d8", "mb_per_s", ">=", 1_500),
    ("write-1m-d8", "mb_per_s", ">=", 350),
    ("vdi-write", "mb_per_s", ">=", 150),
)
UNITS = {"iops": "IOPS", "mb_per_s": "MB/s", "p50_us": "µs p50"}
METRICS = ("iops", "mb_per_s", "p50_us", "p99_us", "p999_us", "mean_us", "server_cores",
           "fio_cores", "other_cores")


# -- machine ---------------------------------------------------------------------------


def machine_line(m: dict) -> str:
    v = m.get("versions", {})
    return (f"machine: {m.get('usable_cores')}/{m.get('cores')} cores ({m.get('cpu', '?')}), "
            f"{m.get('memory_gib', '?')} GiB memory, kernel {m.get('kernel')}, {m.get('python')}"
            f"; {v.get('fio', '?')}, {v.get('qemu-img', '?')}, {v.get('nbdkit', '?')}; "
            f"sheep {m.get('sheep_commit', '?')}; data on {m.get('data_fs', '?')}; "
            f"busy cores before start {m.get('busy_cores_before', '?')}, "
            f"load average at end {m.get('loadavg_at_end')}")


# -- numbers ---------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """shape key -> system -> the median of each metric over the repeats (+ min/max)."""
    out: dict[str, dict[str, dict]] = {}
    for run in runs:
        out.setdefault(run["shape"], {}).setdefault(run["system"], {"runs": []})["runs"].append(
            run)
    for shape_key, by_system in out.items():
        shape = SHAPES_BY_KEY[shape_key]
        for system, cell in by_system.items():
            mine = cell.pop("runs")
            for metric in METRICS:
                values = [r[metric] for r in mine if metric in r]
                if values:
                    cell[metric] = statistics.median(values)
            head = [r[shape.metric] for r in mine]
            cell.update(runs=len(mine), min=min(head), max=max(head), system=system)
    return out


def ratio(summary: dict, shape: Shape, system: str, base: str = "nbdkit") -> float | None:
    cells = summary.get(shape.key, {})
    if system not in cells or base not in cells or not cells[base][shape.metric]:
        return None
    return cells[system][shape.metric] / cells[base][shape.metric]


def targets(summary: dict, vdi_summary: dict | None) -> list[dict]:
    """Each aim with sheep's value and whether it is met (None: not measured)."""
    out = []
    for key, metric, cmp, goal in TARGETS:
        if key == "vdi-write":
            cell = (vdi_summary or {}).get("write")
            label = "dog vdi write"
            if cell is not None:
                label += f" ({format_size(cell['bytes'])})"
        else:
            cell = summary.get(key, {}).get("sheep")
            label = SHAPES_BY_KEY[key].label
        value = None if cell is None else cell[metric]
        met = None if value is None else (value >= goal if cmp == ">=" else value <= goal)
        out.append({"what": label, "key": key, "metric": metric, "cmp": cmp, "goal": goal,
                    "value": value, "met": met})
    return out


# -- Markdown --------------------------------------------------------------------------


def _num(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(summary: dict, systems: list[str], shapes: list[Shape]) -> str:
    rows = ["| shape | system | IOPS | MB/s | p50 µs | p99 µs | vs nbdkit |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        for system in systems:
            cell = summary.get(shape.key, {}).get(system)
            if cell is None:
                rows.append(f"| {shape.label} | {system} | - | - | - | - | - |")
                continue
            r = ratio(summary, shape, system)
            rows.append(
                f"| {shape.label} | {system} | {_num(cell['iops'])} | "
                f"{_num(cell['mb_per_s'], 1)} | {_num(cell['p50_us'])} | "
                f"{_num(cell['p99_us'])} | {'-' if r is None else f'{r:.2f}x'} |")
    return "\n".join(rows)


# issue 16: what sheep may lose to security, as a share of its throughput
COSTS = (
    ("sheep-auth", 0.05, "Cost of authentication alone (sheep-auth against sheep: every "
                         "data-plane link authenticated by mutual TLS, then in the clear as "
                         "loopback links are)"),
    ("sheep-tls", 0.30, "Cost of authentication and encryption (sheep-tls against sheep: "
                        "every data-plane link inside TLS 1.3 AES-GCM, as across a network; "
                        "a gateway reads its own replica, so reads barely cross it)"),
)


def security_cost(summary: dict, shapes: list[Shape]) -> list[str]:
    """Per secured system and shape, what it costs against plain sheep: the change of the
    shape's IOPS or MB/s, and of the servers' CPU time per I/O (the steadier figure on a
    shared machine). Empty unless both ran."""
    out: list[str] = []
    for system, goal, title in COSTS:
        lines = []
        for shape in shapes:
            r = ratio(summary, shape, system, base="sheep")
            if r is None:
                continue
            plain, secured = summary[shape.key]["sheep"], summary[shape.key][system]
            cpu = ""
            if plain.get("server_cores") and secured.get("server_cores") and secured["iops"]:
                per_io = (secured["server_cores"] / secured["iops"]) / \
                    (plain["server_cores"] / plain["iops"])
                cpu = f", server CPU per I/O {per_io - 1:+.0%}"
            state = "within" if 1 - r <= goal else "OVER"
            lines.append(f"- {shape.label}: {UNITS[shape.metric]} {r - 1:+.0%}{cpu} "
                         f"({state} the aim of at most {goal:.0%} less)")
        if lines:
            out += ([""] if out else []) + [f"{title}:"] + lines
    return out


def targets_lines(rows: list[dict]) -> list[str]:
    lines = []
    for t in rows:
        unit = UNITS[t["metric"]]
        state = {None: "not measured", True: "met", False: "NOT met"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:,.0f}"
        lines.append(f"- {t['what']}: {t['cmp'].replace('>=', '≥').replace('<=', '≤')} "
                     f"{t['goal']:,} {unit}: sheep {value} ({state})")
    return lines


def markdown(doc: dict) -> str:
    cfg = doc["config"]
    shapes = [SHAPES_BY_KEY[k] for k in cfg["shapes"]]
    parts = [
        f"# sheep NBD benchmark, {doc['time']}",
        "",
        f"Volume {cfg['volume_size'] / (1 << 20):g} MiB, filled before the shapes; fio nbd "
        f"engine, one connection; {cfg['seconds']:g} s per run after {cfg['ramp']:g} s "
        f"ramp, median of {cfg['repeat']} run(s); latency is fio's clat; MB/s = 10^6 B/s.",
        "",
        table(doc["summary"], cfg["systems"], shapes),
        "",
    ]
    if doc.get("vdi_rw"):
        from .vdi_rw import markdown as vdi_markdown

        parts += [vdi_markdown(doc["vdi_rw"]["summary"]), ""]
    parts += ["Targets (sheep):", *targets_lines(doc["targets"]), ""]
    cost = security_cost(doc["summary"], shapes)
    parts += [*cost, ""] if cost else []
    parts += ["Systems:"]
    parts += [f"- {s['name']}: {s['description']} ({s['uri']})" for s in doc["systems"]]
    fills = doc.get("fills", [])
    if fills:
        parts += ["", "Fill (sequential 1 MiB d8 over the whole volume, before the shapes): "
                  + ", ".join(f"{f['system']} {f['mb_per_s']:,.0f} MB/s" for f in fills)]
    warnings = doc.get("warnings", [])
    parts += ["", *[f"warning: {w}" for w in warnings]] if warnings else []
    parts += ["", machine_line(doc["machine"])]
    return "\n".join(parts) + "\n"


# -- chart -----------------------------------------------------------------------------


def chart(doc: dict, path: Path) -> None:
    """Four panels: 4 KiB IOPS, 1 MiB MB/s, 4 KiB latency (log), dog vdi MB/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["summary"]
    systems = doc["config"]["systems"]
    shapes = [SHAPES_BY_KEY[k] for k in doc["config"]["shapes"]]
    small = [s for s in shapes if s.metric == "iops"]
    large = [s for s in shapes if s.metric == "mb_per_s"]
    colors = {"sheep": "#d62728", "sheep-auth": "#e377c2", "sheep-tls": "#ff9896",
              "nbdkit": "#1f77b4", "qemu-nbd": "#2ca02c"}
    width = 0.8 / max(1, len(systems))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    def grouped(ax, group: list[Shape], metric: str, title: str, ylabel: str) -> None:
        for i, system in enumerate(systems):
            xs, ys, lo, hi = [], [], [], []
            for j, shape in enumerate(group):
                cell = summary.get(shape.key, {}).get(system)
                if cell is None:
                    continue
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(cell[metric])
                lo.append(max(0.0, cell[metric] - cell["min"]))
                hi.append(max(0.0, cell["max"] - cell[metric]))
            bars = ax.bar(xs, ys, width, label=system, color=colors.get(system),
                          yerr=[lo, hi], capsize=3)
            ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7, padding=2)
        ax.set_xticks(range(len(group)), [s.label for s in group], rotation=12, fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    grouped(axes[0][0], small, "iops", "4 KiB random I/O (median, min-max)", "IOPS")
    grouped(axes[0][1], large, "mb_per_s", "1 MiB sequential I/O (median, min-max)", "MB/s")

    ax = axes[1][0]
    any_latency = False
    for i, system in enumerate(systems):
        xs, p50, p99 = [], [], []
        for j, shape in enumerate(small):
            cell = summary.get(shape.key, {}).get(system)
            if cell is not None:
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                p50.append(max(cell["p50_us"], 0.1))
                p99.append(max(cell["p99_us"], 0.1))
        ax.bar(xs, p50, width, label=f"{system} p50", color=colors.get(system))
        ax.scatter(xs, p99, marker="_", s=200, color="black",
                   label="p99" if i == len(systems) - 1 else None, zorder=3)
        any_latency = any_latency or bool(xs)
    if any_latency:
        ax.set_yscale("log")
    ax.set_xticks(range(len(small)), [s.label for s in small], rotation=12, fontsize=8)
    ax.set_title("4 KiB completion latency: p50 bars, p99 ticks")
    ax.set_ylabel("µs (log)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1][1]
    vdi = (doc.get("vdi_rw") or {}).get("summary", {})
    if vdi:
        ops = list(vdi)
        ys = [vdi[o]["mb_per_s"] for o in ops]
        bars = ax.bar([f"dog vdi {o}" for o in ops], ys, 0.5, color=colors["sheep"],
                      yerr=[[vdi[o]["mb_per_s"] - vdi[o]["min_mb_per_s"] for o in ops],
                            [vdi[o]["max_mb_per_s"] - vdi[o]["mb_per_s"] for o in ops]],
                      capsize=3)
        ax.bar_label(bars, labels=[f"{y:,.1f}" for y in ys], fontsize=8, padding=2)
        size = next(iter(vdi.values()))["bytes"] / (1 << 20)
        ax.set_title(f"sheep: dog vdi write / read of {size:g} MiB")
        ax.set_ylabel("MB/s")
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "dog vdi write/read not run", ha="center", va="center")

    cfg = doc["config"]
    fig.suptitle(f"sheep (3 nodes, copies=3) vs nbdkit vs qemu-nbd over NBD — "
                 f"{cfg['volume_size'] / (1 << 20):g} MiB volume, {cfg['seconds']:g} s x "
                 f"{cfg['repeat']}, {doc['machine'].get('usable_cores')} cores — "
                 f"{doc['time']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- files -----------------------------------------------------------------------------


def write_all(doc: dict, out: Path) -> dict[str, Path]:
    """results.json, report.md and chart.png in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "report.md",
             "chart": out / "chart.png"}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    paths["markdown"].write_text(markdown(doc))
    chart(doc, paths["chart"])
    return paths


def regenerate(results_json: Path) -> dict[str, Path]:
    """Rebuild report.md and chart.png from a results.json (e.g. after changing the layout)."""
    doc = json.loads(results_json.read_text())
    doc["summary"] = summarize(doc["runs"])
    doc["targets"] = targets(doc["summary"], (doc.get("vdi_rw") or {}).get("summary"))
    return write_all(doc, results_json.parent)

