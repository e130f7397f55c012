"""The model as the engine runs it: model.py's LLaMA with each layer's weights fetched once and
stacked for fewer, larger operations.

model.py is the readable reference, one `nn.Module` per piece as transformers writes them.
Serving pays fixed work per operation (Python, the dispatcher, a kernel launch on a GPU) and,
on the CPU, multiplies faster by weights laid out for its products. So the engine runs this
copy of the model instead, on every step:

- q/k/v are one product and gate/up another (`packed_linear.StackedLinear`), on weights
  oneDNN-packed (eager CPU), transposed (compiled CPU) or as they are (GPU; `choose_layout`).
  Measured here (2 vCPUs, fp32, 2048 -> 3072 outputs): oneDNN's packed product took 0.26x to
  0.42x the time of `F.linear` from 1 to 512 rows.
- RoPE rotates q and k together with one `roll` (`rope_tables`), bit-identical to
  `rope.apply_rope` (a sign flip is exact).
- Each layer's weights sit in plain attributes: no `nn.Module` call per piece.

The numerics are model.py's (RMSNorm in fp32, the same RoPE). What differs is rounding: the
products' summation order where their weights are laid out anew, and, on the CPU, SiLU over
gate, a view into the stacked gate/up rows, whose last `width % 32` elements per row take the
vector loop's scalar tail. With the weights as they are and an MLP width that is a multiple of
32 every stage gives model.py's bits. Greedy tokens match the reference's (tested against
transformers and against the engine with the fast path off, which runs model.py's layers). Users: the decode step (decode_step.py), which puts its own attention between each
layer's two halves, and the runner's layer loop (runner.py: prefill chunks, host rows).

Vocabulary: T = rows, H = query heads, KVH = key/value heads, D = head_dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .packed_linear import StackedLinear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.RMSNorm without the module call, same bits.

    In fp32 that is torch's own `rms_norm`: one op instead of six, 1.4x-2x faster on 1-16 rows
    on the benchmark machine, and bit-identical to the six there. In fp16/bf16 torch's op
    multiplies by the weight before rounding to x's dtype and transformers after, so the
    half-precision path keeps the six ops."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class PackedLayer:
    """One decoder layer, with model.LlamaDecoderLayer's two halves: `pre_attention` and
    `post_attention`. Takes (cos, sin) from `PackedModel.rope_tables`, not from model.py."""

    def __init__(self, layer, layout: str, eps: float):
        a, m = layer.self_attn, layer.mlp
        self.layer_idx = layer.layer_idx
        self.H, self.KVH, self.D = a.num_heads, a.num_kv_heads, a.head_dim
        self.eps = eps
        self.ln1 = layer.input_layernorm.weight
        self.qkv_proj = StackedLinear([a.q_proj, a.k_proj, a.v_proj], layout)
        self.o_proj = StackedLinear([a.o_proj], layout)
        self.ln2 = layer.post_attention_layernorm.weight
        self.gate_up_proj = StackedLinear([m.gate_proj, m.up_proj], layout)
        self.down_proj = StackedLinear([m.down_proj], layout)

    def pre_attention(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Norm, QKV, RoPE. hidden [T, hidden] -> q [T, H, D], k [T, KVH, D], v [T, KVH, D]
        (views into this layer's qkv rows, not contiguous)."""
        T, H, KVH, D = hidden.shape[0], self.H, self.KVH, self.D
        x = rms_norm(hidden, self.ln1, self.eps)                           # [T, hidden]
        qkv = self.qkv_proj(x).view(T, H + 2 * KVH, D)                     # q heads, k heads, v heads
        qk = qkv[:, :H + KVH]                                              # [T, H + KVH, D]
        qk = qk * cos + qk.roll(D // 2, -1) * sin                          # RoPE on q and k at once
        return qk[:, :H], qk[:, H:], qkv[:, H + KVH:]                      # [T, H|KVH|KVH, D]

    def post_attention(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """O projection, residual, norm, MLP, residual. attn_out [T, H, D] (or [T, KVH, G, D])
        -> hidden [T, hidden]."""
        T = hidden.shape[0]
        hidden = hidden + self.o_proj(attn_out.reshape(T, self.H * self.D))           # [T, hidden]
        gate, up = self.gate_up_proj(rms_norm(hidden, self.ln2, self.eps)).chunk(2, dim=-1)  # [T, inter] x2
        return hidden + self.down_proj(F.silu(gate) * up)                  # [T, hidden]


class PackedModel:
    """model.LlamaForCausalLM's `embed`, `layers` and `logits`, on weights in `layout`."""

    def __init__(self, model, layout: str):
        self.layout = layout
        self.eps = model.config.rms_norm_eps
        self.rotary = model.model.rotary_emb
        self.embed_weight = model.model.embed_tokens.weight
        self.final_norm_weight = model.model.norm.weight
        self.lm_head = StackedLinear([model.lm_head], layout)
        self.layers = [PackedLayer(layer, layout, self.eps) for layer in model.model.layers]

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos [T, 1, D] and sin [T, 1, D] for `PackedLayer.pre_attention`, where
        rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi]: one roll instead of chunk +
        neg + cat per tensor."""
        cos, sin = self.rotary(positions, dtype)                           # [T, D]
        half = cos.shape[-1] // 2
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)           # [T, D]
        return cos[:, None, :], sin[:, None, :]

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor):
        """input_ids, positions [T] -> hidden [T, hidden] and `rope_tables`."""
        hidden = F.embedding(input_ids, self.embed_weight)                 # [T, hidden]
        return (hidden, *self.rope_tables(positions, hidden.dtype))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, self.final_norm_weight, self.eps)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [N, hidden] -> logits [N, vocab] (fp32)."""
        return self.lm_head(hidden).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (the rows that need a next token) -> logits [N, vocab] (fp32)."""
        return self.head(self.final_norm(hidden))
