"""`distprop bench loader`: the Arrow loader against raw pyarrow, and a training step
fed by the loader against the same step on arrays already in memory
(``--suite arrays``, the default). ``--suite images`` measures decoding and
augmenting JPEGs against PyTorch's DataLoader with torchvision (see
`distprop.bench.loader_images`), ``--suite tokens`` packing token sequences against
pyarrow reading them (see `distprop.bench.loader_tokens`).

Both parts run on a synthetic dataset written at the start (or an existing one,
``--dir``), all in the same process, with the files in the page cache:

1. Throughput: one shuffled epoch of `ArrowLoader` against
   ``pyarrow.parquet.read_table`` of the same files plus conversion of every
   column to numpy (unshuffled, all cores). Ratio = loader samples/s over
   read_table's; target >= 0.7.
2. Training step: an MLP with SGD + momentum, `--steps` steps fed by the loader
   against the same steps over batches sliced from arrays in memory. Ratio = loader-
   fed time over in-memory time; target <= 1.03. Timing starts after the first
   batch, so it measures the steady state, not the epoch's start-up. Both sides run
   BLAS on one core fewer than the process may use (``--blas-threads``), as a CPU
   training job should: BLAS threads wait for each other, so a loader thread that
   preempts one of them stalls them all (measured on 2 cores with BLAS on both:
   1.05-1.15x, several times the loader's own CPU time).

Each round times the reference and then distprop, back to back; the figures are
medians over rounds, and each ratio is the median of the per-round ratios, so load
that drifts during the run (a shared machine) cancels out of it.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import numpy as np

from distprop.bench.timing import environment_note

THROUGHPUT_TARGET = 0.7
STEP_TARGET = 1.03


def configure(parser) -> None:
    from distprop.bench import loader_images, loader_tokens

    parser.add_argument("--suite", choices=("arrays", "images", "tokens"), default="arrays",
                        help="arrays: numeric tensors (default); images: JPEG decode and augmentation against "
                             "PyTorch's DataLoader; tokens: packing against pyarrow")
    parser.add_argument("--samples", type=int, default=60000)
    parser.add_argument("--shape", default="3,32,32", help="per-sample tensor shape (float32)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
    parser.add_argument("--read-threads", type=int, default=None,
                        help="loader block-reading threads (default: the loader's, one per usable core up to 4)")
    parser.add_argument("--window", type=int, default=4, help="loader shuffle_window (row groups)")
    parser.add_argument("--format", choices=("parquet", "ipc"), default="parquet",
                        help="layout of the synthetic dataset")
    parser.add_argument("--dir", default=None, help="an existing dataset to use instead of a synthetic one")
    parser.add_argument("--steps", type=int, default=30, help="training steps per round (0: skip that part)")
    parser.add_argument("--hidden", default="1024,1024", help="MLP hidden sizes for the step part")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="BLAS threads for both sides of the step part (default: one fewer than the "
                             "usable cores, leaving a core to the loader's threads)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where the loader delivers batches and the step part trains")
    loader_images.configure(parser)
    loader_tokens.configure(parser)


def run(args) -> int:
    if args.suite != "arrays":
        from distprop.bench import loader_images, loader_tokens

        print(environment_note())
        return (loader_images if args.suite == "images" else loader_tokens).run(args)
    from distprop.data import ArrowLoader, DatasetIndex
    from distprop.data.loader import default_read_threads, usable_cores
    from distprop.data.synthetic import write_synthetic

    print(environment_note())
    if args.read_threads is None:
        args.read_threads = default_read_threads()
    if args.blas_threads is None:
        args.blas_threads = max(1, usable_cores() - 1)
    shape = tuple(int(d) for d in args.shape.split(","))
    workdir = None
    try:
        if args.dir is None:
            workdir = tempfile.mkdtemp(prefix="distprop-bench-loader-")
            path = f"{workdir}/data"
            start = time.perf_counter()
            write_synthetic(path, args.samples, shape=shape, format=args.format)
            print(f"wrote {args.samples} samples of float32 {'x'.join(map(str, shape))} + int64 label "
                  f"({args.format}, default layout) in {time.perf_counter() - start:.1f} s")
        else:
            path = args.dir
        index = DatasetIndex.open(path)
        sample_bytes = sum(int(np.prod(s.shape, dtype=np.int64)) * s.dtype.itemsize for s in index.columns.values())
        print(f"dataset {path}: {index.num_rows} samples, {len(index.blocks)} row groups, "
              f"{index.num_rows * sample_bytes / 1e9:.2f} GB decoded")

        def loader(epoch: int) -> ArrowLoader:
            result = ArrowLoader(path, args.batch_size, shuffle=True, seed=0, read_threads=args.read_threads,
                                 shuffle_window=args.window, device=args.device)
            result.set_epoch(epoch)
            return result

        _throughput(index, loader, sample_bytes, args)
        if args.steps:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=args.blas_threads):
                _training_step(index, loader, shape, args)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _read_table_numpy(index) -> int:
    """The reference: all files through pyarrow.parquet.read_table (or the IPC reader),
    every column to numpy; returns the number of samples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distprop.data.format import column_to_numpy
    from distprop.data.storage import open_input

    rows = 0
    for data_file in index.files:
        if data_file.kind == "parquet":
            table = pq.read_table(data_file.location.path, filesystem=data_file.location.filesystem)
        else:  # memory-mapped where local, as the loader reads it; --dir may be a URI
            with open_input(data_file.location, memory_map=True) as source:
                table = pa.ipc.open_file(source).read_all()
        for name, spec in index.columns.items():
            column_to_numpy(table.column(name), spec, data_file.location.display)
        rows += table.num_rows
    return rows


