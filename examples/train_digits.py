"""Train an MLP on the UCI handwritten digits, data-parallel over MPI.

    mpiexec -n 2 python examples/train_digits.py [--checkpoints DIR [--resume]]

Rank 0 writes the digits (scikit-learn's bundled copy) to Parquet once; every rank
streams its own shard of each epoch with ArrowLoader; DataParallel averages the
gradients; test accuracy is counted on every rank's shard and summed over ranks.
With --checkpoints, a checkpoint is saved after every epoch, and --resume continues
from the newest one. `distprop train` is this job with everything around it.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import numpy as np

import distprop as dp
import distprop.functional as F
from distprop import nn, optim
from distprop.data import ArrowLoader
from distprop.data.converters import convert_digits
from distprop.parallel import average_metrics, sum_metrics


@dataclass
class Config:
    data: str = "data/digits"
    epochs: int = 40
    batch_size: int = 32  # per rank
    lr: float = 0.1  # for a global batch of 64; scaled linearly with the global batch
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    hidden: tuple = (256,)
    seed: int = 0
    checkpoints: str | None = None
    resume: bool = False


def parse_config() -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    parser.add_argument("--data", default=defaults.data, help="dataset directory (made if missing)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per rank")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--checkpoints", default=None, help="save a checkpoint here after every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint there")
    args = parser.parse_args()
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be at least 1")  # the final accuracy needs an epoch
    if args.resume and not args.checkpoints:
        parser.error("--resume needs --checkpoints DIR")
    return Config(data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  checkpoints=args.checkpoints, resume=args.resume)


def prepare_data(config: Config, comm) -> tuple[str, str]:
    train, test = (os.path.join(config.data, split) for split in ("train", "test"))
    if comm.rank == 0 and not (os.path.isdir(train) and os.path.isdir(test)):
        convert_digits(config.data, seed=config.seed)
    comm.barrier()  # the others read only once rank 0 has written
    return train, test


def evaluate(model, loader, comm) -> float:
    model.eval()
    counts = {"correct": 0, "total": 0}
    with dp.no_grad():
        for batch in loader:
            predictions = model(dp.tensor(batch["image"])).data.argmax(axis=1)
            counts["correct"] += int((predictions == batch["label"]).sum())
            counts["total"] += len(predictions)
    model.train()
    counts = sum_metrics(counts, comm)
    return counts["correct"] / counts["total"]


def main() -> None:
    config = parse_config()
    comm = dp.init()
    train_dir, test_dir = prepare_data(config, comm)
    train = ArrowLoader(train_dir, config.batch_size, rank=comm.rank, world_size=comm.size, seed=config.seed)
    test = ArrowLoader(test_dir, 128, rank=comm.rank, world_size=comm.size, shuffle=False, drop_last=False)
    train.check_consistent(comm)

    dp.manual_seed(config.seed)
    model = dp.DataParallel(nn.MLP(64, list(config.hidden), 10), comm)  # rank 0's weights everywhere
    global_batch = config.batch_size * comm.size
    opt = optim.SGD(model.parameters(), lr=config.lr * global_batch / 64, momentum=0.9, nesterov=True,
                    weight_decay=config.weight_decay)
    schedule = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * len(train))
    if comm.rank == 0:
        print(f"{comm.size} ranks, {len(train)} steps per epoch, global batch {global_batch}", flush=True)

    first_epoch = 0
    if config.resume:  # every rank restores the same state, rank 0 reads it
        checkpoint = dp.load_checkpoint(config.checkpoints, model=model, optimizer=opt, scheduler=schedule,
                                        loader=train)
        first_epoch = checkpoint.extra["epoch"] + 1

    start = time.perf_counter()
    accuracy = None
    for epoch in range(first_epoch, config.epochs):
        train.set_epoch(epoch)
        losses = []
        for batch in train:
            opt.zero_grad()
            loss = F.cross_entropy(model(dp.tensor(batch["image"])), batch["label"],
                                   label_smoothing=config.label_smoothing)
            loss.backward()  # gradients averaged over ranks here
            opt.step()
            schedule.step()
            losses.append(loss.item())
        if config.checkpoints:
            dp.save_checkpoint(config.checkpoints, model=model, optimizer=opt, scheduler=schedule, loader=train,
                               step=(epoch + 1) * len(train), extra={"epoch": epoch}, keep=2)
        if epoch % 10 == 9 or epoch == config.epochs - 1:
            metrics = average_metrics({"loss": float(np.mean(losses))}, comm)
            accuracy = evaluate(model, test, comm)
            if comm.rank == 0:
                print(f"epoch {epoch + 1:3d}  train loss {metrics['loss']:.4f}  test accuracy {accuracy:.4f}",
                      flush=True)
    if accuracy is None:  # resumed after the last epoch
        accuracy = evaluate(model, test, comm)
    if comm.rank == 0:
        print(f"final test accuracy {accuracy:.4f} in {time.perf_counter() - start:.1f} s", flush=True)
    model.close()


if __name__ == "__main__":
    main()
