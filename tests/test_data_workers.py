"""Worker processes: the same batches whatever their number, resume across numbers,
errors and deaths that end the epoch with a message, no process left behind.

Every test that starts a separate Python process gives it a hard timeout."""

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from media_helpers import write_documents, write_images

from distprop.data import ArrowLoader
from distprop.data.transforms import CenterCrop, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor
from distprop.errors import DataError

TRANSFORMS = [RandomResizedCrop(24), RandomHorizontalFlip(), ToTensor(), Normalize((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))]
HERE = os.path.dirname(os.path.abspath(__file__))


def batches(loader, limit=None):
    """Copies of the batches of one pass (the first `limit`, taking no more from the loader)."""
    return [{name: np.array(values) for name, values in batch.items()} for batch in itertools.islice(loader, limit)]


def assert_same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    write_images(path / "d.parquet", 40, size=(40, 48), row_group_size=6)
    return path


def test_the_same_batches_with_any_number_of_workers(images):
    reference = batches(ArrowLoader(images, 6, seed=2, image_transforms=TRANSFORMS, drop_last=False))
    for workers in (1, 3):
        loader = ArrowLoader(images, 6, seed=2, image_transforms=TRANSFORMS, drop_last=False, num_workers=workers)
        try:
            assert_same(batches(loader), reference)
            pids = loader.worker_pids
            loader.set_epoch(1)
            batches(loader)
            assert loader.worker_pids == pids  # kept across epochs
        finally:
            loader.close()
        assert loader.worker_pids == []


def test_with_workers_one_finished_batch_waits_beyond_the_one_in_use(images):
    """The workers' slots hold the batches being prepared; after them only one
    finished batch waits (and one more may be finished, waiting to be queued)."""
    finished = []

    def record(batch):  # runs in the main process, as each batch comes from the workers
        finished.append(batch["label"].tolist())
        return batch

    loader = ArrowLoader(images, 4, seed=1, prefetch=3, num_workers=2, image_transforms=TRANSFORMS, transform=record)
    try:
        stream = iter(loader)
        first = next(stream)
        deadline = time.monotonic() + 60
        while len(finished) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # time enough for the workers to finish several more
        assert 2 <= len(finished) <= 1 + 1 + 1, f"{len(finished)} batches finished with one in use"
        assert first["label"].tolist() == finished[0]
        stream.close()
    finally:
        loader.close()


def test_tokens_with_workers(tmp_path):
    rng = np.random.default_rng(0)
    write_documents(tmp_path / "t.parquet", [rng.integers(1, 100, int(rng.integers(1, 30))).tolist()
                                             for _ in range(90)], row_group_size=8)
    options = {"sequence_length": 16, "eos_token": 0, "positions": True, "seed": 1}
    loader = ArrowLoader(tmp_path, 5, num_workers=2, **options)
    try:
        assert_same(batches(loader), batches(ArrowLoader(tmp_path, 5, **options)))
    finally:
        loader.close()


def test_resuming_with_another_number_of_workers(images):
    options = {"seed": 4, "image_transforms": TRANSFORMS}
    reference = batches(ArrowLoader(images, 4, **options))
    stopped = ArrowLoader(images, 4, num_workers=2, **options)
    try:
        assert_same(batches(stopped, limit=3), reference[:3])
        state = stopped.state_dict()
    finally:
        stopped.close()
    for workers in (0, 3):
        resumed = ArrowLoader(images, 4, num_workers=workers, **options)
        resumed.load_state_dict(state)
        try:
            assert_same(batches(resumed), reference[3:])
        finally:
            resumed.close()


def test_an_abandoned_epoch_does_not_leak_into_the_next(images):
    loader = ArrowLoader(images, 4, num_workers=2, prefetch=3, image_transforms=TRANSFORMS)
    expected = ArrowLoader(images, 4, image_transforms=TRANSFORMS)
    expected.set_epoch(1)
    try:
        batches(loader, limit=1)  # leaves batches in flight
        loader.set_epoch(1)
        assert_same(batches(loader), batches(expected))
    finally:
        loader.close()


def test_an_error_in_a_worker_names_the_row(tmp_path):
    write_images(tmp_path / "d.parquet", 20, size=(40, 40), row_group_size=6, replace={9: b"\xff\xd8 not a jpeg"})
    loader = ArrowLoader(tmp_path, 4, shuffle=False, num_workers=2, image_transforms=[CenterCrop(32)])
    try:
        with pytest.raises(DataError, match=r"d.parquet \(row group 1\) row 3: column 'image' is a corrupt"):
            batches(loader)
    finally:
        loader.close()


def run_script(body: str, tmp_path, timeout: float = 120, **popen):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {HERE!r})
        from media_helpers import write_images
        from distprop.data import ArrowLoader
        from distprop.data.transforms import CenterCrop, ToTensor
        write_images({str(tmp_path / "d.parquet")!r}, 64, size=(40, 40), row_group_size=8)
    """) + textwrap.dedent(body))
    # Ctrl-C must reach the script as a KeyboardInterrupt: a test run started in the
    # background (`cmd &` in a script) ignores SIGINT, children inherit that, and Python
    # then leaves it ignored.
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, seconds: float = 30.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_a_killed_worker_ends_the_epoch_with_an_error(tmp_path):
    process = run_script(f"""
        import os, signal
        loader = ArrowLoader({str(tmp_path)!r}, 4, shuffle=False, num_workers=2, image_transforms=[CenterCrop(32)])
        iterator = iter(loader)
        next(iterator)
        os.kill(loader.worker_pids[1], signal.SIGKILL)
        try:
            for _ in iterator:
                pass
        except Exception as error:
            print("RAISED", type(error).__name__, error)
        loader.close()
    """, tmp_path)
    out, err = process.communicate(timeout=120)
    assert "RAISED DataError" in out, out + err
    assert "was killed by SIGKILL while building batch" in out and "row group" in out and "rows" in out, out


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_no_worker_outlives_the_training_process(tmp_path, how):
    """Ctrl-C (SIGINT) stops the loader's workers; a process killed outright leaves
    workers that notice and exit by themselves."""
    process = run_script("""
        import time
        loader = ArrowLoader(sys.argv[0].rsplit("/", 1)[0], 4, num_workers=2, image_transforms=[CenterCrop(32)])
        iterator = iter(loader)
        next(iterator)
        print(*loader.worker_pids, flush=True)
        while True:
            for _ in loader:
                time.sleep(0.01)
    """, tmp_path)
    try:
        pids = [int(p) for p in process.stdout.readline().split()]
        assert len(pids) == 2, process.stderr.read()
        process.send_signal(how)
        process.wait(timeout=60)
        assert wait_gone(pids) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
