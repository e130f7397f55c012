"""sampling.py: SamplingParams validation, and `sample()`'s greedy limits, filters, seeded
determinism and distribution. All counter-based, so every check here is deterministic; the
statistical bounds are loose anyway."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apex_mini.sampling import SamplingParams, sample, uniform_noise


def rows(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, seeds=0, steps=None):
    """Per-row sampling tensors for `logits` [N, V]; scalars are broadcast over rows."""
    N = logits.shape[0]

    def col(x, dtype):
        t = torch.as_tensor(x, dtype=dtype)
        return t.expand(N).clone() if t.dim() == 0 else t

    return dict(temperature=col(temperature, torch.float32), top_k=col(top_k, torch.long),
                top_p=col(top_p, torch.float32), seeds=col(seeds, torch.long),
                steps=col(torch.arange(N) if steps is None else steps, torch.long))


def random_logits(n: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------ SamplingParams


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2), ("top_p", float("nan")),
    ("top_k", -1), ("top_k", 2.5),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 4.0),
    ("seed", "7"), ("seed", 1.5), ("seed", 2**63), ("seed", -2**63 - 1),
    ("temperature", "0.5"), ("temperature", None), ("top_p", "1"), ("top_k", True),
    ("max_tokens", True), ("max_tokens", "5"),
    ("stop_token_ids", 5), ("stop_token_ids", "ab"), ("stop_token_ids", ("a",)),
    ("stop_token_ids", (-1,)),
    ("temperature", float("inf")), ("ignore_eos", "no"), ("ignore_eos", 0),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_boundary_params_are_valid():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=1, seed=None)
    SamplingParams(temperature=5.0, top_p=1e-9, top_k=1, seed=0)
    SamplingParams(seed=2**62, stop_token_ids=(2, 3))
    SamplingParams(temperature=np.float32(0.5), top_p=np.float32(0.9), ignore_eos=True)
    assert SamplingParams(stop_token_ids=[2, 3]).stop_token_ids == (2, 3)   # kept as a tuple
    for seed in (2**63 - 1, -2**63):                 # the int64 ends: the sampler's seed tensor
        SamplingParams(seed=seed)
        logits = random_logits(1, 50)
        assert sample(logits, **rows(logits, seeds=seed)).shape == (1,)


def test_params_are_frozen():
    with pytest.raises(Exception):
        SamplingParams().temperature = 0.5


# ------------------------------------------------------------------ greedy limits


def test_temperature_zero_is_argmax_whatever_the_filters():
    logits = random_logits(64, 300)
    for kw in (dict(), dict(top_k=5), dict(top_p=0.3), dict(top_k=2, top_p=0.5, seeds=9)):
        got = sample(logits, **rows(logits, temperature=0.0, **kw))
        assert torch.equal(got, logits.argmax(-1))


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=1e-6)],
                         ids=["top_k=1", "top_p=tiny", "both"])
def test_degenerate_filters_are_argmax(kw):
    logits = random_logits(64, 300, seed=1)
    for temperature in (0.5, 1.0, 3.0):
        got = sample(logits, **rows(logits, temperature=temperature, **kw))
        assert torch.equal(got, logits.argmax(-1))


def test_mixed_rows_greedy_and_sampled():
    """A greedy row stays greedy beside sampled rows in the same call, and a sampled row stays
    sampled beside a greedy one: each row draws what it draws in a call of its own (one row's
    temperature 0 must not turn the whole batch greedy, nor the reverse)."""
    logits = random_logits(3, 50, seed=2, scale=0.1)       # flat: sampling rarely hits argmax
    t = torch.tensor([0.0, 1.0, 0.0])
    argmax = logits.argmax(-1)
    sampled_hits = 0
    for step in range(20):
        kw = rows(logits, temperature=t, seeds=torch.tensor([3, 4, 5]), steps=torch.full((3,), step))
        got = sample(logits, **kw)
        alone = [sample(logits[i:i + 1], **{k: v[i:i + 1] for k, v in kw.items()})[0] for i in range(3)]
        assert got[0] == argmax[0] and got[2] == argmax[2]
        assert got.tolist() == [int(a) for a in alone]
        sampled_hits += int(got[1] == argmax[1])
    assert sampled_hits <= 10                               # row 1 does sample: ~1 hit in 20


# ------------------------------------------------------------------ seeds


def test_seeded_draws_are_deterministic():
    logits = random_logits(32, 200, scale=0.5)
    kw = rows(logits, temperature=1.0, top_p=0.95, top_k=50, seeds=torch.arange(32) * 7 + 1)
    assert torch.equal(sample(logits, **kw), sample(logits, **kw))


def random_batch(N: int, V: int, max_top_k: int, g: torch.Generator):
    """Logits [N, V] and per-row sampling tensors, all drawn from `g`."""
    logits = torch.randn(N, V, generator=g)
    kw = dict(temperature=torch.rand(N, generator=g) + 0.3,
              top_k=torch.randint(0, max_top_k, (N,), generator=g),
              top_p=torch.rand(N, generator=g) * 0.7 + 0.3,
              seeds=torch.randint(0, 2**62, (N,), generator=g),
              steps=torch.randint(0, 1000, (N,), generator=g))
    return logits, kw


def test_a_row_ignores_the_rest_of_the_batch_and_its_position():
    g = torch.Generator().manual_seed(3)
    N, V = 24, 128
    logits, kw = random_batch(N, V, 40, g)
    full = sample(logits, **kw)
    alone = torch.stack([sample(logits[i:i + 1], **{k: v[i:i + 1] for k, v in kw.items()})[0]
                         for i in range(N)])
    assert torch.equal(full, alone)
    perm = torch.randperm(N, generator=g)
    shuffled = sample(logits[perm], **{k: v[perm] for k, v in kw.items()})
    assert torch.equal(shuffled, full[perm])
    others = torch.randn(N, V, generator=g)              # new neighbours around row 0
    mixed = sample(torch.cat([others[:5], logits[:1], others[5:]]),
                   **{k: torch.cat([v[1:6], v[:1], v[5:]]) for k, v in kw.items()})
    assert mixed[5] == full[0]


def test_rows_in_chunks_draw_what_one_call_draws(monkeypatch):
    """Past SAMPLE_BYTES the rows go in chunks (7 per call here: 3 chunks for 17 rows), with
    the same draws as one call."""
    from apex_mini import sampling
    N, V = 17, 64
    logits, kw = random_batch(N, V, 20, torch.Generator().manual_seed(4))
    kw["temperature"][::4] = 0.0                          # greedy rows among them
    whole = sample(logits, **kw)
    calls = []
    real = sampling._sample_rows
    monkeypatch.setattr(sampling, "_sample_rows", lambda lg, *a: calls.append(len(lg)) or real(lg, *a))
    monkeypatch.setattr(sampling, "SAMPLE_BYTES", 7 * V * sampling.SAMPLE_BYTES_PER_LOGIT)
    assert torch.equal(sample(logits, **kw), whole)
    assert calls == [7, 7, 3]


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)                        # uniform: every draw is the noise's
    steps = torch.arange(40)

    def draws(seed):
        return torch.stack([sample(logits, **rows(logits, seeds=seed, steps=s[None]))[0] for s in steps])

    a, b = draws(1), draws(2)
    assert torch.equal(a, draws(1))
    assert (a != b).sum() >= 30                          # chance of a match is 1/1000 per step
    assert len(set(a.tolist())) >= 30                    # and steps differ within one seed


# ------------------------------------------------------------------ distribution


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_draws_follow_softmax(temperature):
    """Many draws of one row (one per step) against softmax(logits / T) over 8 tokens.
    7 degrees of freedom: the 1e-6 tail starts near 38; the bound is 60."""
    V, N = 8, 40_000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    logits = base.expand(N, V).clone()
    got = sample(logits, **rows(logits, temperature=temperature, seeds=12345))
    counts = torch.bincount(got, minlength=V).double()
    probs = (base / temperature).softmax(-1).double()
    assert chi_square(counts, probs) < 60
    assert (counts / N - probs).abs().max() < 0.02


def test_top_k_and_top_p_renormalise():
    V, N = 8, 40_000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    logits = base.expand(N, V).clone()
    top3 = base.topk(3).indices
    got = sample(logits, **rows(logits, top_k=3, seeds=7))
    counts = torch.bincount(got, minlength=V).double()
    assert counts.sum() == counts[top3].sum()
    assert chi_square(counts[top3], base[top3].softmax(-1).double()) < 40   # 2 dof
    probs = base.softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = order[:int((probs[order].cumsum(0) - probs[order] <= 0.8).sum())]
    got = sample(logits, **rows(logits, top_p=0.8, seeds=8))
    counts = torch.bincount(got, minlength=V).double()
    assert counts.sum() == counts[nucleus].sum()
    assert chi_square(counts[nucleus], base[nucleus].softmax(-1).double()) < 60


def test_top_k_never_leaves_the_top_k():
    g = torch.Generator().manual_seed(5)
    N, V = 2000, 64
    logits = torch.randn(N, V, generator=g)              # continuous: no ties
    k = torch.randint(1, V + 1, (N,), generator=g)
    temperature = torch.rand(N, generator=g) * 4 + 0.05
    got = sample(logits, **rows(logits, temperature=temperature, top_k=k, seeds=11))
    rank = (logits > logits.gather(1, got[:, None])).sum(-1)   # 0 = the argmax
    assert (rank < k).all()
    assert (rank > 0).any()                              # and it does sample, not just argmax


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    """Probabilities 0.5, 0.25, 0.25 (exact in fp32): top_p = 0.5 is reached by the first token
    alone, so only it is ever drawn; top_p = 0.75 keeps two tokens, top_p = 1 all three."""
    N = 4000
    logits = torch.tensor([2.0, 1.0, 1.0]).log().expand(N, 3).clone()
    for top_p, kept in ((0.5, 1), (0.75, 2), (1.0, 3)):
        got = sample(logits, **rows(logits, top_p=top_p, seeds=torch.arange(N)))
        drawn = set(got.tolist())
        assert 0 in drawn and len(drawn) == kept, top_p       # tokens 1 and 2 tie: either


def test_top_p_stays_in_the_nucleus():
    g = torch.Generator().manual_seed(6)
    N, V = 2000, 64
    logits = torch.randn(N, V, generator=g) * 2
    top_p = torch.rand(N, generator=g) * 0.9 + 0.05
    got = sample(logits, **rows(logits, top_p=top_p, seeds=13))
    probs = logits.softmax(-1)
    mass_before = (probs * (probs > probs.gather(1, got[:, None]))).sum(-1)
    assert (mass_before <= top_p + 1e-5).all()


# ------------------------------------------------------------------ the noise


def test_uniform_noise_is_open_unit_interval_and_flat():
    N, V = 64, 4096
    seeds = torch.cat([torch.tensor([0, 1, 2**31, 2**32, 2**62, 2**63 - 1]),
                       torch.randint(0, 2**62, (N - 6,), generator=torch.Generator().manual_seed(0))])
    steps = torch.arange(N) * 1_000_003
    u = uniform_noise(seeds, steps, torch.arange(V).expand(N, V))
    assert u.dtype == torch.float64 and u.shape == (N, V)
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    counts = torch.histc(u.float(), bins=16, min=0, max=1)
    expected = N * V / 16
    assert ((counts - expected).abs() / expected).max() < 0.05
    # Distinct per token id, and neighbouring seeds/steps are uncorrelated.
    assert u[0].unique().numel() == V
    corr = torch.corrcoef(u[:8])
    assert (corr - torch.eye(8)).abs().max() < 0.1


def test_uniform_noise_depends_on_seed_step_and_token_only():
    ids = torch.arange(100).expand(3, 100)
    a = uniform_noise(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]), ids)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    b = uniform_noise(torch.tensor([5]), torch.tensor([0]), ids[:1].flip(-1))
    assert torch.equal(b[0], a[0].flip(-1))              # keyed by token id, not by column
    assert math.isclose(float(a[0, 3]), float(uniform_noise(torch.tensor([5]), torch.tensor([0]),
                                                             torch.tensor([[3]]))[0, 0]))
