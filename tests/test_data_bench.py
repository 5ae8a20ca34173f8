"""`distprop bench loader` runs end to end on a tiny dataset (its figures are not checked:
speed is reported by the benchmark, never asserted by tests)."""

import argparse

from distprop.bench import loader as bench_loader


def test_bench_loader_runs_and_reports_both_ratios(capsys):
    parser = argparse.ArgumentParser()
    bench_loader.configure(parser)
    # Called directly rather than through `distprop bench`, which may restart the
    # process to drop BLAS variables; tests leave the environment alone.
    args = parser.parse_args(["--samples", "700", "--shape", "3,8,8", "--batch-size", "32", "--rounds", "1",
                              "--steps", "3", "--hidden", "16"])
    assert bench_loader.run(args) == 0
    out = capsys.readouterr().out
    assert "ratio loader / read_table" in out and "ratio loader / in-memory" in out


def test_bench_loader_tokens_suite_runs_and_reports_both_ratios(capsys):
    parser = argparse.ArgumentParser()
    bench_loader.configure(parser)
    args = parser.parse_args(["--suite", "tokens", "--megabytes", "0.4", "--mean-document", "50",
                              "--sequence-length", "64", "--token-batch-size", "4", "--rounds", "2"])
    assert bench_loader.run(args) == 0
    out = capsys.readouterr().out
    assert "ratio packing / pyarrow read" in out and "tokens per CPU second, packing / pyarrow read" in out
