"""The CPU attention worker: a small pool of threads that runs host-tier work (K/V appends and
paged decode attention, `cpu_attention.py`) while the main thread goes on launching device
work. Torch ops let go of the GIL while they run, so the two proceed at once; an exception in
a task comes back to the caller through its future, and nothing waits forever.

`CPUAttentionWorker.submit(fn, *args)` runs any task; `decode_async` splits one decode call by
request over the threads, balanced by KV tokens (`split_by_tokens`). The engine submits each
layer's host work as one task (`runner.py`; two at a time only when pipelining), which the
kernel spreads over its thread's torch threads, so one worker thread with every torch thread but
the main thread's is its default.

On torch before 2.12 a thread that compiles the kernel after another compiling thread has ended
crashes the process (`cpu_attention.THREADS_MAY_END_TORCH`). There the workers' threads never
end: workers of the same shape share one process-wide pool (`shared_pool`), and close() only
stops the worker, so every thread that ever compiled is still alive when the next one compiles.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from .cpu_attention import compiling_threads_may_end, paged_decode_attention


def _init_thread(intra_op_threads: int, cuda_device: torch.device | None) -> None:
    """A worker thread's torch thread count (per calling thread under OpenMP; set only when it
    changes something, because it also becomes the default for threads started later) and, for
    an engine on a GPU, its current CUDA device (per thread too; else pinning a result would
    start a CUDA context on cuda:0 for an engine on cuda:1)."""
    if torch.get_num_threads() != intra_op_threads:
        torch.set_num_threads(intra_op_threads)
    if cuda_device is not None:
        torch.cuda.set_device(cuda_device)


def split_by_tokens(context_lens: torch.Tensor, parts: int) -> list[tuple[int, int]]:
    """Cut the sequences into <= `parts` contiguous [start, end) runs of about equal KV tokens."""
    lens = context_lens.tolist()
    total, acc, bounds = sum(lens), 0, [0]
    for i, n in enumerate(lens):
        acc += n
        if len(bounds) < parts and acc * parts >= total * len(bounds) and i + 1 < len(lens):
            bounds.append(i + 1)
    bounds.append(len(lens))
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


_SHARED_POOLS: dict[tuple[int, int, torch.device | None], tuple[ThreadPoolExecutor, str]] = {}
_SHARED_POOLS_LOCK = threading.Lock()


def shared_pool(num_threads: int, intra_op_threads: int,
                cuda_device: torch.device | None) -> tuple[ThreadPoolExecutor, str]:
    """The process-wide pool of this shape and its threads' name prefix, made on first use and
    never shut down."""
    key = (num_threads, intra_op_threads, cuda_device)
    with _SHARED_POOLS_LOCK:
        if key not in _SHARED_POOLS:
            name = f"apex-cpu-attn-shared-{len(_SHARED_POOLS) + 1}"
            _SHARED_POOLS[key] = (ThreadPoolExecutor(num_threads, name, _init_thread,
                                                     (intra_op_threads, cuda_device)), name)
        return _SHARED_POOLS[key]


class DecodeHandle:
    """Future-like handle over the parts of one split decode; result() returns the whole output."""

    def __init__(self, futures: list[Future], out: torch.Tensor):
        self._futures, self._out = futures, out

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def result(self, timeout: float | None = None) -> torch.Tensor:
        """Wait for every part; the first part that raised re-raises here."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for f in self._futures:
            f.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._out


