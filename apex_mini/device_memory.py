"""How much device memory the engine keeps free of KV blocks (its activation reserve).

Unless given `gpu_kv_blocks`, the engine sizes the device KV pool as free memory (or
`gpu_memory_gb` minus the weights) minus this reserve. The pool is allocated once and never
freed, so the reserve must hold everything an iteration allocates and releases again. A fixed
guess does not scale: the same 512 MiB is a lot for the 40 MB default model and too little
for a 7B model with a 32k vocabulary. So it is the sum of worst cases, from the shapes the
options allow (per-layer terms: the layers run one after the other, their temporaries freed):

    attention   one layer's attention: the decode gather of K and V context (each bounded by
                GATHER_BYTES: the rows go in chunks past it), or a prefill chunk's fp32 scores
                and their softmax (sliced to the same bound)
    tokens      one layer's activations for `max_num_batched_tokens` rows: the residual
                stream, normed input, q/k/v and their rotated copies, attention output, and
                the MLP's gate, up and product
    logits      LM-head output for the most rows that make a token at once (`max_num_seqs`):
                the dtype's product, its fp32 copy and sampling's probabilities
    graphs      CUDA graphs keep each captured shape's output, [B, hidden]: one graph per
                (batch bucket, table-width bucket), batch buckets 1, 2, 4 .. max_num_seqs
    runtime     cuBLAS workspaces, the copy stream's buffers, allocator fragmentation: fixed

The profiler, when it measures at start-up, runs after the pool is allocated; its largest
temporaries (KV_COPIES_BYTES of blocks per copy) are smaller than the attention term.
"""
from __future__ import annotations

from .kv_cache import GATHER_BYTES
from .plan import bucket

RUNTIME_BYTES = 256 << 20


def activation_reserve(mc, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                       block_size: int, itemsize: int, cuda_graphs: bool) -> dict[str, int]:
    """The reserve's terms in bytes (module docstring), and their sum under "total"."""
    H, KVH, D = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    hidden, inter, vocab = mc.hidden_size, mc.intermediate_size, mc.vocab_size
    max_blocks = -(-max_model_len // block_size)
    # The whole padded decode gather, when it is smaller than the bound.
    block_bytes = block_size * KVH * D * itemsize                        # one layer's K block
    gather = min(GATHER_BYTES, bucket(max_num_seqs) * bucket(max_blocks) * block_bytes)
    scores = min(GATHER_BYTES, H * max_num_batched_tokens * max_model_len * 4)
    T = max_num_batched_tokens
    per_row = (3 * hidden + 2 * (H + 2 * KVH) * D + H * D + 4 * inter) * itemsize
    rows = max_num_seqs
    terms = {
        "attention": max(2 * gather, 2 * scores),
        "tokens": T * per_row,
        "logits": rows * vocab * (itemsize + 4 + 4),
        "graphs": 0,
        "runtime": RUNTIME_BYTES,
    }
    if cuda_graphs:
        batch_rows = 2 * bucket(max_num_seqs) - 1                        # 1 + 2 + 4 + ...
        widths = bucket(max_blocks).bit_length()                         # 1, 2, 4 .. blocks
        terms["graphs"] = batch_rows * widths * hidden * itemsize
    terms["total"] = sum(terms.values())
    return terms