def _throughput(index, loader, sample_bytes: int, args) -> None:
    reference, ours, samples = [], [], 0
    for round_number in range(args.rounds + 1):  # round 0 warms the page cache and is not counted
        start = time.perf_counter()
        reference_rows = _read_table_numpy(index)
        reference_time = time.perf_counter() - start
        start = time.perf_counter()
        samples = sum(len(next(iter(batch.values()))) for batch in loader(round_number))
        ours_time = time.perf_counter() - start
        if round_number:
            reference.append(reference_rows / reference_time)
            ours.append(samples / ours_time)
    reference_rate, ours_rate = float(np.median(reference)), float(np.median(ours))
    print(f"\nthroughput, batch {args.batch_size}, medians of {args.rounds} interleaved rounds "
          f"(loader: shuffled, {args.read_threads} decode threads, window {args.window} row groups, "
          f"batches on {args.device})")
    print(f"  {'':34} {'samples/s':>11} {'GB/s':>7}")
    print(f"  {'pyarrow read_table + to numpy':34} {reference_rate:11.0f} {reference_rate * sample_bytes / 1e9:7.2f}")
    print(f"  {'ArrowLoader, one epoch':34} {ours_rate:11.0f} {ours_rate * sample_bytes / 1e9:7.2f}")
    ratio = float(np.median(np.array(ours) / np.array(reference)))
    print(f"  ratio loader / read_table {ratio:.2f} (target >= {THROUGHPUT_TARGET}) "
          f"{'ok' if ratio >= THROUGHPUT_TARGET else 'BELOW TARGET'}")


def _training_step(index, loader, shape, args) -> None:
    import distprop as dp
    import distprop.functional as F
    from distprop import backend, optim
    from distprop.data.loader import usable_cores
    from distprop.errors import ConfigError
    from distprop.nn import MLP

    hidden = [int(h) for h in args.hidden.split(",") if h]
    steps = min(args.steps, index.num_rows // args.batch_size - 1)
    if steps < 1:
        raise ConfigError(f"the step part needs at least 2 batches of {args.batch_size}; the dataset has "
                          f"{index.num_rows} samples (raise --samples or lower --batch-size, or --steps 0)")
    features = int(np.prod(shape))
    dp.manual_seed(0)
    model = MLP(features, hidden, 10)
    if args.device == "gpu":
        model.to(device="gpu")
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(images, labels):
        optimizer.zero_grad()
        F.cross_entropy(model(dp.tensor(images)), labels).backward()
        optimizer.step()

    # The same number of samples, already decoded and in memory (on the device), sliced into batches.
    memory = {name: backend.to_device(np.concatenate([backend.to_numpy(batch[name]) for _, batch in
                                                      zip(range(steps + 1), loader(0))]), args.device)
              for name in ("image", "label")}
    batches = [(memory["image"][i * args.batch_size:(i + 1) * args.batch_size],
                memory["label"][i * args.batch_size:(i + 1) * args.batch_size]) for i in range(steps + 1)]

    def in_memory() -> float:
        step(*batches[0])
        start = time.perf_counter()
        for images, labels in batches[1:]:
            step(images, labels)
        backend.synchronize()
        return time.perf_counter() - start

    def fed_by_loader(epoch: int) -> float:
        stream = iter(loader(epoch))
        first = next(stream)
        step(first["image"], first["label"])
        start = time.perf_counter()
        for _, batch in zip(range(steps), stream):
            step(batch["image"], batch["label"])
        backend.synchronize()
        elapsed = time.perf_counter() - start
        stream.close()
        return elapsed

    reference, ours = [], []
    for round_number in range(args.rounds):
        reference.append(in_memory())
        ours.append(fed_by_loader(round_number + 1))
    reference_time, ours_time = float(np.median(reference)), float(np.median(ours))
    ratio = float(np.median(np.array(ours) / np.array(reference)))
    print(f"\ntraining step on {args.device}: MLP {features}-{'-'.join(map(str, hidden))}-10, SGD momentum 0.9, "
          f"batch {args.batch_size}, {steps} steps per round, {args.blas_threads} BLAS threads on both sides "
          f"of {usable_cores()} cores, {args.read_threads} loader decode threads, "
          f"medians of {args.rounds} interleaved rounds")
    print(f"  arrays in memory    {reference_time / steps * 1e3:8.2f} ms/step")
    print(f"  fed by ArrowLoader  {ours_time / steps * 1e3:8.2f} ms/step")
    print(f"  ratio loader / in-memory {ratio:.3f} (target <= {STEP_TARGET}) "
          f"{'ok' if ratio <= STEP_TARGET else 'ABOVE TARGET'}")
