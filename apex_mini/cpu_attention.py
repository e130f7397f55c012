"""Paged decode attention over the host KV pool (the worker threads that run it are in
`cpu_worker.py`).

Host-resident requests keep their KV in the CPU pool; every decode step reads all of it once
and does little arithmetic per byte, so this kernel is bound by memory bandwidth and its figure
of merit is KV bytes read per second (`python -m apex_mini.bench kernels`).

Layout (one layer): k_cache, v_cache are [num_blocks, block_size, num_kv_heads, head_dim];
token t of a sequence lives at (block_table[t // block_size], t % block_size). GQA follows
Hugging Face's repeat_kv: query head h reads kv head h // (num_heads // num_kv_heads).

Two formulations of the same math (fp32 accumulation, output in q's dtype):
- eager: gather each sequence's blocks into a contiguous copy (in buffers each thread keeps,
  `kv_cache.GatherBuffers`), then PyTorch's own attention kernel
  (`scaled_dot_product_attention`), as the device's decode step does. Plain, but the gather
  writes (and re-reads) a copy of the KV, so it moves ~3x the bytes it must.
- fused: broadcast-multiply-and-sum, compiled by Inductor, which turns `k_cache[blocks]` into
  indirect loads inside its reduction loops: each KV byte is read once, nothing is copied.

Entry points: `attend(q, k_cache, v_cache, tables, scale)` per layer, with the step's
`DecodeTables` (block tables checked and laid out once per step, as the runner does);
`paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)` builds them
for a single call. `attend_eager`/`attend_fused` and their `paged_decode_attention_*` twins pick
one formulation.
"""
from __future__ import annotations

import functools
import os
import threading

import torch
import torch.nn.functional as F

from .compile_fallback import compiled_or_eager
from .kv_cache import GatherBuffers, gather_blocks

# Blocks per partial sum in the fused value reduction. Summing a superblock's tokens first
# keeps its V (8 blocks) in cache while every query head of a KV group reuses it; the partial
# sums cost 1/16 of the V bytes.
SUPERBLOCK = 8


# torch 2.11 crashes (a segmentation fault inside Dynamo) when a thread traces a compiled
# function after another thread that traced it has ended; 2.12 and 2.13 do not. Older releases
# are not checked and are treated alike: there the workers' threads never end (cpu_worker.py),
# so the kernel compiles on every release.
THREADS_MAY_END_TORCH = (2, 12)


