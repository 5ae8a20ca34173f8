"""distprop.cpu_threads: ops split over threads give the results of one thread."""

import threading
import time

import numpy as np
import pytest

import distprop as dp
import distprop.functional as F
from distprop import cpu_threads
from threadpoolctl import threadpool_limits

pytestmark = pytest.mark.skipif(not cpu_threads._blas(), reason="platform: no BLAS library that threadpoolctl controls")


@pytest.fixture
def splits(monkeypatch):
    """The part counts that map_parts used, to check that a test really ran parts."""
    counts = []
    real_split = cpu_threads.split

    def spy(count, parts):
        counts.append(parts)
        return real_split(count, parts)

    monkeypatch.setattr(cpu_threads, "split", spy)
    return counts


@pytest.fixture
def three_threads():
    """Three threads whatever the machine has (the parts then share cores)."""
    with threadpool_limits(limits=3, user_api="blas"):
        assert cpu_threads.get_num_threads() == 3
        yield


def test_split_covers_the_range_in_near_equal_parts():
    assert cpu_threads.split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert cpu_threads.split(2, 2) == [(0, 1), (1, 2)]
    for count in range(0, 30):
        for parts in range(1, 5):
            bounds = cpu_threads.split(count, parts)
            sizes = [stop - start for start, stop in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(sizes) - min(sizes) <= 1


def test_map_parts_runs_each_part_on_its_own_thread_with_single_threaded_blas(three_threads):
    seen = []

    def work(start, stop):
        seen.append((threading.get_ident(), cpu_threads.get_num_threads()))
        time.sleep(0.05)  # keep every thread busy so that no thread takes two parts
        return start, stop

    assert cpu_threads.map_parts(work, 9) == [(0, 3), (3, 6), (6, 9)]
    assert len({ident for ident, _ in seen}) == 3
    assert {blas for _, blas in seen} == {1}
    assert cpu_threads.get_num_threads() == 3  # restored


def test_map_parts_stays_on_one_thread_for_little_work_or_one_thread(three_threads):
    calls = []
    cpu_threads.map_parts(lambda a, b: calls.append((a, b)), 5, min_per_part=3)
    assert calls == [(0, 5)]
    with threadpool_limits(limits=1, user_api="blas"):
        cpu_threads.map_parts(lambda a, b: calls.append((a, b)), 100)
    assert calls[-1] == (0, 100)


def test_nested_map_parts_runs_inline(three_threads):
    inner = []

    def outer(start, stop):
        return cpu_threads.map_parts(lambda a, b: inner.append((threading.get_ident(), a, b)) or (a, b), 6)

    results = cpu_threads.map_parts(outer, 3)
    assert results == [[(0, 6)], [(0, 6)], [(0, 6)]]
    assert len(inner) == 3


def test_an_error_in_one_part_is_raised_after_all_parts_finish(three_threads):
    finished = []

    def work(start, stop):
        if start == 0:
            raise ValueError("part 0 failed")
        time.sleep(0.1)
        finished.append(start)

    with pytest.raises(ValueError, match="part 0 failed"):
        cpu_threads.map_parts(work, 3)
    assert sorted(finished) == [1, 2]
    assert cpu_threads.get_num_threads() == 3


def test_set_num_threads_sets_blas_and_rejects_nonsense():
    before = cpu_threads.get_num_threads()
    try:
        dp.set_num_threads(1)
        assert dp.get_num_threads() == 1
    finally:
        cpu_threads.set_num_threads(before)
    with pytest.raises(ValueError, match="at least 1"):
        dp.set_num_threads(0)


@pytest.mark.parametrize("a_shape,b_shape,split", [
    ((200, 300), (300, 500), True),         # split along the columns
    ((2000, 300), (300, 64), True),         # along the rows
    ((6, 400, 128), (6, 128, 200), True),   # along the batch
    ((6, 400, 128), (128, 200), True),      # batch against a broadcast matrix
    ((2, 200, 256), (2, 256, 400), True),   # batch shorter than the threads: along the columns
    ((64, 300), (300, 500), False),         # too little work to split
    ((300,), (300, 500), False),            # vector: one call
])
def test_matmul_matches_numpy(three_threads, splits, a_shape, b_shape, split):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    np.testing.assert_allclose(cpu_threads.matmul(a, b), a @ b, rtol=1e-12, atol=1e-12)
    assert (max(splits, default=1) > 1) == split


def test_matmul_writes_into_out_including_a_transposed_one(three_threads, splits):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((200, 300)).astype(np.float32), rng.standard_normal((300, 400)).astype(np.float32)
    out = np.empty((400, 200), np.float32).T
    assert cpu_threads.matmul(a, b, out=out) is out
    np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-3)
    assert max(splits) > 1


def _conv_pool_step(x, w, b):
    x, w, b = dp.tensor(x, requires_grad=True), dp.tensor(w, requires_grad=True), dp.tensor(b, requires_grad=True)
    y = F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2)
    z = F.conv2d(y, dp.tensor(np.ones((3, w.shape[0], 3, 3))), None, padding=1)  # channels-last input
    (z * z).sum().backward()
    return [z.data, x.grad, w.grad, b.grad]


