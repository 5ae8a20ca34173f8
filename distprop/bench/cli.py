"""`distprop bench NAME`: each benchmark is a module with `configure(parser)` and `run(args)`."""

from __future__ import annotations

import importlib

from distprop.bench.timing import reexec_without_blas_overrides

BENCHMARKS = {
    "step": ("distprop.bench.step", "one training step (MLP, CNN, ResNet) against PyTorch"),
    "allreduce": ("distprop.bench.allreduce", "allreduce bandwidth against raw mpi4py (run under mpiexec)"),
    "sync": ("distprop.bench.sync", "gradient synchronisation of the MLP against one raw allreduce (mpiexec)"),
    "scaling": ("distprop.bench.scaling", "weak scaling 1 -> N ranks against PyTorch DDP (gloo)"),
    "loader": ("distprop.bench.loader", "Arrow loader vs pyarrow.parquet.read_table, and a step fed by it"),
    "train": ("distprop.bench.train", "distprop train's bookkeeping vs a plain loop; a checkpoint vs safetensors"),
}


def configure(parser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module, help_line) in BENCHMARKS.items():
        bench = sub.add_parser(name, help=help_line, description=help_line)
        bench.set_defaults(_bench_module=module)
        importlib.import_module(module).configure(bench)


def run(args) -> int:
    reexec_without_blas_overrides(args._argv)
    return importlib.import_module(args._bench_module).run(args)
