"""Paged attention on the device tier, in pure PyTorch.

Vocabulary: B = decoding sequences, n = a prefill chunk's tokens, ctx = tokens of context,
H = query heads, KVH = key/value heads, G = H // KVH (queries per KV head), D = head_dim.
A cache is [num_blocks, block_size, KVH, D]; a block table row lists a sequence's blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import GATHER_BYTES, rows_per_gather


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k, v [N, KVH, D] at flat slots [N] (block * block_size + offset)."""
    KVH, D = k_cache.shape[-2:]
    k_cache.view(-1, KVH, D).index_copy_(0, slots, k)
    v_cache.view(-1, KVH, D).index_copy_(0, slots, v)


def gather_kv(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, KVH, D], slots [ctx] -> [ctx, KVH, D]."""
    return cache.view(-1, *cache.shape[-2:]).index_select(0, slots)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_start: int,
                      scale: float) -> torch.Tensor:
    """Causal attention of one sequence's chunk.

    q [n, H, D] holds positions ctx_start .. ctx_start+n-1; k, v [ctx_start+n, KVH, D] hold the
    whole context so far. Query i sees keys 0 .. ctx_start+i. Where the scores could pass
    GATHER_BYTES (if no fused kernel takes the call, SDPA's math path materializes them and
    their softmax in fp32), the queries go in slices, each attending as a chunk of its own.
    """
    n, ctx = q.shape[0], k.shape[0]
    scores = 2 * q.shape[1] * n * ctx * 4       # fp32 scores and probabilities, on the math path
    if n > 1 and scores > GATHER_BYTES:
        # Queries in slices, each one a chunk of its own: rows a..b see keys 0..ctx_start+b.
        step = max(1, n * GATHER_BYTES // scores)
        return torch.cat([prefill_attention(q[a:a + step], k[:ctx_start + a + step],
                                            v[:ctx_start + a + step], ctx_start + a, scale)
                          for a in range(0, n, step)])
    # [1, heads, len, D]: four dimensions, which the fused CUDA kernels need.
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if ctx_start == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                             enable_gqa=True)
    else:
        key_pos = torch.arange(ctx, device=q.device)
        query_pos = torch.arange(ctx_start, ctx_start + n, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]                       # [n, ctx]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                             enable_gqa=True)
    out = out.squeeze(0)                                                    # [H, n, D]
    return out.transpose(0, 1)                                              # [n, H, D]


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One new token per sequence against its paged context.

    q [B, H, D]; block_tables [B, max_blocks]; context_lens [B] (>= 1). Rows go in chunks
    whose gathered K stays within GATHER_BYTES (kv_cache.rows_per_gather).
    """
    B, H, D = q.shape
    KVH = k_cache.shape[2]
    G = H // KVH
    rows = rows_per_gather(B, block_tables.shape[1], k_cache[0].numel() * k_cache.element_size(),
                           GATHER_BYTES)
    if rows < B:                                             # bounded gathers: rows in chunks
        return torch.cat([paged_decode_attention(q[r:r + rows], k_cache, v_cache,
                                                 block_tables[r:r + rows],
                                                 context_lens[r:r + rows], scale)
                          for r in range(0, B, rows)])
    k = k_cache[block_tables].flatten(1, 2)                  # [B, ctx_max, KVH, D]
    v = v_cache[block_tables].flatten(1, 2)                  # [B, ctx_max, KVH, D]
    qg = q.view(B, KVH, G, D)                                # [B, KVH, G, D]
    scores = torch.einsum("bkgd,btkd->bkgt", qg, k).float() * scale   # [B, KVH, G, ctx_max]
    past_end = torch.arange(k.shape[1], device=q.device)[None, :] >= context_lens[:, None]
    scores = scores.masked_fill(past_end[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).to(v.dtype)                   # [B, KVH, G, ctx_max]
    out = torch.einsum("bkgt,btkd->bkgd", probs, v)          # [B, KVH, G, D]
    return out.reshape(B, H, D)
