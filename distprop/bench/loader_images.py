"""`distprop bench loader --suite images`: decoding and augmenting JPEGs with worker
processes, against PyTorch's DataLoader with torchvision transforms on the same files.

The benchmark writes ``--images`` synthetic photo-like JPEGs (smooth colour fields
with texture and noise, ``--jpeg-size`` pixels, quality ``--quality``) in ten
class folders, and converts the folders with ``distprop data images`` (bytes kept
as they are). Then, for each worker count in ``--workers``, rounds interleave:

* PyTorch: ``DataLoader(ImageFolder(tree, Compose([RandomResizedCrop(224),
  RandomHorizontalFlip(), ToTensor(), Normalize(...)])), batch_size, shuffle=True,
  num_workers=w)``, run by an interpreter that has torchvision (``--baseline-python``,
  else found: this one, ``$DISTPROP_TORCHVISION_PYTHON``, or a virtualenv beside
  this one whose name contains "tv" or "torchvision"); the output says which;
* distprop: ``ArrowLoader(dataset, batch_size, num_workers=w, image_transforms=[the
  same four])``, in a fresh process too.

Each side is timed from its first batch to the last of ``--image-batches`` batches
(worker start-up excluded, reported apart). Images per second per core divides by
the CPU time of the process and its workers; peak RSS is the main process's and the
largest worker's. The ratio is distprop over PyTorch, median over rounds (target
>= 2.0 at every worker count).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

IMAGES_TARGET = 2.0
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CLASSES = 10


def configure(parser) -> None:
    group = parser.add_argument_group("images suite")
    group.add_argument("--images", type=int, default=20000, help="JPEGs written")
    group.add_argument("--jpeg-size", default="500,375", help="width,height of the JPEGs")
    group.add_argument("--quality", type=int, default=90)
    group.add_argument("--crop", type=int, default=224, help="RandomResizedCrop size")
    group.add_argument("--image-batch-size", type=int, default=256)
    group.add_argument("--image-batches", type=int, default=None, help="batches timed per run (default: one epoch)")
    group.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    group.add_argument("--image-rounds", type=int, default=1, help="interleaved rounds per worker count")
    group.add_argument("--image-dir", default=None,
                       help="keep the JPEGs and the dataset here and reuse them on later runs (default: a temporary "
                            "directory, removed)")
    group.add_argument("--baseline-python", default=None, help="an interpreter with torch and torchvision")


# -- the files -------------------------------------------------------------------------

def _write_jpegs(arguments: tuple[str, int, int, int, int, int]) -> int:
    """Write images start..stop-1 (a worker of the pool); returns bytes written."""
    directory, start, stop, width, height, quality = arguments
    from PIL import Image, ImageFilter

    written = 0
    for number in range(start, stop):
        rng = np.random.default_rng(number)
        # Smooth colour fields from a coarse random grid, blurred texture, sensor noise:
        # JPEG sizes and decode costs like those of photographs.
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        texture = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).filter(
            ImageFilter.GaussianBlur(1.2))
        image += (np.asarray(texture, np.float32) - 128)[..., None] * 0.5 + rng.normal(0, 4, image.shape)
        path = os.path.join(directory, f"class{number % _CLASSES}", f"{number:06d}.jpg")
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)
        written += os.path.getsize(path)
    return written


def prepare(args, root: str) -> tuple[str, str]:
    """The JPEG tree and the converted dataset under `root`, written unless already there."""
    width, height = (int(v) for v in args.jpeg_size.split(","))
    tree, dataset = os.path.join(root, "jpeg"), os.path.join(root, "dataset")
    marker = os.path.join(root, f"written-{args.images}-{width}x{height}-q{args.quality}")
    if not os.path.exists(marker):
        shutil.rmtree(tree, ignore_errors=True)
        for label in range(_CLASSES):
            os.makedirs(os.path.join(tree, f"class{label}"))
        start = time.perf_counter()
        from concurrent.futures import ProcessPoolExecutor

        step = 500
        jobs = [(tree, lo, min(lo + step, args.images), width, height, args.quality)
                for lo in range(0, args.images, step)]
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            size = sum(pool.map(_write_jpegs, jobs))
        print(f"wrote {args.images} JPEGs of {width}x{height} at quality {args.quality}, "
              f"{size / args.images / 1e3:.0f} KB each on average, in {time.perf_counter() - start:.0f} s")
        from distprop.data.image_folder import convert_image_folder

        start = time.perf_counter()
        convert_image_folder(tree, dataset, overwrite=True)
        print(f"converted with `distprop data images` in {time.perf_counter() - start:.1f} s")
        open(marker, "w").close()
    else:
        print(f"reusing the JPEGs and the dataset in {root}")
    return tree, dataset


# -- the two sides ---------------------------------------------------------------------

def find_baseline_python(given: str | None) -> tuple[str | None, str]:
    """An interpreter that imports torchvision, and how it was found."""
    def works(python: str) -> bool:
        try:
            return subprocess.run([python, "-c", "import torch, torchvision, PIL"], capture_output=True,
                                  timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    if given:
        return (given, "--baseline-python") if works(given) else (None, f"--baseline-python {given} cannot import "
                                                                        "torchvision")
    candidates = [(sys.executable, "this interpreter")]
    if os.environ.get("DISTPROP_TORCHVISION_PYTHON"):
        candidates.insert(0, (os.environ["DISTPROP_TORCHVISION_PYTHON"], "$DISTPROP_TORCHVISION_PYTHON"))
    parent = os.path.dirname(sys.prefix)
    for python in sorted(glob.glob(os.path.join(parent, "*", "bin", "python"))):
        name = python.split(os.sep)[-3].lower()
        if ("tv" in name or "torchvision" in name) and os.path.dirname(os.path.dirname(python)) != sys.prefix:
            candidates.append((python, f"a virtualenv beside this one ({os.path.dirname(os.path.dirname(python))})"))
    for python, how in candidates:
        if works(python):
            return python, how
    return None, "no interpreter with torchvision found (pass --baseline-python)"


def run_side(command: list[str], timeout: float) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-2000:]}")
    return json.loads(lines[-1])


def run(args) -> int:
    workers = [int(w) for w in args.workers.split(",")]
    root = args.image_dir or tempfile.mkdtemp(prefix="distprop-bench-images-")
    os.makedirs(root, exist_ok=True)
    try:
        tree, dataset = prepare(args, root)
        batches = args.image_batches or args.images // args.image_batch_size
        python, how = find_baseline_python(args.baseline_python)
        print(f"PyTorch side: {python or 'not run'} ({how})")
        if python:
            version = subprocess.run([python, "-c", "import torch, torchvision; print(torch.__version__, "
                                      "torchvision.__version__)"], capture_output=True, text=True).stdout.split()
            print(f"  torch {version[0]}, torchvision {version[1]}")
        common = ["--batch-size", str(args.image_batch_size), "--batches", str(batches), "--crop", str(args.crop)]
        here = os.path.dirname(os.path.abspath(__file__))
        results: dict[tuple[str, int], list[dict]] = {}
        for round_number in range(args.image_rounds):
            for count in workers:
                if python:
                    results.setdefault(("torch", count), []).append(run_side(
                        [python, os.path.join(here, "loader_images_torchvision.py"), tree, "--workers", str(count),
                         "--seed", str(round_number)] + common, timeout=3600))
                results.setdefault(("distprop", count), []).append(run_side(
                    [sys.executable, "-m", "distprop.bench.loader_images_run", dataset, "--workers", str(count),
                     "--seed", str(round_number)] + common, timeout=3600))
        report(results, workers, args, batches)
    finally:
        if args.image_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def report(results: dict, workers: list[int], args, batches: int) -> None:
    print(f"\nRandomResizedCrop({args.crop}) + RandomHorizontalFlip + ToTensor + Normalize, batch "
          f"{args.image_batch_size}, {batches} batches timed from the first, {args.image_rounds} round(s); "
          "images/s/core = images over CPU seconds of the process and its workers")
    print(f"  {'':10} {'workers':>7} {'images/s':>9} {'/core':>7} {'start s':>8} {'RSS main MB':>12} "
          f"{'RSS worker MB':>14}")
    for count in workers:
        for side in ("torch", "distprop"):
            runs = results.get((side, count))
            if not runs:
                continue
            median = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
            print(f"  {side:10} {count:7d} {median['images_per_s']:9.0f} {median['images_per_cpu_s']:7.0f} "
                  f"{median['first_batch_s']:8.1f} {median['rss_main_mb']:12.0f} {median['rss_worker_mb']:14.0f}")
        if ("torch", count) in results:
            ratios = [d["images_per_s"] / t["images_per_s"]
                      for d, t in zip(results[("distprop", count)], results[("torch", count)])]
            ratio = float(np.median(ratios))
            print(f"  ratio distprop / PyTorch at {count} worker(s): {ratio:.2f} (range {min(ratios):.2f}-"
                  f"{max(ratios):.2f}; target >= {IMAGES_TARGET}) {'ok' if ratio >= IMAGES_TARGET else 'BELOW TARGET'}")
