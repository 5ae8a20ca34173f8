"""`distprop bench loader --suite tokens`: packing a tokenized corpus into windows
against reading its token column with pyarrow alone.

The corpus (``--megabytes`` of int32 token ids in a ``list<int32>`` column, document
lengths log-normal around ``--mean-document`` tokens, GPT-2's vocabulary size) is
written at the start. Each round, back to back, in this process, files in the page
cache:

* reference: ``pyarrow.parquet.read_table`` of the token column and its values as
  one numpy array (what any packing must at least do);
* distprop: one shuffled epoch of ``ArrowLoader(sequence_length=L, eos_token=...)``,
  every window as ``input_ids``/``labels`` (+ ``document_ids``), in-process
  (``num_workers=0``), with the loader's default number of block-reading threads
  (one per usable core, at most 4; the common ``--read-threads`` sets it).
  ``read_table`` goes through pyarrow's dataset scanner, whose I/O threads read and
  decode row groups side by side even with ``use_threads=False`` (measured on 2
  cores: 0.42 s of CPU in 0.23 s; reading the same row groups one after another
  with ``ParquetFile.read_row_group`` took 0.32 s on one core): the reference uses
  about two cores, as the loader's reader threads do.

Throughput is tokens per second; the ratio is distprop's over pyarrow's (target >=
0.8), the median of the per-round ratios. The same ratio in tokens per CPU second
(every thread of the process) is printed too: on a machine whose cores are busy
with other work, the loader's reader and assembler threads queue for a core and
the wall-clock ratio measures the queue.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import numpy as np

TOKENS_TARGET = 0.8
GPT2_VOCABULARY = 50257


def configure(parser) -> None:
    group = parser.add_argument_group("tokens suite")
    group.add_argument("--megabytes", type=float, default=100.0, help="size of the token ids written (int32)")
    group.add_argument("--mean-document", type=int, default=600, help="mean document length in tokens")
    group.add_argument("--sequence-length", type=int, default=1024)
    group.add_argument("--token-batch-size", type=int, default=32, help="windows per batch")
    group.add_argument("--no-document-ids", action="store_true", help="measure without document_ids")


def write_corpus(path: str, megabytes: float, mean_document: int, seed: int = 0) -> int:
    """Write the synthetic corpus; returns its token count."""
    import pyarrow as pa

    from distprop.data.writer import DatasetWriter

    rng = np.random.default_rng(seed)
    target = int(megabytes * 1e6 / 4)
    written = 0
    sigma = 1.0
    with DatasetWriter(path, row_group_size=1024) as writer:
        while written < target:
            lengths = np.maximum(1, rng.lognormal(np.log(mean_document) - sigma ** 2 / 2, sigma, 4096)).astype(np.int64)
            lengths = lengths[np.cumsum(lengths) <= target - written] if lengths.sum() > target - written else lengths
            if not len(lengths):
                lengths = np.array([target - written])
            values = rng.integers(0, GPT2_VOCABULARY - 1, int(lengths.sum()), dtype=np.int32)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            writer.write({"tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})
            written += int(lengths.sum())
    return written


def run(args) -> int:
    import pyarrow.parquet as pq

    from distprop.data import ArrowLoader
    from distprop.data.loader import default_read_threads

    workdir = tempfile.mkdtemp(prefix="distprop-bench-tokens-")
    try:
        path = f"{workdir}/corpus"
        start = time.perf_counter()
        tokens = write_corpus(path, args.megabytes, args.mean_document)
        print(f"wrote {tokens} tokens ({tokens * 4 / 1e6:.0f} MB of int32 ids, documents of ~{args.mean_document} "
              f"tokens, row groups of 1024 documents) in {time.perf_counter() - start:.1f} s")

        read_threads = args.read_threads or default_read_threads()

        def reference() -> int:
            values = pq.read_table(path, columns=["tokens"], use_threads=False).column("tokens").combine_chunks()
            return len(values.flatten().to_numpy())

        def ours(epoch: int) -> int:
            loader = ArrowLoader(path, args.token_batch_size, sequence_length=args.sequence_length,
                                 eos_token=GPT2_VOCABULARY - 1, document_ids=not args.no_document_ids,
                                 read_threads=read_threads, seed=epoch)
            return sum(batch["input_ids"].size for batch in loader)

        ratios, rates, cpu_ratios = [], [], []
        for round_number in range(args.rounds + 1):  # round 0 warms the page cache
            begin, cpu = time.perf_counter(), time.process_time()
            reference_tokens = reference()
            reference_time, reference_cpu = time.perf_counter() - begin, time.process_time() - cpu
            begin, cpu = time.perf_counter(), time.process_time()
            our_tokens = ours(round_number)
            our_time, our_cpu = time.perf_counter() - begin, time.process_time() - cpu
            if round_number:
                rates.append((reference_tokens / reference_time, our_tokens / our_time))
                ratios.append(rates[-1][1] / rates[-1][0])
                cpu_ratios.append((our_tokens / our_cpu) / (reference_tokens / reference_cpu))
        reference_rate, our_rate = (float(np.median([r[i] for r in rates])) for i in (0, 1))
        ratio = float(np.median(ratios))
        print(f"\npacking into windows of {args.sequence_length} (+1) tokens, batch {args.token_batch_size}, "
              f"{'without' if args.no_document_ids else 'with'} document_ids, end token appended, shuffled, "
              f"{read_threads} read thread{'s' * (read_threads > 1)}; medians of {args.rounds} interleaved rounds")
        print(f"  {'':44} {'Mtokens/s':>10}")
        print(f"  {'pyarrow read_table + values to numpy':44} {reference_rate / 1e6:10.1f}")
        print(f"  {'ArrowLoader packed epoch':44} {our_rate / 1e6:10.1f}")
        print(f"  ratio packing / pyarrow read {ratio:.2f} (range {min(ratios):.2f}-{max(ratios):.2f}; "
              f"target >= {TOKENS_TARGET}) {'ok' if ratio >= TOKENS_TARGET else 'BELOW TARGET'}")
        # Tokens per CPU second (all threads of this process): what a loaded machine,
        # where the threads queue for cores, shows rather than the wall-clock ratio.
        print(f"  tokens per CPU second, packing / pyarrow read {np.median(cpu_ratios):.2f} "
              f"(range {min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
