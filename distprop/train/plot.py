"""`distprop plot OUT [OUT2 ...]`: loss, accuracy and throughput against step, from
each run's metrics.jsonl, several runs overlaid, to PNG files (matplotlib, an
optional extra: ``pip install 'distprop[plot]'``)."""

from __future__ import annotations

import os

from distprop.errors import UserError
from distprop.train.metrics import read_metrics

FIGURES = (  # file, y label, [(record kind, field, line style)]
    ("loss.png", "loss", [("train", "train_loss", "-"), ("eval", "test_loss", "--")]),
    ("accuracy.png", "test accuracy", [("eval", "test_accuracy", "-")]),
    ("throughput.png", "samples/s (all ranks)", [("train", "samples_per_s", "-")]),
)


def configure(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="OUT", help="output directories of distprop train")
    parser.add_argument("--out", default=None, metavar="DIR", help="where to write the PNGs (default: the first OUT)")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: the "
                        "directories' names)")


def run(args) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is not installed: pip install 'distprop[plot]'") from None
    labels = args.labels or _labels(args.runs)
    if len(labels) != len(args.runs):
        raise UserError(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    runs = [(label, _records(run)) for label, run in zip(labels, args.runs)]
    out = args.out or args.runs[0]
    os.makedirs(out, exist_ok=True)
    for file, ylabel, series in FIGURES:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for number, (label, records) in enumerate(runs):
            color = f"C{number % 10}"
            for kind, key, style in series:
                points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and r.get(key) is not None]
                if points:
                    steps, values = zip(*points)
                    name = label if len(series) == 1 else f"{label} ({key.replace('_', ' ')})"
                    axes.plot(steps, values, style, color=color, label=name, marker="o" if kind == "eval" else None,
                              markersize=3)
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
        figure.tight_layout()
        path = os.path.join(out, file)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        print(path)
    return 0


def _records(run: str) -> list[dict]:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run}: no metrics.jsonl (not an output directory of distprop train?)")
    try:
        return read_metrics(path)
    except ValueError as error:
        raise UserError(f"{path}: not JSON lines ({error})") from None


def _labels(runs: list[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(run)) for run in runs]
    return names if len(set(names)) == len(names) else [os.path.normpath(run) for run in runs]
