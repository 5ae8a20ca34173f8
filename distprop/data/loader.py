"""`ArrowLoader`: one rank's shuffled, prefetched, resumable mini-batches from Arrow/Parquet.

Pipeline for one epoch on one rank::

    sampler (which samples, in what order)  ->  schedule (which blocks, when)
      num_workers=0:  reader threads decode blocks (row groups) with bounded read-ahead;
                      the background thread builds each batch (gathers rows with one
                      copy per column, decodes and transforms images, packs tokens)
      num_workers=N:  N worker processes read blocks and build batches into shared
                      memory, handed out and taken back in order
      -> the transform, the copy to the GPU (device="gpu")
      -> bounded queue of `prefetch` batches  ->  the training loop

Decoded data stays bounded by ``shuffle_window + max(read_threads, shuffle_window)``
blocks (row groups) plus the batches in the queue, whatever the dataset's size
(with workers: a few blocks per worker, and ``num_workers + prefetch + 1`` batch slots).
Packed token windows are built several batches at a time, a unit of about 256K
tokens: the blocks that unit reads are held at once, and a batch handed out keeps
its unit's memory (a few MB) alive.
The schedule of the rank's epoch is built up front, though: about 8 bytes per
sample of this rank's share, and time proportional to it before the first batch.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable

import numpy as np

from distprop.backend import cupy_module, normalize_device
from distprop.data.index import ColumnsArg
from distprop.data.outputs import build_spec, open_index, probe
from distprop.data.pipeline import BatchProducer, WorkerBatchProducer
from distprop.data.prefetch import Inline, Prefetcher
from distprop.data.sampler import EpochOrder, RankPlan, Stage, batch_count, plan_rank, rank_share
from distprop.data.tokens import TokenOptions
from distprop.errors import ConfigError, DataError

STATE_VERSION = 1


class DataWarning(UserWarning):
    """Something about the data worth knowing that did not stop the epoch (skipped images)."""


class ArrowLoader:
    """Mini-batches of a Parquet/Arrow dataset for rank `rank` of `world_size`.

    Iterating yields ``{column: array}`` dicts, numpy arrays on the host or cupy
    arrays with ``device="gpu"``. Tensor columns come back as ``(batch, *shape)``
    arrays in their stored dtype, scalar columns as ``(batch,)`` arrays.

    Order and sharding (see `distprop.data.sampler` for the details): each epoch is
    a permutation of all samples derived from ``(seed, epoch)`` alone, identical on
    every rank; it is cut into `world_size` equal contiguous parts, so no sample
    appears twice in an epoch across ranks (except wrap-around padding with
    ``drop_last=False``), and every rank yields exactly ``len(loader)`` batches:

    * ``drop_last=True``: ``len = N // (world_size * batch_size)``, all batches full.
    * ``drop_last=False``: each rank gets ``ceil(N / world_size)`` samples (the
      parts run past the end of the epoch's order into its start, so fewer than
      `world_size` samples repeat, at the end of the last part(s)), so
      ``len = ceil(ceil(N / world_size) / batch_size)``;
      the last batch may be partial and has the same size on every rank.

    Within a batch the samples are grouped by the row group they come from (one
    copy per column and row group); which samples form a batch is set by the order.

    Position and resuming: the loader remembers how many batches of the current
    epoch it has handed out. ``iter(loader)`` continues from there; once an epoch is
    exhausted the next ``iter`` starts it again from its first batch (call
    ``set_epoch`` for a new order). ``set_epoch(e)`` moves to the start of epoch
    `e`, and leaves the position alone if `e` is already the current epoch, so the
    usual ``for epoch in range(start, n): loader.set_epoch(epoch)`` loop continues a
    restored position. ``state_dict()``/``load_state_dict()`` save and restore it
    (plain ints and strings, JSON-safe); restoring under another `world_size` or
    `batch_size` splits the samples no rank has consumed yet evenly over the new
    ranks.

    Encoded images (a ``binary`` column or Hugging Face's ``Image`` struct) are
    decoded per sample to HWC uint8 with `channels` 1 or 3, then run through
    `image_transforms`, a list of `distprop.data.transforms` (torchvision's names:
    RandomResizedCrop, CenterCrop, Resize, RandomHorizontalFlip, ToTensor, Normalize,
    ...) whose random choices depend on ``(seed, epoch, sample index)`` only. A corrupt
    or unreadable image raises a DataError naming file, row group and row; with
    ``on_error="skip"`` the sample is left out of its batch (which is then smaller)
    and the skips are reported in a `DataWarning` at the end of the epoch. With
    ``device="gpu"`` and no `transform`, the trailing ToTensor/Normalize run on the
    GPU on the whole uint8 batch.

    Token sequences (a ``list<int>`` column, `tokens_column` or the only one):
    ``sequence_length=L`` with ``pack=True`` yields ``input_ids``/``labels`` windows of
    the concatenated documents (`eos_token` appended to each), with ``document_ids``
    (and ``positions`` if asked); ``pack=False`` yields each document padded to L
    (`pad_token`) with an ``attention_mask``. `vocab_size` checks the ids. See
    `distprop.data.tokens`. Other variable-length list columns whose rows all have
    the same length are read as tensors. ``stack={"x": ["f0", "f1"]}`` (or ``"f*"``)
    stacks scalar columns into one ``(batch, features)`` array.

    Processes and threads: with ``num_workers=0`` batches are built in a background
    thread, overlapping the training step, from blocks that `read_threads` threads
    decode (default: one per core this process may use, at most 4; pyarrow's own
    pool off). ``num_workers=N`` starts N worker processes (on the first ``iter``;
    kept until `close`) that build batches in shared memory; the batches are the
    same as with any other N. Their arrays are views of that memory, not copies: a
    batch's memory is reused only once none of its arrays (or views of them) is
    referenced any more (keeping more than one or two batches alive leaves the
    workers fewer slots to build in; past ``num_workers + prefetch`` of them, further
    batches are copies). The `transform` (``dict -> dict``, on host
    numpy arrays) runs in the loader's process. With several unbound ranks per node,
    keep ``ranks * (num_workers + 1)`` near the core count.

    Extra keywords beyond the common ones: `shuffle_window` (row groups mixed by the
    shuffle; memory grows with it), `filesystem` (a ``pyarrow.fs.FileSystem`` for
    `path_or_uri`). `columns` is None (all), a list of names, or ``{name: (dtype,
    shape)}`` to also check each column's dtype and per-sample shape (either may be
    None).
    """

    def __init__(self, path_or_uri, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True, columns: ColumnsArg = None,
                 transform: Callable[[dict], dict] | None = None, prefetch: int = 2, device=None,
                 shuffle_window: int = 4, num_workers: int = 0, read_threads: int | None = None,
                 image_transforms=None, channels: int = 3, on_error: str = "raise", stack=None,
                 sequence_length: int | None = None, pack: bool = True, tokens_column: str | None = None,
                 eos_token: int | None = None, pad_token: int = 0, vocab_size: int | None = None,
                 document_ids: bool = True, positions: bool = False, truncate: bool = False,
                 filesystem=None):
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("world_size", world_size, minimum=1)
        _check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1} for world_size {world_size}")
        _check_int("seed", seed, minimum=0)
        _check_int("prefetch", prefetch, minimum=0)
        _check_int("shuffle_window", shuffle_window, minimum=1)
        _check_int("num_workers", num_workers, minimum=0)
        if read_threads is None:
            read_threads = default_read_threads()
        _check_int("read_threads", read_threads, minimum=1)
        try:
            self.device = normalize_device(device) or "cpu"
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.device == "gpu":
            cupy_module()  # fail now, with backend's message, rather than in the background thread
        self.index, tokens_column = open_index(path_or_uri, columns, filesystem, tokens_column, sequence_length)
        tokens = None
        if sequence_length is not None:
            tokens = TokenOptions(tokens_column, sequence_length, bool(pack), eos_token, pad_token, vocab_size,
                                  bool(document_ids), bool(positions), bool(truncate))
        self._spec = build_spec(self.index, seed=seed, image_transforms=image_transforms, channels=channels,
                                on_error=on_error, stack=stack, tokens=tokens)
        # On the GPU the images' trailing ToTensor/Normalize run on the whole uint8 batch,
        # after a copy four times smaller (not with a host `transform`, which expects them done).
        self._device_tails = {}
        if self.device == "gpu" and transform is None:
            self._device_tails = {name: tail for name, pipeline in self._spec.images.items()
                                  if (tail := pipeline.defer_tail()) is not None}
        self._probed = False
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = bool(shuffle), seed, bool(drop_last)
        self.transform, self.prefetch = transform, prefetch
        self.shuffle_window, self.num_workers, self.read_threads = shuffle_window, num_workers, read_threads
        if len(self) == 0:
            raise DataError(f"{self.index.location.display}: {self.num_samples} samples are fewer than "
                            f"world_size x batch_size = {world_size} x {batch_size} = {world_size * batch_size}, "
                            "so with drop_last=True no rank would get a batch (lower batch_size or "
                            "pass drop_last=False)")
        self._epoch = 0
        self._history: tuple[Stage, ...] = ()
        self._batches_done = 0
        self._epoch_finished = False
        self._skipped: list[str] = []
        self._pool = None
        self._active = _no_iterator  # weak reference: an abandoned iterator must be collectable

    # -- what the dataset is --------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """Samples in an epoch: rows, or packed windows of tokens."""
        return self._spec.num_samples

    @property
    def columns(self):
        """``{name: ColumnSpec}`` of the dataset columns the loader reads."""
        return self.index.columns

    @property
    def outputs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """``{name: (dtype, per-sample shape)}`` of each batch as built on the host,
        before the transform (images are decoded once to learn their shape)."""
        self._probe()
        return dict(self._spec.outputs)

    @property
    def skipped(self) -> list[str]:
        """The samples left out of the current epoch so far (``on_error="skip"``), each
        as "where: why"."""
        return list(self._skipped)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes (empty until the first ``iter``)."""
        return self._pool.pids if self._pool is not None else []

    def close(self) -> None:
        """Stop the current iterator and the worker processes (they are started again by
        the next ``iter``)."""
        self._stop_active()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def fingerprint(self) -> str:
        return self.index.fingerprint

    def __len__(self) -> int:
        """Batches each rank yields in a whole epoch: a function of the dataset size,
        world_size, batch_size and drop_last only, so equal on every rank."""
        share = rank_share(self.num_samples, self.world_size, self.batch_size, self.drop_last)
        return batch_count(share, self.batch_size, self.drop_last)

    # -- position -------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Use the sample order of `epoch`, from its first batch (a no-op if `epoch`
        is already the current one, so a restored position survives)."""
        _check_int("epoch", epoch, minimum=0)
        if epoch != self._epoch:
            self._stop_active()
            self._epoch, self._history, self._batches_done, self._epoch_finished = epoch, (), 0, False
            self._skipped = []

    def state_dict(self) -> dict:
        """The exact position: epoch and batches handed out, plus what must match on
        restore. Plain JSON-safe values; every rank's state is the same."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_window": self.shuffle_window,
            "drop_last": self.drop_last,
            "epoch": self._epoch,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "batches_consumed": self._batches_done,
            "history": [[s.world_size, s.batch_size, s.batches_consumed] for s in self._history],
            **self._sample_definition(),
        }

    def _sample_definition(self) -> dict:
        """What makes a sample besides the dataset: with token sequences, the window
        length and end token (packing) or the padding (each row). Absent otherwise, so
        states saved before token sequences existed still load."""
        tokens = self._spec.tokens
        if tokens is None:
            return {}
        return {"sequence_length": tokens.sequence_length, "pack": tokens.pack, "eos_token": tokens.eos_token}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: the next batches are exactly those the saved
        loader had not yet yielded in that epoch. Under another world_size or
        batch_size, the samples not yet consumed by any rank are split evenly again."""
        where = self.index.location.display
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"loader state has version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["fingerprint"] != self.fingerprint:
            raise DataError(f"{where}: loader state was saved for another dataset (fingerprint "
                            f"{state['fingerprint']}, this one is {self.fingerprint})")
        for key in ("seed", "shuffle", "shuffle_window", "drop_last"):
            if state[key] != getattr(self, key):
                raise ConfigError(f"loader state has {key}={state[key]!r} but this loader has "
                                  f"{key}={getattr(self, key)!r}; the sample order would differ")
        definition = self._sample_definition()
        for key in ("sequence_length", "pack", "eos_token"):
            if state.get(key) != definition.get(key):
                raise ConfigError(f"loader state has {key}={state.get(key)!r} but this loader has "
                                  f"{key}={definition.get(key)!r}; the samples would differ")
        history = tuple(Stage(*map(int, stage)) for stage in state["history"])
        saved = Stage(int(state["world_size"]), int(state["batch_size"]), int(state["batches_consumed"]))
        for number, stage in enumerate(history + (saved,)):
            available = plan_rank(self.num_samples, stage.world_size, 0, stage.batch_size,
                                  self.drop_last, history[:number]).num_batches
            if not 0 <= stage.batches_consumed <= available:
                raise DataError(f"{where}: loader state says {stage.batches_consumed} batches were consumed "
                                f"but that stretch of the epoch has {available}")
        self._stop_active()
        self._epoch, self._epoch_finished = int(state["epoch"]), False
        if (saved.world_size, saved.batch_size) == (self.world_size, self.batch_size):
            self._history, self._batches_done = history, saved.batches_consumed
        else:
            self._history = history + ((saved,) if saved.batches_consumed else ())
            self._batches_done = 0

    def check_consistent(self, comm) -> None:
        """Compare this loader with every rank's (`comm`: distprop's communicator, an
        mpi4py one, or anything with ``allgather`` of Python objects). Raises the same
        DataError on every rank, so none is left waiting, if the ranks see different
        datasets, order settings (seed, shuffle, window), batch sizes, epochs or
        positions in the epoch (a state restored on some ranks only would leave them
        with fewer batches to go), or the ranks are not exactly 0..world_size-1."""
        gather = getattr(comm, "allgather_object", None) or comm.allgather  # distprop's or mpi4py's
        everyone = gather(self._consistency_record())
        ranks = sorted(entry["rank"] for entry in everyone)
        if ranks != list(range(self.world_size)) or len(everyone) != self.world_size:
            raise DataError(f"{self.index.location.display}: {len(everyone)} processes claim ranks {ranks} "
                            f"but world_size is {self.world_size}")
        for entry in everyone:
            differing = {k: v for k, v in entry.items() if k != "rank" and v != everyone[0][k]}
            if differing:
                reference = {k: everyone[0][k] for k in differing}
                raise DataError(f"{self.index.location.display}: rank {entry['rank']} has {differing} "
                                f"but rank {everyone[0]['rank']} has {reference}")

    def _consistency_record(self) -> dict:
        """What `check_consistent` compares across ranks (all but "rank" must agree)."""
        batches_left = len(self) if self._epoch_finished else self._plan().num_batches - self._batches_done
        return {"rank": self.rank, "fingerprint": self.fingerprint, "world_size": self.world_size,
                "batch_size": self.batch_size, "drop_last": self.drop_last, "shuffle": self.shuffle,
                "shuffle_window": self.shuffle_window, "seed": self.seed, "batches": len(self),
                "epoch": self._epoch, "batches_left": batches_left}

    # -- iteration ------------------------------------------------------------------

    def _plan(self) -> RankPlan:
        """This rank's positions and batch count for the current stretch of the epoch."""
        return plan_rank(self.num_samples, self.world_size, self.rank, self.batch_size,
                         self.drop_last, self._history)

    def __iter__(self):
        self._stop_active()
        if self._epoch_finished:
            self._history, self._batches_done, self._epoch_finished = (), 0, False
        if self._batches_done == 0:
            self._skipped = []
        self._probe()
        plan = self._plan()
        order = EpochOrder(self._spec.samples_per_block, self.seed, self._epoch, self.shuffle, self.shuffle_window)
        feeder = _device_feeder(self.device)
        arguments = (self._spec, order, plan, self._batches_done, self.shuffle_window, self._epoch)
        if self.num_workers:
            produce = WorkerBatchProducer(self._workers(), *arguments, self._finisher(feeder))
            depth = 1  # the workers' slots hold the other prefetched batches
        else:
            allocate = None
            if feeder is not None and self.transform is None:  # assemble straight into pinned buffers
                allocate = feeder.host_buffer
            produce = BatchProducer(*arguments, self._finisher(feeder), self.read_threads, allocate)
            depth = self.prefetch
        source = Prefetcher(produce, depth) if self.prefetch else Inline(produce)
        iterator = _LoaderIterator(self, source, plan.num_batches)
        self._active = weakref.ref(iterator)
        return iterator

    def _probe(self) -> None:
        if not self._probed:
            probe(self._spec)
            self._probed = True

    def _workers(self):
        if self._pool is not None and self._pool.broken:  # a worker died in an earlier epoch
            self._pool.close()
            self._pool = None
        if self._pool is None:
            from distprop.data.worker_pool import WorkerPool  # only runs with workers need it

            # A slot for each worker, for each prefetched batch and for the one in use.
            self._pool = WorkerPool(self._spec, self.num_workers, slots=self.num_workers + max(1, self.prefetch) + 1,
                                    batch_size=self.batch_size, cache_blocks=2 * self.shuffle_window + 1)
        return self._pool

    def _finisher(self, feeder):
        """host batch -> delivered batch: the user's transform, the copy to the GPU and
        the images' deferred ToTensor/Normalize."""
        transform, tails = self.transform, self._device_tails

        def finish_on_device(batch: dict) -> dict:
            for name, tail in tails.items():
                batch[name] = tail.apply_to_batch(batch[name])
            return batch

        def finish(batch: dict) -> dict:
            if transform is not None:
                batch = transform(batch)
            if feeder is not None:
                batch = feeder.to_device(batch, finish_on_device if tails else None)
            return batch

        return finish

    def _stop_active(self) -> None:
        iterator = self._active()
        if iterator is not None:
            iterator.close()
        self._active = _no_iterator

    def _advance(self, iterator: "_LoaderIterator", batches_done: int, finished: bool, skipped=()) -> None:
        if iterator is self._active():
            self._batches_done, self._epoch_finished = batches_done, finished
            self._skipped.extend(skipped)

    def _report_skipped(self, iterator: "_LoaderIterator") -> None:
        if self._skipped and iterator is self._active():
            warnings.warn(f"{self.index.location.display}: epoch {self._epoch} left out {len(self._skipped)} "
                          f"sample(s) whose images could not be decoded (on_error='skip'); the first: "
                          f"{self._skipped[0]} (all of them: loader.skipped)", DataWarning, stacklevel=3)


def _no_iterator():
    return None


def usable_cores() -> int:
    """Cores this process may run on (an MPI rank's binding narrows them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without affinity masks
        return os.cpu_count() or 1


def default_read_threads() -> int:
    """Block-reading threads when not given: one per usable core, at most 4."""
    return max(1, min(4, usable_cores()))


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _device_feeder(device: str):
    if device != "gpu":
        return None
    from distprop.data.device import DeviceFeeder  # only GPU runs need it
    return DeviceFeeder()


class _LoaderIterator:
    """What ``iter(loader)`` returns; moves the loader's position as batches are handed out."""

    def __init__(self, loader: ArrowLoader, source, num_batches: int):
        self._loader, self._source, self._num_batches = loader, source, num_batches
        self._closed = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        try:
            batch_number, batch, skipped = next(self._source)
        except StopIteration:
            self._loader._advance(self, self._num_batches, finished=True)
            self.close()
            self._loader._report_skipped(self)
            raise
        except BaseException:
            self.close()
            raise
        self._loader._advance(self, batch_number + 1, finished=False, skipped=skipped)
        return batch

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._source.close()

    def __del__(self):
        self.close()
