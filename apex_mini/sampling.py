"""Sampling: greedy, temperature, top-k, top-p, with per-request seeds.

Randomness is counter-based: the noise for (seed, step, token id) is a hash of those three
numbers, computed for the whole batch in one vectorised pass. A request's tokens therefore
depend only on its own seed and logits, never on what else is in the batch or on the device,
and a preempted request that is recomputed draws the same numbers again.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """vLLM's names. `temperature=0` is greedy; `top_k=0` and `top_p=1` disable those filters;
    top-p keeps the most likely tokens until their mass reaches `top_p` (the smallest such
    set, as transformers and vLLM do)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    ignore_eos: bool = False
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name}={value!r} must be a number")
        if not (0.0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature={self.temperature} must be finite and >= 0 (0 means "
                             "greedy)")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 disables it)")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos={self.ignore_eos!r} must be True or False")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if self.seed is not None and not (_is_int(self.seed) and -2**63 <= self.seed < 2**63):
            raise ValueError(f"seed={self.seed!r} must be an integer in [-2**63, 2**63) "
                             "(a 64-bit signed integer) or None")
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not hasattr(stops, "__iter__"):
            raise ValueError(f"stop_token_ids={stops!r} must be a list or tuple of token ids")
        stops = tuple(stops)
        if not all(_is_int(t) and t >= 0 for t in stops):
            raise ValueError(f"stop_token_ids={stops!r} must hold token ids (integers >= 0)")
        object.__setattr__(self, "stop_token_ids", stops)     # frozen: a tuple, whatever came


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for h < 2**32, in int64 without overflow: split h into 16-bit halves."""
    lo, hi = h & 0xFFFF, h >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser: a bijection on 32-bit integers that mixes every bit."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) noise [N, V] from seeds [N], steps [N] and vocab_ids [N, V] (all int64)."""
    s = _fmix32((seeds & _M32) ^ _fmix32((seeds >> 32) & _M32))        # [N]
    s = _fmix32(s ^ _fmix32((steps + 0x632BE5AB) & _M32))             # [N]
    h = _fmix32((vocab_ids * 0x9E37 + s[:, None]) & _M32)             # [N, V]
    return (h.double() + 0.5) / 2.0**32


# Working memory of `sample` per logit: a sort (values and int64 ids), probabilities, masks,
# 64-bit hashes and float64 noise come to about 19 fp32 logits' worth (80 bytes) at their peak.
SAMPLE_BYTES_PER_LOGIT = 80
SAMPLE_BYTES = 64 << 20      # most working memory one call takes: rows go in chunks past it


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """logits [N, V] fp32; per-row temperature, top_k, top_p, seed, step [N] -> tokens [N].
    Rows are independent, so they go in chunks of at most SAMPLE_BYTES of working memory
    (256 rows of a 128k vocabulary would otherwise take 2.5 GB at once)."""
    N, V = logits.shape
    rows = max(1, SAMPLE_BYTES // (V * SAMPLE_BYTES_PER_LOGIT))
    if rows < N:
        return torch.cat([_sample_rows(*(t[r:r + rows] for t in
                                         (logits, temperature, top_k, top_p, seeds, steps)))
                          for r in range(0, N, rows)])
    return _sample_rows(logits, temperature, top_k, top_p, seeds, steps)


def _sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """`sample` of one chunk of rows, all at once."""
    greedy = logits.argmax(-1)                                          # [N]
    V = logits.shape[-1]
    scaled = logits / temperature.clamp_min(1e-6)[:, None]              # [N, V]
    sorted_logits, sorted_ids = scaled.sort(-1, descending=True)        # [N, V]
    ranks = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, V)
    drop = ranks[None, :] >= k[:, None]                                 # outside the top k
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    # Past the nucleus: the tokens before it already reach top_p (top_p = 1 drops nothing,
    # whatever the rounding of the sum).
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)  # [N, V]
    # Exponential race (equivalent to sampling from probs): argmax p / E with E ~ Exp(1).
    u = uniform_noise(seeds, steps, sorted_ids)                         # keyed by token id
    choice = (probs.double() / -torch.log(u)).argmax(-1)                # [N]
    sampled = sorted_ids.gather(1, choice[:, None]).squeeze(1)
    return torch.where(temperature == 0, greedy, sampled)