def test_conv_and_pooling_on_threads_match_one_thread(splits):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((120, 3, 24, 24))
    w = rng.standard_normal((16, 3, 3, 3)) * 0.3
    b = rng.standard_normal(16)
    with threadpool_limits(limits=1, user_api="blas"):
        single = _conv_pool_step(x, w, b)
    assert splits == []
    with threadpool_limits(limits=3, user_api="blas"):
        threaded = _conv_pool_step(x, w, b)
    assert splits.count(3) >= 5  # the convolutions' forward and backward passes and the pooling
    for one, many in zip(single, threaded):
        np.testing.assert_allclose(many, one, rtol=1e-10, atol=1e-10)


def _child_runs_parts(queue):
    with threadpool_limits(limits=3, user_api="blas"):
        queue.put(cpu_threads.map_parts(lambda start, stop: (start, stop), 9))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="platform: needs fork")
def test_a_forked_child_gets_threads_of_its_own(three_threads):
    import multiprocessing

    cpu_threads.map_parts(lambda start, stop: time.sleep(0.05), 9)  # the parent's pool has 2 idle threads
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_runs_parts, args=(queue,))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        pytest.fail("map_parts in a forked child hung")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == [(0, 3), (3, 6), (6, 9)]


@pytest.mark.parametrize("a_shape,b_shape", [
    ((5000, 144), (144, 16)),    # tall times narrow: row blocks, and a remainder
    ((4096, 25), (25, 6)),       # row blocks, no remainder
    ((144, 5000), (5000, 16)),   # long reduction into a small result: block products summed
    ((6, 9000), (9000, 25)),
    ((300, 300), (300, 300)),    # neither: one call
])
@pytest.mark.parametrize("threads", [1, 3])
def test_blocked_products_match_numpy(a_shape, b_shape, threads):
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    with threadpool_limits(limits=threads, user_api="blas"):
        np.testing.assert_allclose(cpu_threads.matmul(a, b), a @ b, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(cpu_threads.matmul(b.T, a.T), (a @ b).T, rtol=1e-10, atol=1e-10)
        out = np.full((a_shape[0], b_shape[1] * 2), np.nan)[:, ::2]  # a strided destination
        assert cpu_threads.matmul(a, b, out=out) is out
        np.testing.assert_allclose(out, a @ b, rtol=1e-10, atol=1e-10)


def test_blocked_products_in_a_batch_match_numpy():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((1, 5000, 16))
    b = rng.standard_normal((25, 1, 16, 9))  # col2im-like per-offset products
    assert cpu_threads._blocks(5000, 16, 9)
    np.testing.assert_allclose(cpu_threads.matmul(a, b), np.matmul(a, b), rtol=1e-12, atol=1e-12)


def _on_another_thread(function):
    results = []
    worker = threading.Thread(target=lambda: results.append(function()))
    worker.start()
    worker.join(timeout=60)
    assert len(results) == 1, "the function failed on the other thread"
    return results[0]


def test_off_the_main_thread_nothing_is_split_and_blas_is_left_alone(three_threads):
    # OpenBLAS ignores thread-count changes from other threads: holding BLAS there
    # would do nothing, and restoring from there could leave it at one thread.
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((400, 300)), rng.standard_normal((300, 500))
    assert _on_another_thread(lambda: cpu_threads.map_parts(lambda start, stop: (start, stop), 9)) == [(0, 9)]
    np.testing.assert_allclose(_on_another_thread(lambda: cpu_threads.matmul(a, b)), a @ b, rtol=1e-12, atol=1e-12)

    def hold():
        with cpu_threads.single_threaded_blas():
            return cpu_threads._active_regions

    with cpu_threads.single_threaded_blas():  # the main thread holds BLAS meanwhile
        assert _on_another_thread(hold) == 1  # the other thread's block counted nothing
    assert cpu_threads.get_num_threads() == 3 and cpu_threads._active_regions == 0


def test_map_parts_from_many_threads_at_once(three_threads):
    errors = []

    def hammer():
        try:
            for size in range(2, 60):
                assert cpu_threads.map_parts(lambda start, stop: stop - start, size) == [size]  # not split here
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    others = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in others:
        thread.start()
    for size in range(3, 200):
        assert sum(cpu_threads.map_parts(lambda start, stop: stop - start, size)) == size
    for thread in others:
        thread.join(timeout=60)
    assert errors == []
    assert cpu_threads.get_num_threads() == 3


@pytest.mark.parametrize("alias", ["a", "b"])
def test_matmul_into_one_of_its_inputs_aliasing_out(three_threads, alias):
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((500, 500)), rng.standard_normal((500, 500))
    expected = a @ b
    out = a if alias == "a" else b
    cpu_threads.matmul(a, b, out=out)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_set_num_threads_inside_a_region_applies_when_it_closes(three_threads):
    with cpu_threads.single_threaded_blas():
        cpu_threads.set_num_threads(2)
        assert cpu_threads.get_num_threads() == 1
    assert cpu_threads.get_num_threads() == 2


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="platform: needs fork")
def test_a_fork_inside_a_region_keeps_the_child_consistent(three_threads):
    import os

    with cpu_threads.single_threaded_blas():
        pid = os.fork()
        if pid == 0:  # the child: still inside the region it inherited, then leaving it
            inside = cpu_threads._active_regions == 1 and cpu_threads.get_num_threads() == 1
            cpu_threads._leave_region()
            left = cpu_threads._active_regions == 0 and cpu_threads.get_num_threads() == 3
            os._exit(0 if inside and left else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert cpu_threads.get_num_threads() == 3
