"""Rotary position embeddings, with the `llama3` and `linear` frequency scalings.

The frequencies are computed exactly as transformers computes them (fp32, same operation
order), so logits match to the last bit that fp32 allows, also past
`original_max_position_embeddings`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig, rope_type_of


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """[D/2] fp32 inverse frequencies: theta ** (-2i / D)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta ** exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3.1's scaling: long wavelengths slowed by `factor`, short ones kept, a smooth blend
    between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def inv_freq_for(cfg: ModelConfig) -> torch.Tensor:
    inv_freq = default_inv_freq(cfg.head_dim, cfg.rope_theta)
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq
    rope_type = rope_type_of(scaling)     # config.py checked its fields
    if rope_type == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    return inv_freq


class RotaryEmbedding(nn.Module):
    """positions [T] -> (cos, sin) [T, D] in the activation dtype, computed in fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq_for(cfg), persistent=False)

    def reset_parameters_from(self, cfg: ModelConfig) -> None:
        """Recompute the (non-persistent) frequencies after the model was built on 'meta'."""
        self.inv_freq = inv_freq_for(cfg).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]   # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                        # [T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)
