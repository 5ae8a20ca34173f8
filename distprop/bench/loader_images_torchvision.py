"""PyTorch's side of `distprop bench loader --suite images`, run as a script by an
interpreter that has torch and torchvision (it imports nothing from distprop);
prints one JSON line."""

import argparse
import json
import resource
import time

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # as in distprop.bench.loader_images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tree")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--batches", type=int, required=True)
    parser.add_argument("--crop", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from torchvision import datasets, transforms

    torch.manual_seed(args.seed)
    pipeline = transforms.Compose([transforms.RandomResizedCrop(args.crop), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(args.tree, transform=pipeline),
                                         batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    stream = iter(loader)
    images = len(next(stream)[0])
    first = time.perf_counter()
    timed = 0
    for _, (batch, _labels) in zip(range(args.batches - 1), stream):
        timed += len(batch)
    elapsed = time.perf_counter() - first
    del stream  # shuts the workers down and waits for them: their usage is counted below
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    print(json.dumps({"images_per_s": timed / elapsed, "images_per_cpu_s": (images + timed) / cpu,
                      "first_batch_s": first - start, "rss_main_mb": own.ru_maxrss / 1024,
                      "rss_worker_mb": children.ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
