"""PNG figures of sweeps and predictions (matplotlib, from distprop's `plot` extra).

Without matplotlib the functions say so once and return None: the CSV and JSON
files hold everything the figures show.
"""

from __future__ import annotations

import sys


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("distprop scale: matplotlib is not installed (pip install 'distprop[plot]'): no figure",
              file=sys.stderr)
        return None
    return plt


def plot_prediction(rows, path: str) -> str | None:
    """Efficiency and step time against ranks, one line per model/fabric/algorithm."""
    plt = _pyplot()
    if plt is None:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {}
    for row in rows:
        series.setdefault((row["model"], row["fabric"], row["algorithm"]), []).append(row)
    for (model, fabric, algorithm), points in series.items():
        ranks = [p["ranks"] for p in points]
        label = f"{model}, {fabric}, {algorithm}"
        left.plot(ranks, [p["efficiency"] for p in points], marker="o", label=label)
        right.plot(ranks, [p["step_ms"] for p in points], marker="o", label=label)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("ranks")
        axis.grid(True, alpha=0.3)
    left.set_ylabel("predicted efficiency (weak scaling)")
    left.set_ylim(0, 1.05)
    right.set_ylabel("predicted step time (ms)")
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_sweep(summary: dict, path: str, compare: dict | None = None) -> str | None:
    """Throughput and efficiency against ranks (linear and the no-communication
    baseline for reference), and each count's step broken into phases."""
    plt = _pyplot()
    if plt is None:
        return None
    figure, (throughput, efficiency, phases) = plt.subplots(1, 3, figsize=(16, 4.5))
    sweeps = [("", summary)] + ([(" (compare)", compare)] if compare else [])
    for suffix, sweep in sweeps:
        rows = sweep["results"]
        ranks = [r["ranks"] for r in rows]
        style = "--" if suffix else "-"
        label = sweep.get("label", "")
        throughput.plot(ranks, [r["throughput"] for r in rows], style, marker="o", label=f"{label}{suffix}")
        efficiency.plot(ranks, [r["efficiency"] for r in rows], style, marker="o", label=f"{label}{suffix}")
        if any(r.get("baseline_throughput") for r in rows):
            throughput.plot(ranks, [r["baseline_throughput"] for r in rows], style, color="gray", marker="x",
                            label=f"no communication{suffix}")
            efficiency.plot(ranks, [r["baseline_efficiency"] for r in rows], style, color="gray", marker="x",
                            label=f"no communication{suffix}")
    rows = summary["results"]
    ranks = [r["ranks"] for r in rows]
    single = rows[0]["throughput"] / rows[0]["ranks"]
    throughput.plot(ranks, [single * k for k in ranks], ":", color="black", label="linear")
    efficiency.axhline(1.0, linestyle=":", color="black", label="linear")
    throughput.set_ylabel(f"throughput ({summary.get('unit', 'samples')}/s)")
    efficiency.set_ylabel("efficiency against linear")
    efficiency.set_ylim(0, 1.1)
    for axis in (throughput, efficiency):
        axis.set_xlabel("ranks")
        axis.set_xticks(ranks)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    bottom = [0.0] * len(rows)
    positions = list(range(len(rows)))
    for name in summary["phases"]:
        heights = [r["phases_ms"][name] for r in rows]
        phases.bar(positions, heights, bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, heights)]
    phases.set_xticks(positions, [str(k) for k in ranks])
    phases.set_xlabel("ranks")
    phases.set_ylabel("ms per step (slowest rank's phases)")
    phases.legend(fontsize=7)
    figure.suptitle(summary.get("title", "distprop scale"), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
