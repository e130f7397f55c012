"""The CPU attention worker: split decodes equal one call, tasks run off the main thread in
inference mode, a failing task raises in the caller promptly, and the threads end (or, shared on
torch before 2.12, live on)."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, strategies as st

from apex_mini import cpu_attention as ca
from apex_mini import cpu_worker
from apex_mini.cpu_worker import CPUAttentionWorker, split_by_tokens
from test_cpu_attention import make_case


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_decode_equals_one_call(threads):
    case = make_case([400, 3, 3, 3, 250, 90, 17], 8, 2, seed=7)
    with CPUAttentionWorker(threads) as worker:
        out = worker.run_decode(*case, compiled=False)
    # Not bit-identical: each part trims its tables to its own longest request, which changes
    # the reductions' blocking, not the math.
    torch.testing.assert_close(out, ca.paged_decode_attention_eager(*case), rtol=0, atol=1e-6)


@given(lens=st.lists(st.integers(1, 5000), min_size=1, max_size=40), parts=st.integers(1, 8))
def test_split_by_tokens_covers_every_sequence_once(lens, parts):
    runs = split_by_tokens(torch.tensor(lens), parts)
    assert 1 <= len(runs) <= parts
    assert [i for a, b in runs for i in range(a, b)] == list(range(len(lens)))


def test_worker_runs_off_the_main_thread():
    with CPUAttentionWorker(2) as worker:
        names = {worker.submit(lambda: threading.current_thread().name).result() for _ in range(4)}
    assert threading.current_thread().name not in names
    assert all(n.startswith(worker.thread_name_prefix) for n in names)


def test_failing_worker_raises_in_the_caller_within_a_second():
    """A bad block table (too few columns for the lengths) fails inside the worker thread; the
    caller gets that exception itself (the kernel's ValueError naming the columns, not some
    other error from the handle), promptly, and the worker keeps working."""
    q, k_cache, v_cache, tables, lens, scale = make_case([40, 40], 4, 2)
    with CPUAttentionWorker(2) as worker:
        start = time.monotonic()
        handle = worker.decode_async(q, k_cache, v_cache, tables[:, :1], lens, scale,
                                     compiled=False)
        with pytest.raises(ValueError, match="block tables have 1 columns but a context of 40 "
                                             "tokens needs 3 blocks of 16"):
            handle.result(timeout=1.0)
        assert time.monotonic() - start < 1.0
        assert worker.submit(lambda: 7).result(timeout=1.0) == 7


def test_worker_exception_type_reaches_the_caller():
    with CPUAttentionWorker(1) as worker:
        def broken():
            raise ValueError("from the worker")
        with pytest.raises(ValueError, match="from the worker"):
            worker.submit(broken).result(timeout=1.0)


def test_worker_tasks_run_in_inference_mode():
    with CPUAttentionWorker(1) as worker:
        assert worker.submit(torch.is_inference_mode_enabled).result(timeout=1.0)


def test_drain_waits_for_every_task_handed_over():
    ended = []
    with CPUAttentionWorker(2) as worker:
        for i in range(4):
            worker.submit(lambda i=i: time.sleep(0.1) or ended.append(i))
        worker.submit(lambda: 1 / 0)                  # a failed task counts as ended too
        worker.drain()
        assert sorted(ended) == [0, 1, 2, 3]


def test_a_closed_worker_says_so():
    worker = CPUAttentionWorker(1)
    worker.close()
    worker.close()                                    # idempotent
    with pytest.raises(RuntimeError, match="worker is closed"):
        worker.submit(lambda: 7)


def test_an_unclosed_worker_ends_its_threads_when_collected():
    """Nothing else holds a worker's pool: dropped without close(), its threads still end."""
    import gc
    worker = CPUAttentionWorker(2, shared_threads=False)
    prefix = worker.thread_name_prefix
    assert worker.submit(lambda: 7).result(timeout=1.0) == 7

    def alive():
        return [t for t in threading.enumerate() if t.name.startswith(prefix)]
    assert alive()
    del worker
    gc.collect()
    deadline = time.monotonic() + 5.0
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()


def threads_named(prefix: str) -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith(prefix)}


def test_shared_threads_outlive_their_workers_and_serve_the_next():
    """Torch before 2.12 crashes compiling on a thread after a compiling thread ended; there
    workers of one shape share threads that never end. A closed worker refuses tasks, waits for
    its own first, and leaves the threads serving the others."""
    first = CPUAttentionWorker(2, intra_op_threads=1, shared_threads=True)
    second = CPUAttentionWorker(2, intra_op_threads=1, shared_threads=True)
    other_shape = CPUAttentionWorker(1, intra_op_threads=1, shared_threads=True)
    assert first.thread_name_prefix == second.thread_name_prefix != other_shape.thread_name_prefix
    slow_ended = threading.Event()
    first.submit(lambda: time.sleep(0.3) or slow_ended.set())
    start = time.monotonic()
    assert second.submit(lambda: 7).result(timeout=1.0) == 7       # on the other thread
    second.drain()                                    # its own tasks only: not the slow one
    assert time.monotonic() - start < 0.25 and not slow_ended.is_set()
    names = threads_named(first.thread_name_prefix)
    assert len(names) == 2
    first.close()
    assert slow_ended.is_set()                        # close() waited for first's task
    with pytest.raises(RuntimeError, match="worker is closed"):
        first.submit(lambda: 7)
    del first
    import gc
    gc.collect()
    assert threads_named(second.thread_name_prefix) == names
    assert second.submit(lambda: threading.current_thread().name).result(timeout=1.0) in names
    for worker in (second, other_shape):
        worker.close()
    assert threads_named(second.thread_name_prefix) == names
    again = CPUAttentionWorker(2, intra_op_threads=1, shared_threads=True)
    assert again.submit(lambda: threading.current_thread().name).result(timeout=1.0) in names
    again.close()


@pytest.mark.parametrize("safe", [True, False])
def test_threads_are_shared_by_default_only_where_torch_needs_it(monkeypatch, safe):
    monkeypatch.setattr(cpu_worker, "compiling_threads_may_end", lambda: safe)
    with CPUAttentionWorker(1) as worker:
        assert worker.shared_threads is not safe


def test_worker_rejects_zero_threads():
    with pytest.raises(ValueError, match="at least 1"):
        CPUAttentionWorker(0)
