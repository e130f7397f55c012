"""CPU attention over the host pool: both kernels against a naive reference.

The reference gathers each sequence's tokens slot by slot (kv_cache.slots_for), repeats the KV
heads as Hugging Face's repeat_kv does, and takes a float64 softmax: nothing shared with the
kernels but the layout.
"""
from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

from apex_mini import cpu_attention as ca
from apex_mini.cpu_worker import CPUAttentionWorker
from apex_mini.kv_cache import slots_for


def make_case(context_lens, num_heads, num_kv_heads, head_dim=16, block_size=16,
              dtype=torch.float32, seed=0, spare_blocks=5):
    """Random pool, scattered random block tables (unused columns point anywhere), random q."""
    g = torch.Generator().manual_seed(seed)
    num_seqs = len(context_lens)
    width = max(-(-n // block_size) for n in context_lens) + 1      # one column past the longest
    num_blocks = num_seqs * width + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[:num_seqs * width].view(num_seqs, width)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(context_lens), head_dim ** -0.5


def naive(q, k_cache, v_cache, tables, lens, scale):
    """[num_seqs, H, D] in float64, one sequence at a time."""
    num_seqs, H, D = q.shape
    block_size, KVH = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(num_seqs, H, D, dtype=torch.float64)
    for i in range(num_seqs):
        slots = torch.tensor(slots_for(tables[i].tolist(), 0, int(lens[i]), block_size))
        k = k_cache.view(-1, KVH, D)[slots].double().repeat_interleave(H // KVH, dim=1)  # [n, H, D]
        v = v_cache.view(-1, KVH, D)[slots].double().repeat_interleave(H // KVH, dim=1)
        probs = (torch.einsum("hd,nhd->hn", q[i].double(), k) * scale).softmax(-1)    # [H, n]
        out[i] = torch.einsum("hn,nhd->hd", probs, v)
    return out


def max_error(out, ref) -> float:
    return (out.double() - ref).abs().max().item()


# ------------------------------------------------------------------------------ eager

@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.integers(1, 100), min_size=1, max_size=6),
       heads=st.sampled_from([(4, 4), (4, 2), (8, 2), (4, 1)]),          # MHA, GQA 2:1, 4:1, MQA
       block_size=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**16))
def test_eager_matches_reference(lens, heads, block_size, seed):
    case = make_case(lens, *heads, block_size=block_size, seed=seed)
    assert max_error(ca.paged_decode_attention_eager(*case), naive(*case)) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_kv_is_accumulated_in_fp32(dtype, tol):
    """Output in the cache dtype, but no worse than rounding the fp64 result to that dtype:
    a half-precision accumulation over hundreds of tokens would be."""
    case = make_case([700, 333, 17], 8, 2, dtype=dtype, seed=3)
    out = ca.paged_decode_attention_eager(*case)
    ref = naive(*case)
    assert out.dtype == dtype
    rounding = (ref.to(dtype).double() - ref).abs().max().item()
    assert max_error(out, ref) <= max(2 * rounding, 1e-6) and max_error(out, ref) < tol


def test_unwritten_slots_past_the_context_are_ignored():
    """Block-table columns past a sequence's length may hold NaN (never written): no effect."""
    q, k_cache, v_cache, tables, lens, scale = make_case([5, 20], 4, 2, seed=1)
    ref = naive(q, k_cache, v_cache, tables, lens, scale)
    for i, n in enumerate(lens.tolist()):          # poison every slot after each sequence's end
        for t in range(n, tables.shape[1] * k_cache.shape[1]):
            block, offset = tables[i, t // k_cache.shape[1]], t % k_cache.shape[1]
            k_cache[block, offset] = float("nan")
            v_cache[block, offset] = float("nan")
    out = ca.paged_decode_attention_eager(q, k_cache, v_cache, tables, lens, scale)
    assert max_error(out, ref) < 1e-5


def test_eager_kernel_keeps_its_gather_buffers_per_thread():
    """The eager kernel gathers into buffers its thread keeps: a small call after a large one
    reuses them and sees none of the large call's data (its padding slots hold NaN in the pool
    and must still be zeroed), and another thread gets buffers of its own."""
    large = make_case([300, 200], 4, 2, seed=1)
    small = make_case([5, 40, 17], 4, 2, seed=2)
    for block, offset in ((small[3][0, 0].item(), 7), (small[3][2, 1].item(), 3)):
        small[1][block, offset] = small[2][block, offset] = float("nan")   # past seqs 0 and 2
    ca.paged_decode_attention_eager(*large)
    kept = ca._GATHER.k
    out = ca.paged_decode_attention_eager(*small)
    assert ca._GATHER.k is kept                       # reused, not reallocated
    assert max_error(out, naive(*small)) < 1e-5
    seen = []

    def attend():
        ca.paged_decode_attention_eager(*small)
        seen.append(ca._GATHER.k)
    other = threading.Thread(target=attend)
    other.start()
    other.join()
    assert seen[0] is not kept and seen[0].shape[0] < kept.shape[0]


def test_append_kv_writes_exactly_its_slots():
    q, k_cache, v_cache, tables, lens, scale = make_case([9, 31], 4, 2, seed=2)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    new_k, new_v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    slots = torch.tensor([slots_for(tables[i].tolist(), n, n + 1, 16)[0]
                          for i, n in enumerate(lens.tolist())])
    ca.append_kv(k_cache, v_cache, slots, new_k, new_v)
    flat_k, flat_v = k_cache.view(-1, 2, 16), v_cache.view(-1, 2, 16)
    assert torch.equal(flat_k[slots], new_k) and torch.equal(flat_v[slots], new_v)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat_k[untouched], before_k.view(-1, 2, 16)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(-1, 2, 16)[untouched])
    lens = lens + 1                                # the appended token is now attended to
    out = ca.paged_decode_attention_eager(q, k_cache, v_cache, tables, lens, scale)
    assert max_error(out, naive(q, k_cache, v_cache, tables, lens, scale)) < 1e-5


@pytest.mark.parametrize("bad", [-1, "num_blocks"])
@pytest.mark.parametrize("kernel", ["eager", "fused"])
def test_block_outside_the_pool_is_a_value_error(bad, kernel):
    """Checked once per call, before any load: the compiled kernel does not check its own."""
    q, k_cache, v_cache, tables, lens, scale = make_case([20, 5], 4, 2, seed=6)
    tables[0, 1] = k_cache.shape[0] if bad == "num_blocks" else bad
    fn = ca.paged_decode_attention_eager if kernel == "eager" else ca.paged_decode_attention_fused
    with pytest.raises(ValueError, match="outside the pool"):
        fn(q, k_cache, v_cache, tables, lens, scale)    # raises before compiling anything


@pytest.mark.parametrize("kernel", ["eager", pytest.param("fused", marks=pytest.mark.slow)])
def test_one_steps_tables_serve_every_layer(kernel):
    """DecodeTables built once, read by several layers' pools: each layer's output is exactly
    what a call that builds its own tables gives, and the tables are not changed by use."""
    q, k_cache, v_cache, tables, lens, scale = make_case([1, 16, 17, 100, 333], 8, 2, seed=12)
    attend = ca.attend_eager if kernel == "eager" else ca.attend_fused
    per_call = (ca.paged_decode_attention_eager if kernel == "eager"
                else ca.paged_decode_attention_fused)
    step = ca.DecodeTables(tables, lens, k_cache)
    table_before = step.table.clone()
    for layer in range(3):
        g = torch.Generator().manual_seed(layer)
        k_layer, v_layer = (torch.randn(k_cache.shape, generator=g) for _ in range(2))
        out = attend(q, k_layer, v_layer, step, scale)
        assert torch.equal(out, per_call(q, k_layer, v_layer, tables, lens, scale))
        assert max_error(out, naive(q, k_layer, v_layer, tables, lens, scale)) < 1e-5
    assert torch.equal(step.table, table_before)


def test_empty_batch():
    q, k_cache, v_cache, tables, lens, scale = make_case([3], 4, 2)
    out = ca.paged_decode_attention(q[:0], k_cache, v_cache, tables[:0], lens[:0], scale,
                                    compiled=False)
    assert out.shape == (0, 4, 16)


# ------------------------------------------------------------------------------ compiled

COMPILED_CASES = [          # (lengths, heads, kv heads, dtype, tolerance): one compile per layout
    ([1, 16, 17, 100, 333], 8, 2, torch.float32, 1e-5),
    ([2, 49, 130], 8, 2, torch.float32, 1e-5),                # same layout: reuses the graph
    ([7, 200, 64, 1], 4, 4, torch.float32, 1e-5),             # MHA
    ([300, 45, 3], 8, 2, torch.bfloat16, 2e-2),
]


@pytest.mark.slow
@pytest.mark.parametrize("lens,heads,kv_heads,dtype,tol", COMPILED_CASES)
def test_compiled_matches_reference(lens, heads, kv_heads, dtype, tol):
    case = make_case(lens, heads, kv_heads, dtype=dtype, seed=len(lens))
    out = ca.paged_decode_attention_fused(*case)
    assert out.dtype == dtype and out.shape == case[0].shape
    assert max_error(out, naive(*case)) < tol


@pytest.mark.slow
def test_compiled_is_the_default_unless_disabled(monkeypatch):
    """paged_decode_attention(compiled=True) runs the fused kernel; the environment variable
    forces eager (bit-identical to calling eager directly)."""
    case = make_case([40, 9], 8, 2, seed=5)
    monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", "1")
    assert torch.equal(ca.paged_decode_attention(*case, compiled=True),
                       ca.paged_decode_attention_eager(*case))
    monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", "0")
    assert torch.equal(ca.paged_decode_attention(*case, compiled=True),
                       ca.paged_decode_attention_fused(*case))


def python_pace(seconds: float) -> float:
    """Iterations per second of a plain Python loop on this thread: how freely it runs."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += 1
    return n / seconds


@pytest.mark.slow
def test_the_main_thread_runs_python_while_the_worker_is_in_the_compiled_kernel():
    """In the engine the main thread launches device work while the worker attends; it needs
    the GIL for that. Inductor's default Python wrapper runs the generated C++ loops holding
    the GIL: the main thread then kept 7% of its pace in this test, against 118% with the
    kernel compiled with Inductor's C++ wrapper, which releases it (measured 2026-12-03)."""
    case = make_case([25_000] * 16, 8, 2, seed=11)             # ~100 MB of KV per call
    stop, started = threading.Event(), threading.Event()

    def attend_until_stopped():
        started.set()
        while not stop.is_set():
            ca.paged_decode_attention_fused(*case)
    # Hand the GIL over every 0.1 ms, not 5: between two of the worker's C++ calls, the main
    # thread then holds it only briefly, and what it gets inside them is what is measured.
    interval = sys.getswitchinterval()
    with CPUAttentionWorker(1, intra_op_threads=1) as worker:
        worker.submit(ca.paged_decode_attention_fused, *case).result()   # compiles
        idle = python_pace(0.3)
        job = worker.submit(attend_until_stopped)
        started.wait()
        sys.setswitchinterval(1e-4)
        try:
            busy = python_pace(0.3)
        finally:
            sys.setswitchinterval(interval)
            stop.set()
        job.result()
    assert busy > 0.5 * idle


@pytest.mark.slow
def test_precompile_leaves_nothing_to_compile(monkeypatch):
    """After `precompile` on the worker, with the pool's own tensors, no batch size or context
    length compiles again (each graph costs seconds in a serving run's first iterations)."""
    from torch._dynamo.utils import counters
    monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", "0")
    q, k_cache, v_cache, _, _, scale = make_case([1], 6, 3, head_dim=8, spare_blocks=4000)
    with CPUAttentionWorker(1) as worker:
        worker.submit(ca.precompile, k_cache, v_cache, 6).result()
        graphs = counters["stats"]["unique_graphs"]
        for lens in ([3], [40, 7, 300], [1], [5000], [2100, 9, 600, 70]):
            case = make_case(lens, 6, 3, head_dim=8, seed=len(lens), spare_blocks=0)
            pool = (k_cache[:len(case[1])].copy_(case[1]), v_cache[:len(case[2])].copy_(case[2]))
            out = worker.run_decode(case[0], *pool, *case[3:])
            assert max_error(out, naive(case[0], *pool, *case[3:])) < 1e-5
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("lo,hi", [(1, None), (1, 100), (200, 4096), (129, 129), (128, 5000),
                                   (4097, 9000), (5000, None)])
def test_precompile_contexts_are_one_per_graph_the_range_needs(block_size, lo, hi):
    """`precompile` compiles each context-length graph (CONTEXT_GRAPHS) that serves some
    context in [lo, hi], at that graph's shortest length, and no other."""
    super_len = ca.SUPERBLOCK * block_size

    def graph(context: int) -> int:                  # which graph a context's steps run
        supers = -(-context // super_len)
        return next(i for i, (_, longest) in enumerate(ca.CONTEXT_GRAPHS)
                    if longest is None or supers <= longest)

    got = ca.precompile_contexts(block_size, lo, hi)
    top = hi if hi is not None else max(lo, 40 * super_len)
    assert [graph(c) for c in got] == sorted({graph(c) for c in range(lo, top + 1)})
    for c in got:                                     # each at its graph's shortest length
        assert graph(c) != graph(c - 1) or c == 1
    assert ca.precompile_contexts(16) == [1, 129, 4097]
    assert ca.precompile_contexts(16, 200, 4096) == [129]


@pytest.mark.parametrize("version,may_end", [
    ("2.13.0+cpu", True), ("2.12.1", True), ("2.11.0+cu130", False), ("2.9.1", False),
    ("3.0.0", True),
])
def test_threads_that_compiled_may_end_from_torch_2_12(monkeypatch, version, may_end):
    """torch 2.11 crashes when a thread compiles after another thread that compiled has ended;
    below 2.12 the workers' threads are kept (test_cpu_worker.py)."""
    monkeypatch.setattr(ca.torch, "__version__", version)
    assert ca.compiling_threads_may_end() is may_end


@pytest.mark.parametrize("version", ["2.13.0", "2.11.0+cu130"])
@pytest.mark.parametrize("flag,compiled", [(None, True), ("0", True), ("1", False)])
def test_only_the_variable_turns_compiling_off(monkeypatch, version, flag, compiled):
    monkeypatch.setattr(ca.torch, "__version__", version)
    if flag is None:
        monkeypatch.delenv("APEX_MINI_EAGER_CPU_ATTENTION", raising=False)
    else:
        monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", flag)
    assert ca.compile_enabled() is compiled


def test_runs_compiled_says_which_kernel_attend_runs(monkeypatch):
    monkeypatch.setattr(ca, "_COMPILED", ca._Compiled())
    monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", "0")
    assert ca.runs_compiled() and not ca.runs_compiled(compiled=False)
    assert (ca.host_kernel(), ca.host_kernel(compiled=False)) == ("compiled", "eager")
    monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", "1")
    assert not ca.runs_compiled() and ca.host_kernel() == "eager"
    monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", "0")
    ca._COMPILED.mark_failed()
    assert not ca.runs_compiled() and ca.host_kernel() == "eager"


def test_compile_failure_falls_back_to_eager_once(monkeypatch):
    case = make_case([12, 30], 4, 2, seed=6)
    monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", "0")
    monkeypatch.setattr(ca, "_COMPILED", ca._Compiled())

    def broken():
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(ca._COMPILED, "get", broken)
    with pytest.warns(RuntimeWarning,
                      match="CPU attention: torch.compile failed .*running it eagerly from now on"):
        out = ca.paged_decode_attention(*case, compiled=True)
    assert torch.equal(out, ca.paged_decode_attention_eager(*case))
    assert ca._COMPILED.failed
