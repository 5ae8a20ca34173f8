"""Scaling experiments and the cost model behind `distprop scale`.

allreduce   alpha-beta costs of ring, recursive halving/doubling, tree, hierarchical
fabrics     link presets (shared memory as measured, Ethernet, InfiniBand, NVLink)
workloads   what a rank computes per step: reference models, or measured here
model       step time and efficiency at p ranks (buckets overlapping backward)
calibrate   the job that measures this machine for the model
validate    --calibrate and --validate: fit on 2 ranks, predict others, compare
predict     --predict: tables and plots for 8 to 1024 ranks
sweep       a sweep of `distprop train` over rank counts, with a no-communication baseline
independent the baseline's ranks: each a one-rank train job of its own
jobs        starting the jobs (through distprop launch) with timeouts
lr_scaling  --experiment lr-scaling: the linear scaling rule with warmup
plots       the figures
cli         the `distprop scale` command
"""
