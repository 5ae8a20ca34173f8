"""`distprop scale`: scaling experiments.

  distprop scale --ranks 1,2,4 --out DIR [--mode weak|strong] [--hostfile F]  a sweep of distprop train
  distprop scale --predict [--ranks 8,64,512] [--fabric ib-200] [--model gpt2-small]   the cost model
  distprop scale --calibrate --out DIR          measure this machine for the cost model
  distprop scale --validate --out DIR           fit on 2 ranks here, predict 3, compare with a measurement
  distprop scale --experiment lr-scaling --out DIR   the linear scaling rule with warmup, 1 to 8 ranks
"""

from __future__ import annotations

import argparse

from distprop.errors import UserError

EXAMPLES = """examples:
  distprop scale --ranks 1,2,4 --out runs/scale --model mlp --steps 60
  distprop scale --ranks 1,2,3 --hostfile hosts --out runs/hosts
  distprop scale --predict --ranks 8,64,512 --fabric ib-200,eth-25 --algorithm ring,tree,hier
  distprop scale --calibrate --out runs/calibration && \\
    distprop scale --predict --model measured --fabric shm --calibration runs/calibration/calibration.json
  distprop scale --experiment lr-scaling --out runs/lr-scaling"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--predict", action="store_true", help="predict step time and efficiency (cost model)")
    what.add_argument("--calibrate", action="store_true", help="measure this machine for the cost model")
    what.add_argument("--validate", action="store_true",
                      help="fit the model on 2 ranks here, predict 1 and 3, and measure them")
    what.add_argument("--experiment", choices=("lr-scaling",), help="a training experiment over rank counts")
    parser.add_argument("--ranks", help="comma-separated rank counts (sweep default 1,2,4; predict 8..1024)")
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--rounds", type=int, default=8,
                        help="--calibrate/--validate: measurement rounds per job (fewer: quicker, noisier)")

    model = parser.add_argument_group("cost model (--predict)")
    model.add_argument("--model", help="resnet50, gpt2-small (default both), or 'measured' with --calibration")
    model.add_argument("--fabric", help="comma-separated: shm, eth-25/100/200/400, ib-100/200/400, nvlink "
                                        "(default ib-200)")
    model.add_argument("--algorithm", help="comma-separated: ring, rhd, mpi-ring, tree, hier (default hier)")
    model.add_argument("--calibration", help="calibration.json from --calibrate (for --fabric shm, --model measured)")
    model.add_argument("--bucket-mb", type=float, help="bucket size (default 25; the first bucket 1 MB)")
    model.add_argument("--ranks-per-node", type=int, help="ranks sharing a node and its network interface")
    model.add_argument("--nics", type=int, default=1, help="network interfaces per node (rails)")
    model.add_argument("--kappa", type=float, default=1.0, help="backward slowdown while communicating")
    model.add_argument("--sigma", type=float, default=0.0, help="per-rank step-time spread, seconds (stragglers)")

    sweep = parser.add_argument_group("sweep (--ranks ... --out DIR) and experiments")
    sweep.add_argument("--mode", choices=("weak", "strong"), default="weak",
                       help="weak: --batch-size per rank; strong: --batch-size is the global batch")
    where = sweep.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="run across these hosts (distprop launch --hostfile)")
    where.add_argument("--hosts", help="run across these hosts, e.g. node1:2,node2:2")
    sweep.add_argument("--train-model", default="mlp", help="distprop train's --model (default mlp)")
    sweep.add_argument("--data", default=None, help="distprop train's --data (default: digits)")
    sweep.add_argument("--batch-size", type=int, default=None, help="per rank (weak) or global (strong)")
    sweep.add_argument("--steps", type=int, default=60, help="training steps per run")
    sweep.add_argument("--warmup", type=int, default=10, help="steps left out of the timings")
    sweep.add_argument("--repeats", type=int, default=2,
                       help="runs per rank count (medians are reported); lr-scaling: seeds")
    sweep.add_argument("--epochs", type=int, default=20, help="lr-scaling: epochs of every run")
    sweep.add_argument("--warmup-epochs", type=float, default=2.0, help="lr-scaling: epochs of gradual warmup")
    sweep.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / ranks per node)")
    sweep.add_argument("--no-baseline", action="store_true", help="skip the no-communication baseline runs")
    sweep.add_argument("--compare", help="another sweep's directory to overlay in scaling.png")
    sweep.add_argument("--label", help="this sweep's name in plots and --compare (default: the directory)")
    sweep.add_argument("--timeout", type=float, default=900, help="seconds allowed for each run")
    sweep.add_argument("train_args", nargs=argparse.REMAINDER,
                       help="-- FLAGS...: more flags for distprop train (e.g. -- --lr 0.05)")


def run(args) -> int:
    if args.predict:
        from distprop.scaling import predict

        return predict.run(args)
    if args.out is None:
        raise UserError("--out DIR is needed (where the results go)")
    if args.calibrate or args.validate:
        from distprop.scaling import validate

        if args.rounds < 1:
            raise UserError(f"--rounds must be at least 1, got {args.rounds}")
        return validate.run_calibrate(args) if args.calibrate else validate.run_validate(args)
    if args.experiment == "lr-scaling":
        from distprop.scaling import lr_scaling

        return lr_scaling.run(args)
    from distprop.scaling import sweep

    return sweep.run(args)
