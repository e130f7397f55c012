"""Parity with Hugging Face transformers on the tiny checkpoints of conftest.py.

`pytest -s tests/test_parity.py` prints one line per case, `parity[<case>] max_abs_diff=...`,
and the figures are also kept in PARITY_MAX_ABS_DIFF (case -> float), which conftest.py's
pytest_terminal_summary prints as one line at the end of the run, `PARITY_MAX_ABS_DIFF
<case>=<diff> ...` (no line when no case ran).
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM as HFLlama

from apex_mini.weights import load_model

from conftest import CKPT_KINDS, VOCAB_SIZE

PARITY_MAX_ABS_DIFF: dict[str, float] = {}
SEQ_LEN = 200          # past original_max_position_embeddings (32) of the llama3 case


def _hf_model(path) -> HFLlama:
    return HFLlama.from_pretrained(path, dtype=torch.float32).eval()


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (batch, length), generator=g)


@pytest.fixture(scope="module")
def hf_logits(hf_checkpoint):
    """kind -> transformers' fp32 logits [2, SEQ_LEN, vocab] on _ids(2, SEQ_LEN)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            with torch.no_grad():
                cache[kind] = _hf_model(hf_checkpoint(kind))(_ids(2, SEQ_LEN)).logits.float()
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", CKPT_KINDS)
def test_fp32_logits_match_transformers(kind, hf_checkpoint, hf_logits):
    path = hf_checkpoint(kind)
    model = load_model(path, torch.float32, "cpu")
    with torch.no_grad():
        ours = model.forward_dense(_ids(2, SEQ_LEN))     # [2, SEQ_LEN, vocab]
    ref = hf_logits(kind)
    assert ours.shape == ref.shape == (2, SEQ_LEN, VOCAB_SIZE)
    diff = (ours - ref).abs().max().item()
    PARITY_MAX_ABS_DIFF[kind] = diff
    print(f"\nparity[{kind}] max_abs_diff={diff:.3e} (fp32, batch 2 x {SEQ_LEN} tokens, "
          f"logit scale {ref.abs().max().item():.2f})")
    assert diff <= 1e-4


def test_rope_frequencies_match_transformers(gqa_llama3_ckpt):
    """The llama3 case really uses scaled frequencies, and the same ones as transformers."""
    from apex_mini.rope import default_inv_freq

    ours = load_model(gqa_llama3_ckpt, torch.float32, "cpu").model.rotary_emb.inv_freq
    theirs = _hf_model(gqa_llama3_ckpt).model.rotary_emb.inv_freq
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, default_inv_freq(16, 10000.0))


def test_linear_rope_scaling_matches_transformers(hf_checkpoint, tmp_path):
    """rope_scaling type linear (factor 4): the frequencies are transformers' and a quarter of
    the plain ones, and the logits match over SEQ_LEN positions. The older spelling of config.json
    (`rope_scaling` with `type`, as transformers v4 wrote it) gives the same frequencies."""
    import json
    import shutil

    from apex_mini.config import ModelConfig
    from apex_mini.rope import default_inv_freq, inv_freq_for

    path = hf_checkpoint("linear_rope")
    model = load_model(path, torch.float32, "cpu")
    hf = _hf_model(path)
    theirs = hf.model.rotary_emb.inv_freq
    assert torch.equal(model.model.rotary_emb.inv_freq, theirs)
    assert torch.allclose(theirs, default_inv_freq(16, 10000.0) / 4.0)
    with torch.no_grad():
        ids = _ids(2, SEQ_LEN)
        diff = (model.forward_dense(ids) - hf(ids).logits.float()).abs().max().item()
    PARITY_MAX_ABS_DIFF["linear_rope"] = diff
    assert diff <= 1e-4

    old = shutil.copytree(path, tmp_path / "v4")
    cfg = json.loads((old / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0})
    (old / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(inv_freq_for(ModelConfig.from_hf(old)), theirs)


@pytest.mark.parametrize("dtype,tol_vs_fp32", [(torch.float16, 0.1), (torch.bfloat16, 0.5)])
@pytest.mark.parametrize("kind", ["gqa_llama3", "tied"])
def test_half_precision_load(kind, dtype, tol_vs_fp32, hf_checkpoint, hf_logits):
    """Half-precision weights: right dtypes, RoPE kept in fp32, logits finite, matching
    transformers run in the same dtype, and near the fp32 logits (scale ~6: the bounds are a
    few bf16/fp16 ulps of accumulated rounding over 2 layers)."""
    path = hf_checkpoint(kind)
    model = load_model(path, dtype, "cpu")
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = _ids(2, SEQ_LEN)
    with torch.no_grad():
        logits = model.forward_dense(ids)
        ref_same_dtype = HFLlama.from_pretrained(path, dtype=dtype).eval()(ids).logits.float()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    name = f"{kind}-{str(dtype).removeprefix('torch.')}"
    same = (logits - ref_same_dtype).abs().max().item()
    vs_fp32 = (logits - hf_logits(kind)).abs().max().item()
    PARITY_MAX_ABS_DIFF[name] = same
    print(f"\nparity[{name}] max_abs_diff={same:.3e} vs transformers in {name.split('-')[-1]}, "
          f"{vs_fp32:.3e} vs transformers fp32")
    assert same <= 1e-2
    assert vs_fp32 <= tol_vs_fp32


@pytest.mark.parametrize("kind", CKPT_KINDS)
def test_greedy_generation_matches_transformers(kind, hf_checkpoint):
    """The engine's greedy tokens equal transformers' generate() for prompts of mixed
    lengths run as one batch. ignore_eos means 'keep going', not 'never pick EOS', so the
    reference runs with eos_token_id=None (min_new_tokens would mask EOS instead)."""
    from apex_mini import LLM, SamplingParams

    path = hf_checkpoint(kind)
    max_tokens = 32
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, VOCAB_SIZE, (n - 1,), generator=g).tolist()
               for n in (5, 23, 57)]   # 57 + 32 > 32: llama3 scaling in play

    llm = LLM(str(path), device="cpu", dtype="float32")
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                   ignore_eos=True))
    assert len(outputs) == len(prompts)

    hf = _hf_model(path)
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert len(ref) == max_tokens
        assert list(out.token_ids) == ref, f"{kind}: prompt of {len(prompt)} tokens diverged"
