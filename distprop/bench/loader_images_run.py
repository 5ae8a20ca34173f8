"""One timed run of distprop's side of `distprop bench loader --suite images`, in a
process of its own (so its peak memory is its own); prints one JSON line."""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--batches", type=int, required=True)
    parser.add_argument("--crop", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from distprop.bench.loader_images import MEAN, STD
    from distprop.data import ArrowLoader
    from distprop.data.transforms import Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor

    transforms = [RandomResizedCrop(args.crop), RandomHorizontalFlip(), ToTensor(), Normalize(MEAN, STD)]
    start = time.perf_counter()
    loader = ArrowLoader(args.dataset, args.batch_size, num_workers=args.workers, image_transforms=transforms,
                         seed=args.seed)
    stream = iter(loader)
    images = len(next(stream)["image"])
    first = time.perf_counter()
    timed = 0
    for _, batch in zip(range(args.batches - 1), stream):
        timed += len(batch["image"])
    elapsed = time.perf_counter() - first
    loader.close()  # the workers exit and are waited for: their usage is counted below
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    print(json.dumps({"images_per_s": timed / elapsed, "images_per_cpu_s": (images + timed) / cpu,
                      "first_batch_s": first - start, "rss_main_mb": own.ru_maxrss / 1024,
                      "rss_worker_mb": children.ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
