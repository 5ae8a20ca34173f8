"""`distprop scale --experiment lr-scaling`: the large-minibatch rule in small.

Goyal et al. (2017) trained ResNet-50 with batches up to 8k by two rules: scale the
learning rate linearly with the global batch (k ranks at a fixed per-rank batch:
lr x k), and ramp it up gradually from the single-rank value over the first epochs.
Here: `distprop train` on digits at k = 1, 2, 4, 8 ranks (more ranks than cores
are oversubscribed), the per-rank batch fixed, the same number of epochs -- so k
ranks take k times fewer, k times larger steps -- once with the rule (--scale-lr,
warmup from lr to k x lr over --warmup-epochs) and once without (the single-rank
lr at every k, no warmup). The final test accuracy, averaged over seeds, shows
what the rule recovers. Writes DIR/lr_scaling.json and DIR/lr_scaling.csv.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import sys

from distprop.scaling import jobs
from distprop.scaling.predict import parse_ranks
from distprop.scaling.sweep import prepare_data, read_summary

DEFAULT_RANKS = "1,2,4,8"
DEFAULT_BATCH = 32


def _flags(args, data: str, ranks: int, seed: int, rule: bool, out: str) -> list[str]:
    batch = args.batch_size or DEFAULT_BATCH
    flags = ["--model", args.train_model, "--data", data, "--batch-size", str(batch), "--epochs", str(args.epochs),
             "--seed", str(seed), "--threads", "1", "--progress", "none", "--out", out]
    if rule:
        steps_per_epoch = _train_samples(data) // (batch * ranks)
        warmup = max(1, round(args.warmup_epochs * steps_per_epoch)) if ranks > 1 else 0
        flags += ["--scale-lr", "--warmup-steps", str(warmup), "--warmup-start-factor", f"{1 / ranks:g}"]
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else list(args.train_args)
    return flags + extra


def _train_samples(data: str) -> int:
    import pyarrow.parquet as pq

    files = sorted(os.path.join(root, name) for root, _, names in os.walk(os.path.join(data, "train"))
                   for name in names if name.endswith(".parquet"))
    return sum(pq.ParquetFile(path).metadata.num_rows for path in files)


def run(args) -> int:
    counts = parse_ranks(args.ranks or DEFAULT_RANKS)
    os.makedirs(args.out, exist_ok=True)
    data = prepare_data(args)
    seeds = list(range(max(1, args.repeats)))
    runs = []
    for seed in seeds:
        for ranks in counts:
            for rule in (True, False):
                if ranks == 1 and not rule:
                    continue  # one rank: the rule changes nothing
                out = os.path.join(args.out, "runs", f"{ranks}-ranks-{'rule' if rule else 'plain'}-seed{seed}")
                shutil.rmtree(out, ignore_errors=True)  # a rerun starts afresh, never resumes
                program = [sys.executable, "-m", "distprop", "train", *_flags(args, data, ranks, seed, rule, out)]
                jobs.run(jobs.launch_command(ranks, program, args), f"distprop train on {ranks} rank(s)", args.timeout)
                summary = read_summary(os.path.join(out, "summary.json"))
                runs.append({"ranks": ranks, "rule": rule, "seed": seed, "global_batch": summary["global_batch"],
                             "steps": summary["step"], "test_accuracy": summary["test_accuracy"]})
                print(f"{ranks} rank(s), seed {seed}, {'linear scaling + warmup' if rule else 'single-rank lr'}: "
                      f"test accuracy {summary['test_accuracy']:.4f} after {summary['step']} steps", flush=True)
    table = summarise(runs, counts)
    with open(os.path.join(args.out, "lr_scaling.json"), "w") as file:
        json.dump({"command": ["distprop", *getattr(args, "_argv", [])], "epochs": args.epochs,
                   "warmup_epochs": args.warmup_epochs, "per_rank_batch": args.batch_size or DEFAULT_BATCH,
                   "seeds": seeds, "runs": runs, "table": table}, file, indent=1)
    with open(os.path.join(args.out, "lr_scaling.csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    print_table(table)
    return 0


def summarise(runs, counts) -> list[dict]:
    def mean(rank_count, rule):
        values = [r["test_accuracy"] for r in runs if r["ranks"] == rank_count and (r["rule"] or rank_count == 1) == rule]
        return statistics.mean(values) if values else math.nan

    base = mean(1, True)
    table = []
    for ranks in counts:
        first = next(r for r in runs if r["ranks"] == ranks)
        with_rule, without = mean(ranks, True), (base if ranks == 1 else mean(ranks, False))
        table.append({"ranks": ranks, "global_batch": first["global_batch"], "steps": first["steps"],
                      "accuracy_rule": with_rule, "accuracy_plain": without,
                      "gap_rule_points": 100 * (with_rule - base), "gap_plain_points": 100 * (without - base)})
    return table


def print_table(table) -> None:
    print(f"{'ranks':>5} {'global batch':>12} {'steps':>6} {'with rule':>10} {'points':>7} "
          f"{'without':>8} {'points':>7}   (test accuracy, mean over seeds; points against 1 rank)")
    for row in table:
        print(f"{row['ranks']:5d} {row['global_batch']:12d} {row['steps']:6d} {row['accuracy_rule']:10.4f} "
              f"{row['gap_rule_points']:+7.2f} {row['accuracy_plain']:8.4f} {row['gap_plain_points']:+7.2f}")