def compiling_threads_may_end() -> bool:
    """Whether a thread that compiled the kernel may end without crashing the next compile on
    another thread: torch >= THREADS_MAY_END_TORCH (see above)."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= THREADS_MAY_END_TORCH


def compile_enabled() -> bool:
    """False when APEX_MINI_EAGER_CPU_ATTENTION=1: tests use it to skip compile time."""
    return os.environ.get("APEX_MINI_EAGER_CPU_ATTENTION") != "1"


def append_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k, v [num_tokens, num_kv_heads, head_dim] to flat slots block * block_size + offset."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    slots = slot_mapping.to(torch.long)                                # [num_tokens]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def _used_blocks(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                 num_blocks: int) -> torch.Tensor:
    """The block-table columns the longest sequence needs: [num_seqs, cols] int64.

    Work scales with num_seqs * max_len, so trailing unused columns are dropped first. The
    tables live on the host, so reading the max length costs no device sync. Every used entry
    must name one of the pool's `num_blocks` blocks (checked here, once per step, so that the
    compiled kernel can skip its own per-element bounds checks).
    """
    max_len = int(context_lens.max()) if context_lens.numel() else 0
    cols = -(-max_len // block_size)
    if block_tables.shape[1] < cols:
        raise ValueError(f"block tables have {block_tables.shape[1]} columns but a context of "
                         f"{max_len} tokens needs {cols} blocks of {block_size}")
    table = block_tables[:, :cols].to(torch.long)                     # [num_seqs, cols]
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= num_blocks):
        raise ValueError(f"block tables name blocks {int(table.min())}..{int(table.max())}, "
                         f"outside the pool's 0..{num_blocks - 1}")
    return table


class DecodeTables:
    """One decode step's block tables, checked and laid out for the kernels once, then read by
    every layer: all of a model's layer pools share one layout, so one step's tables serve
    them all (vLLM's attention metadata plays the same part).

    Built per layer instead, these small tensor ops (the range check, the padding, fresh copies
    for Dynamo, the eager mask) made a layer's host work (append + attention) 1.1x to 1.3x as
    long for the shipped model's heads with 8 sequences of 200 tokens (docs/benchmarks.md).

    `context_lens` [num_seqs] counts each sequence's tokens, this step's included; `k_cache`
    (any layer's) gives the pool's block count and block size. The layouts each kernel reads
    are built on first use (concurrent first uses would build the same tensors twice,
    harmlessly).
    """

    def __init__(self, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 k_cache: torch.Tensor):
        num_blocks, self.block_size = k_cache.shape[:2]
        self.table = _used_blocks(block_tables, context_lens, self.block_size, num_blocks)  # [num_seqs, cols]
        # Fresh tensors for the ints: views at other storage offsets (tables cut from one
        # packed tensor) would each cost the compiled kernel a recompile.
        self.context_lens = context_lens.to(torch.long, copy=True)     # [num_seqs]
        self.num_seqs, cols = self.table.shape
        self.max_len = cols * self.block_size

    @functools.cached_property
    def superblocks(self) -> torch.Tensor:
        """The fused kernel's: [num_seqs, num_super, SUPERBLOCK], padded with block 0 (masked)."""
        cols = self.table.shape[1]
        padded = self.table.new_zeros(self.num_seqs, -(-cols // SUPERBLOCK) * SUPERBLOCK)
        padded[:, :cols] = self.table
        blocks = padded.view(self.num_seqs, -1, SUPERBLOCK)
        # Batch size and length vary every step: dynamic, so that they share one graph.
        torch._dynamo.maybe_mark_dynamic(blocks, 0)
        torch._dynamo.maybe_mark_dynamic(blocks, 1)
        torch._dynamo.maybe_mark_dynamic(self.context_lens, 0)
        return blocks

    @functools.cached_property
    def valid(self) -> torch.Tensor:
        """The eager kernel's mask: [num_seqs, max_len], True where a token is in the context."""
        return torch.arange(self.max_len) < self.context_lens[:, None]

    @functools.cached_property
    def padding(self) -> torch.Tensor:
        """Flat indices of the gathered rows past each context: [n], usually few."""
        return (~self.valid).flatten().nonzero().squeeze(1)


# ------------------------------------------------------------------------------------ eager

_GATHER = GatherBuffers()      # per thread: workers attend concurrently


def attend_eager(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tables: DecodeTables, scale: float) -> torch.Tensor:
    """q [num_seqs, num_heads, head_dim] -> [num_seqs, num_heads, head_dim]. context_lens >= 1."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_seqs == 0:
        return torch.empty_like(q)
    group = num_heads // num_kv_heads
    max_len = tables.max_len
    # Gathered copies, into this thread's kept buffers, padding zeroed: a slot never written
    # may hold NaN, which a -inf mask does not remove (NaN + -inf is NaN, and 0 * NaN is NaN).
    flat = tables.table.flatten()                                     # [num_seqs * max_blocks]
    k_out, v_out = _GATHER.take(k_cache, len(flat))
    pad = tables.padding
    k = gather_blocks(k_cache, flat, k_out).view(-1, num_kv_heads, head_dim).index_fill_(0, pad, 0)
    v = gather_blocks(v_cache, flat, v_out).view(-1, num_kv_heads, head_dim).index_fill_(0, pad, 0)
    k = k.view(num_seqs, max_len, num_kv_heads, head_dim)
    v = v.view(num_seqs, max_len, num_kv_heads, head_dim)
    # The `group` query heads that share a KV head act as `group` query positions of that head,
    # so GQA needs no repeated K/V. PyTorch's CPU kernel accumulates fp16/bf16 in fp32.
    out = F.scaled_dot_product_attention(
        q.view(num_seqs, num_kv_heads, group, head_dim),
        k.transpose(1, 2), v.transpose(1, 2),                          # [num_seqs, kv_heads, max_len, head_dim]
        attn_mask=tables.valid[:, None, None, :], scale=scale)         # [num_seqs, kv_heads, group, head_dim]
    return out.reshape(num_seqs, num_heads, head_dim)


def paged_decode_attention_eager(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                                 scale: float) -> torch.Tensor:
    """attend_eager with the tables built here (q [num_seqs, num_heads, head_dim],
    block_tables [num_seqs, width], context_lens [num_seqs] >= 1)."""
    return attend_eager(q, k_cache, v_cache, DecodeTables(block_tables, context_lens, k_cache),
                        scale)


# ------------------------------------------------------------------------------------ fused

def _fused_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  blocks: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """Compiled body. q is fp32 and pre-scaled; blocks is [num_seqs, num_super, SUPERBLOCK].

    Written only with broadcasts, reductions and indexing so Inductor emits a few fused loop
    nests. Run eagerly it would materialise [num_seqs, max_len, num_heads, head_dim] products.
    """
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_super = blocks.shape[1]
    super_len = SUPERBLOCK * block_size
    max_len = num_super * super_len

    # Scores: for each token row of K (all kv heads, contiguous in the pool), the `group`
    # query heads of each kv head take their dot products while the row is in L1.
    k = k_cache[blocks].view(num_seqs, max_len, num_kv_heads, 1, head_dim)   # indirect loads
    qg = q.view(num_seqs, 1, num_kv_heads, group, head_dim)
    scores = (qg * k.float()).sum(-1)                                 # [num_seqs, max_len, kv_heads, group]
    valid = (torch.arange(max_len) < context_lens[:, None]).view(num_seqs, max_len, 1, 1)
    probs = scores.masked_fill(~valid, float("-inf")).softmax(dim=1)  # [num_seqs, max_len, kv_heads, group]

    # Values: sum within each superblock, then across them (see SUPERBLOCK).
    v = v_cache[blocks].view(num_seqs, num_super, super_len, num_kv_heads, 1, head_dim)
    probs = probs.view(num_seqs, num_super, super_len, num_kv_heads, group, 1)
    valid = valid.view(num_seqs, num_super, super_len, 1, 1, 1)
    # where, not probs * v: 0 * NaN from a never-written slot would poison the sum.
    weighted = torch.where(valid, probs * v.float(), 0.0)
    partial = weighted.sum(2)                                         # [num_seqs, num_super, kv_heads, group, head_dim]
    return partial.sum(1).view(num_seqs, num_heads, head_dim)         # [num_seqs, num_heads, head_dim]


class _Compiled:
    """The compiled kernel, built on first use. One per process; safe to call from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._fn = None
        self.failed = False

    def get(self):
        # Each (dtype, head layout) and the size-1 batch get their own graph; tests and
        # benchmarks sweep several, so allow more than Dynamo's default of 8 before it gives up
        # and runs _fused_decode eagerly (which would be slow and huge). Dynamo's config is
        # per thread, and every worker thread calls this, so each one raises its own limit.
        dyn = torch._dynamo.config
        # (Older torch releases call it cache_size_limit.)
        name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
        if getattr(dyn, name) < 64:
            setattr(dyn, name, 64)
        with self._lock:
            if self._fn is None:
                # _used_blocks has checked every block index, so the generated loops need not
                # check each load again (~10-20% of the kernel's time on the benchmark machine).
                # cpp_wrapper: the graph runs from C++, which lets go of the GIL. Inductor's
                # default Python wrapper calls its C++ loops holding it: while the kernel ran,
                # the main thread could run no Python, so launch no device work (see
                # test_the_main_thread_runs_python_while_the_worker_is_in_the_compiled_kernel).
                self._fn = torch.compile(_fused_decode,
                                         options={"assert_indirect_indexing": False,
                                                  "cpp_wrapper": True})
            return self._fn

    def mark_failed(self) -> None:
        self.failed = True


_COMPILED = _Compiled()


def attend_fused(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tables: DecodeTables, scale: float) -> torch.Tensor:
    """The compiled path; raises if compilation fails (`attend` falls back)."""
    if tables.num_seqs == 0:
        return torch.empty_like(q)
    qs = q.float() * scale                                            # scale folded here: no float guard
    # Pool sizes differ between engines: dynamic too (the tables' sizes are marked already).
    torch._dynamo.maybe_mark_dynamic(k_cache, 0)
    torch._dynamo.maybe_mark_dynamic(v_cache, 0)
    torch._dynamo.maybe_mark_dynamic(qs, 0)
    out = _COMPILED.get()(qs, k_cache, v_cache, tables.superblocks, tables.context_lens)
    return out.to(q.dtype)                                            # [num_seqs, num_heads, head_dim]


def paged_decode_attention_fused(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                                 scale: float) -> torch.Tensor:
    """attend_fused with the tables built here (shapes as paged_decode_attention_eager)."""
    return attend_fused(q, k_cache, v_cache, DecodeTables(block_tables, context_lens, k_cache),
                        scale)


# The fused kernel's graphs by context length, in superblocks: (the length each is compiled at,
# the longest it serves; None: no limit). Dynamo gives a size of 1 a graph of its own, and
# Inductor's code for the superblock sums differs past 32 superblocks (torch 2.13).
CONTEXT_GRAPHS = ((1, 1), (2, 32), (33, None))


def precompile_contexts(block_size: int, min_context: int = 1,
                        max_context: int | None = None) -> list[int]:
    """The context lengths `precompile` compiles at: one per graph that serves some length in
    [min_context, max_context] (None: no limit)."""
    super_len = SUPERBLOCK * block_size
    contexts = []
    for supers, longest in CONTEXT_GRAPHS:
        shortest = (supers - 1) * super_len + 1
        if max_context is not None and shortest > max_context:
            break
        if longest is None or longest * super_len >= min_context:
            contexts.append(shortest)
    return contexts


def precompile(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
               max_context: int | None = None, min_context: int = 1) -> None:
    """Compile the fused kernel now, for every graph serving will ask for, so that the first
    host decodes do not stall while it compiles (seconds per graph on a small machine).

    Dynamo gives a size of 1 a graph of its own (one sequence or several), and the context
    lengths take up to three (`CONTEXT_GRAPHS`): up to six graphs per dtype and head layout,
    for 1 and 2 sequences, those serving no context in [min_context, max_context] tokens left
    out. Its guards also cover the calling thread's torch thread count and whether a tensor
    was made in inference mode, so call this where the engine attends
    (`worker.submit(precompile, ...)`) with the pool's own tensors (read, not written). A no-op
    when compiling is off.

    The order matters too: Inductor shares as many outer loops among the threads as the sizes
    it compiles at need to fill them. The several-sequence graph, compiled here at 2 sequences,
    shares the sequences and the next loop (`collapse(2)`) on a worker of more than 2 torch
    threads, so a step with few host sequences keeps every thread busy; compiled first at 32
    sequences on 16 threads, it would share the sequences only (docs/benchmarks.md, "Few
    sequences, many threads")."""
    if not compile_enabled() or _COMPILED.failed:
        return
    num_blocks, block_size, _, head_dim = k_cache.shape
    with torch.inference_mode():                                      # as the runner's queries
        for num_seqs in (1, 2):
            for context in precompile_contexts(block_size, min_context, max_context):
                width = -(-context // block_size)
                tables = torch.arange(num_seqs * width).view(num_seqs, width) % num_blocks
                q = torch.zeros(num_seqs, num_heads, head_dim, dtype=k_cache.dtype)
                lens = torch.full((num_seqs,), context)
                paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)


def runs_compiled(compiled: bool = True) -> bool:
    """Whether `attend(..., compiled)` runs the fused kernel now: asked for, allowed
    (`compile_enabled`), and never failed to compile in this process."""
    return compiled and compile_enabled() and not _COMPILED.failed


def host_kernel(compiled: bool = True) -> str:
    """"compiled" or "eager": the name reports give the kernel `attend(..., compiled)` runs now
    (eager where asked for, or after a failed compile)."""
    return "compiled" if runs_compiled(compiled) else "eager"


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: DecodeTables,
           scale: float, compiled: bool = True) -> torch.Tensor:
    """Decode attention on one layer's host pool: the fused kernel, or eager when `compiled` is
    False or compilation ever failed (warned once). q [num_seqs, num_heads, head_dim] ->
    [num_seqs, num_heads, head_dim] in q's dtype. The runner builds `tables` once per step."""
    args = (q, k_cache, v_cache, tables, scale)
    if runs_compiled(compiled):
        return compiled_or_eager(attend_fused, attend_eager, args, "CPU attention",
                                 _COMPILED.mark_failed)
    return attend_eager(*args)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           compiled: bool = True) -> torch.Tensor:
    """`attend` with this call's DecodeTables built here (shapes as
    paged_decode_attention_eager). A caller attending over several layers with the same tables
    builds them once and calls `attend`."""
    return attend(q, k_cache, v_cache, DecodeTables(block_tables, context_lens, k_cache), scale,
                  compiled)
