"""Device-tier attention (attention.py) against a naive reference (repeat K/V heads, full
softmax), whole and in the slices that bound its memory (GATHER_BYTES)."""
from __future__ import annotations

import pytest
import torch

from apex_mini import attention
from apex_mini.attention import paged_decode_attention, prefill_attention

H, KVH, D, BS = 8, 2, 16, 4


def count_calls(monkeypatch, name: str) -> list:
    """Calls of attention.<name> made through the module (the slices' own calls)."""
    calls, real = [], getattr(attention, name)

    def spy(*args):
        calls.append(args[0].shape[0])
        return real(*args)
    monkeypatch.setattr(attention, name, spy)
    return calls


def naive(q, k, v, visible):
    """q [n, H, D], k/v [ctx, KVH, D], visible [n, ctx] -> [n, H, D], in float64."""
    k, v = (t.double().repeat_interleave(H // KVH, dim=1) for t in (k, v))   # [ctx, H, D]
    scores = torch.einsum("nhd,chd->hnc", q.double(), k) * D ** -0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("ctx_start", [0, 13])
@pytest.mark.parametrize("sliced", [False, True])
def test_prefill_attention_is_causal_whole_or_in_slices(ctx_start, sliced, monkeypatch):
    if sliced:   # scores of 3 query rows at most: slices of 3, 3, 3, 1 rows
        monkeypatch.setattr(attention, "GATHER_BYTES", 2 * H * 3 * (ctx_start + 10) * 4)
    slices = count_calls(monkeypatch, "prefill_attention")
    g = torch.Generator().manual_seed(ctx_start)
    n = 10
    q = torch.randn(n, H, D, generator=g)
    k, v = (torch.randn(ctx_start + n, KVH, D, generator=g) for _ in range(2))
    out = prefill_attention(q, k, v, ctx_start, D ** -0.5)
    visible = torch.arange(ctx_start + n)[None, :] <= torch.arange(ctx_start, ctx_start + n)[:, None]
    torch.testing.assert_close(out.double(), naive(q, k, v, visible), rtol=1e-5, atol=1e-5)
    assert slices == ([3, 3, 3, 1] if sliced else [])


@pytest.mark.parametrize("limit_rows", [None, 2, 1])
def test_paged_decode_attention_whole_or_in_row_chunks(limit_rows, monkeypatch):
    B, W, num_blocks = 5, 4, 24
    if limit_rows:   # K of `limit_rows` rows per gather
        monkeypatch.setattr(attention, "GATHER_BYTES", limit_rows * W * BS * KVH * D * 4)
    chunks = count_calls(monkeypatch, "paged_decode_attention")
    g = torch.Generator().manual_seed(B)
    k_cache, v_cache = (torch.randn(num_blocks, BS, KVH, D, generator=g) for _ in range(2))
    tables = torch.randperm(num_blocks, generator=g)[:B * W].view(B, W)
    lens = torch.tensor([1, 16, 7, 9, 12])          # not multiples of the block size
    q = torch.randn(B, H, D, generator=g)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, D ** -0.5)
    for b in range(B):
        k, v = (c[tables[b]].flatten(0, 1)[:lens[b]] for c in (k_cache, v_cache))
        expected = naive(q[b:b + 1], k, v, torch.ones(1, int(lens[b]), dtype=torch.bool))
        torch.testing.assert_close(out[b:b + 1].double(), expected, rtol=1e-5, atol=1e-5)
    assert chunks == {None: [], 2: [2, 2, 1], 1: [1] * 5}[limit_rows]
