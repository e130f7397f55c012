"""LLaMA, as Hugging Face's LlamaForCausalLM defines it, over flat unpadded token batches.

Module and parameter names equal the checkpoint keys (`model.layers.0.self_attn.q_proj.weight`),
and RoPE is the rotate-half form, so checkpoints load with no renaming or permuting.

Every decoder layer is cut into three stages, so that an engine can run attention wherever
that request's KV cache lives (GPU or CPU) and overlap the two:

    q, k, v = layer.pre_attention(hidden, cos, sin)   # norm, QKV projection, RoPE
    attn    = <any attention over the paged KV cache>
    hidden  = layer.post_attention(hidden, attn)      # O projection, residual, norm, MLP, residual

Vocabulary: T = tokens in the flat batch, H = query heads, KVH = key/value heads, D = head_dim.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype: the order transformers uses.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, D]; cos, sin [T, D] -> broadcast over heads
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


class LlamaAttention(nn.Module):
    """Projections only: the attention itself lives outside the model, next to the KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def pre_attention(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Norm, QKV projection and RoPE. hidden [T, hidden] -> q [T, H, D], k, v [T, KVH, D]."""
        attn = self.self_attn
        T = hidden.shape[0]
        x = self.input_layernorm(hidden)                                   # [T, hidden]
        q = attn.q_proj(x).view(T, attn.num_heads, attn.head_dim)         # [T, H, D]
        k = attn.k_proj(x).view(T, attn.num_kv_heads, attn.head_dim)      # [T, KVH, D]
        v = attn.v_proj(x).view(T, attn.num_kv_heads, attn.head_dim)      # [T, KVH, D]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def post_attention(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """O projection, residual, norm, MLP, residual. attn_out [T, H, D] -> hidden [T, hidden]."""
        hidden = hidden + self.self_attn.o_proj(attn_out.flatten(1))       # [T, hidden]
        return hidden + self.mlp(self.post_attention_layernorm(hidden))   # [T, hidden]


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


# attention_fn(layer_idx, q [T, H, D], k [T, KVH, D], v [T, KVH, D]) -> [T, H, D]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order (what a layer loop runs between `embed` and `logits`)."""
        return self.model.layers

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """RoPE's (cos, sin) [T, D] at `positions` [T], as the layers' pre_attention takes them."""
        return self.model.rotary_emb(positions, dtype)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor):
        """input_ids, positions [T] -> hidden [T, hidden], and `rope_tables`."""
        hidden = self.model.embed_tokens(input_ids)
        return (hidden, *self.rope_tables(positions, hidden.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (only the rows that need a next token) -> logits [N, vocab] in fp32."""
        return self.lm_head(self.model.norm(hidden)).float()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attention_fn: AttentionFn) -> torch.Tensor:
        """The plain layer loop. Returns the final hidden states [T, hidden] (before the norm)."""
        hidden, cos, sin = self.embed(input_ids, positions)
        for layer in self.layers:
            q, k, v = layer.pre_attention(hidden, cos, sin)
            hidden = layer.post_attention(hidden, attention_fn(layer.layer_idx, q, k, v))
        return hidden

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Cache-free causal forward of equal-length sequences, for training and reference checks.
        input_ids [B, S] -> logits [B, S, vocab] in fp32."""
        B, S = input_ids.shape
        positions = torch.arange(S, device=input_ids.device).repeat(B)   # [B*S]

        def causal_attention(layer_idx, q, k, v):
            q, k, v = (t.view(B, S, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))  # [B, heads, S, D]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return out.transpose(1, 2).flatten(0, 1)                    # [B*S, H, D]

        hidden = self.forward(input_ids.reshape(-1), positions, causal_attention)
        return self.logits(hidden).view(B, S, -1)