class CPUAttentionWorker:
    """A small pool of threads running host attention while the main thread launches GPU work.

    Invariants: submit() returns at once; a task's exception is re-raised by its handle's
    result() in the caller, and the worker stays usable afterwards; tasks run under
    torch.inference_mode(); on a pool of several threads, tasks may run concurrently and in any
    order (wait for an append_kv's handle before attending over what it wrote); drain() waits
    for every task handed over so far (a caller whose step failed calls it before the blocks
    those tasks write are freed); close() lets queued tasks finish and joins the worker's threads,
    which also end when an unclosed worker is garbage-collected (not so with shared threads).

    `device` is the engine's: on a GPU each thread makes it its current CUDA device.

    `shared_threads` (default: on torch before 2.12, see the module docstring) takes the threads
    from the process-wide pool of this shape instead: they outlive the worker, and a worker that
    another shares them with may queue tasks among this one's (each worker's drain() still waits
    for its own tasks only).

    Torch ops inside a task use `intra_op_threads` OpenMP threads each. The default leaves one
    thread's worth to the main thread and divides the rest among the workers: (torch threads -
    1) // num_threads, at least 1. On the 2-core machine of docs/benchmarks.md, a worker whose
    ops had used both cores (its own OpenMP team beside the main thread's) left the main
    thread's small ops 4-5x slower for as long as the worker lived (prefill attention of 16
    tokens: 58 us before the worker's first task, 303 us after, 213 us a second later; 44 us
    with a one-thread worker).
    """

    _count = 0  # instances made, to give each one's threads a distinct name

    def __init__(self, num_threads: int = 1, intra_op_threads: int | None = None,
                 device: torch.device | str | None = None, shared_threads: bool | None = None):
        if num_threads < 1:
            raise ValueError(f"num_threads={num_threads} must be at least 1")
        CPUAttentionWorker._count += 1
        self.num_threads = num_threads
        self.intra_op_threads = intra_op_threads or max(1, (torch.get_num_threads() - 1) // num_threads)
        self.shared_threads = (not compiling_threads_may_end() if shared_threads is None
                               else shared_threads)
        device = torch.device(device) if device is not None else None
        cuda_device = device if device is not None and device.type == "cuda" else None
        if self.shared_threads:
            self._pool, self.thread_name_prefix = shared_pool(num_threads, self.intra_op_threads,
                                                              cuda_device)
        else:
            # The initializer must not hold `self`: the pool's threads would then keep the
            # worker, and so the pool, alive forever, and an unclosed worker's threads would
            # never end.
            self.thread_name_prefix = f"apex-cpu-attn-{CPUAttentionWorker._count}"
            self._pool = ThreadPoolExecutor(num_threads, self.thread_name_prefix, _init_thread,
                                            (self.intra_op_threads, cuda_device))
        self._closed = False
        self._pending: set[Future] = set()
        self._pending_lock = threading.Lock()

    @staticmethod
    def _call(fn, args, kwargs):
        with torch.inference_mode():
            return fn(*args, **kwargs)

    def submit(self, fn, *args, **kwargs) -> Future:
        """Run fn(*args, **kwargs) on a worker thread; .result(timeout) returns or re-raises."""
        if self._closed:
            raise RuntimeError("the CPU attention worker is closed (close() was called); "
                               "build a new engine")
        future = self._pool.submit(self._call, fn, args, kwargs)
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    def drain(self) -> None:
        """Wait until every task handed over so far has ended (their results and exceptions
        stay with their futures)."""
        with self._pending_lock:
            pending = list(self._pending)
        wait(pending)

    def decode_async(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     compiled: bool = True) -> DecodeHandle:
        """paged_decode_attention split by request over the threads, balanced by KV tokens."""
        out = torch.empty_like(q)                                      # [num_seqs, num_heads, head_dim]

        def part(a: int, b: int) -> None:
            out[a:b] = paged_decode_attention(q[a:b], k_cache, v_cache, block_tables[a:b],
                                              context_lens[a:b], scale, compiled)
        futures = [self.submit(part, a, b)
                   for a, b in split_by_tokens(context_lens, self.num_threads)]
        return DecodeHandle(futures, out)

    def run_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                   compiled: bool = True) -> torch.Tensor:
        """decode_async(...).result(): [num_seqs, num_heads, head_dim] in q's dtype."""
        return self.decode_async(q, k_cache, v_cache, block_tables, context_lens, scale,
                                 compiled).result()

    def close(self) -> None:
        """Finish queued tasks and join the threads (with shared threads: wait for this
        worker's own tasks; the threads live on). Idempotent."""
        self._closed = True
        if self.shared_threads:
            self.drain()
        else:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "CPUAttentionWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
