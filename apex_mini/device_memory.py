"""How much device memory the engine keeps free of KV blocks (its activation reserve).

Unless given `gpu_kv_blocks`, the engine sizes a CUDA device's KV pool as free memory minus this
reserve, capped by `gpu_memory_gb` minus the weights and this reserve when that is set. The
pool is allocated once and never freed, so the reserve must hold everything an iteration
allocates and releases again. A fixed guess does not scale: the same 512 MiB is a lot for the
40 MB default model and too little for a 7B model with a 32k vocabulary. So it is the sum of
worst cases, from the shapes the options allow (per-layer terms: the layers run one after the
other, their temporaries freed):

    attention   one layer's attention, the larger of
                - a layer-loop decode: K and V gathered (each at most GATHER_BYTES: rows go in
                  chunks past it) and the copies its einsums make of them: 4 x GATHER_BYTES;
                - a prefill chunk on SDPA's math path (no fused kernel is guaranteed for a
                  masked, grouped-query chunk): fp32 scores and probabilities (sliced to
                  GATHER_BYTES), the context's K and V in fp32 with their heads repeated, and
                  the cached prefix gathered and joined to the chunk's own K/V
    tokens      one layer's activations for `max_num_batched_tokens` rows (packed_model.py's
                layers): the residual stream, normed input, q/k/v and their concatenation
                (on a GPU the three products are stacked by `torch.cat`), RoPE's three
                temporaries on q and k together, attention output, and the MLP's gate, up and
                product
    logits      LM-head output for the most rows that make a token at once (`max_num_seqs`),
                in the dtype and in fp32, and sampling's working memory (SAMPLE_BYTES: rows go
                in chunks past it)
    graphs      CUDA graphs' private memory pool, kept for good: the largest captured decode
                step's working set (its K and V gathers, its rows' activations) and each
                graph's output [B, hidden], one graph per (batch bucket, table-width bucket)
    runtime     cuBLAS workspaces, the copy stream's buffers, allocator fragmentation: fixed

The profiler, when it measures at start-up, runs after the pool is allocated; its largest
temporaries (KV_COPIES_BYTES of blocks per copy, staged once) fit in the attention term.
"""
from __future__ import annotations

from .kv_cache import GATHER_BYTES
from .plan import bucket
from .sampling import SAMPLE_BYTES, SAMPLE_BYTES_PER_LOGIT

RUNTIME_BYTES = 256 << 20


def activation_reserve(mc, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                       block_size: int, itemsize: int, cuda_graphs: bool) -> dict[str, int]:
    """The reserve's terms in bytes (module docstring), and their sum under "total"."""
    H, KVH, D = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    hidden, inter, vocab = mc.hidden_size, mc.intermediate_size, mc.vocab_size
    T, rows, ctx = max_num_batched_tokens, max_num_seqs, max_model_len
    width = bucket(-(-ctx // block_size))                                # widest block table
    # One decode gather (K or V) of every row padded to the widest table, at most the bound.
    block_bytes = block_size * KVH * D * itemsize                        # one layer's K block
    gather = min(GATHER_BYTES, bucket(rows) * width * block_bytes)
    scores = min(GATHER_BYTES, 2 * H * T * ctx * 4)
    prefill = scores + 2 * ctx * H * D * 4 + 4 * ctx * KVH * D * itemsize
    # Sampling's chunks: at most SAMPLE_BYTES, but never less than one row.
    sampling = min(rows * vocab * SAMPLE_BYTES_PER_LOGIT,
                   max(SAMPLE_BYTES, vocab * SAMPLE_BYTES_PER_LOGIT))
    per_row = (3 * hidden + 2 * (H + 2 * KVH) * D + 3 * (H + KVH) * D + H * D
               + 4 * inter) * itemsize
    terms = {
        "attention": max(4 * gather, prefill),
        "tokens": T * per_row,
        "logits": rows * vocab * (itemsize + 4) + sampling,
        "graphs": 0,
        "runtime": RUNTIME_BYTES,
    }
    if cuda_graphs:
        batch_rows = 2 * bucket(rows) - 1                                # 1 + 2 + 4 + ...
        widths = width.bit_length()                                      # 1, 2, 4 .. blocks
        terms["graphs"] = (2 * gather + bucket(rows) * per_row
                           + batch_rows * widths * hidden * itemsize)
    terms["total"] = sum(terms.values())
    return terms
