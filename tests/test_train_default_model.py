"""The default-model training script, end to end in its --quick mode (a tiny corpus, model and
step count), run once as a subprocess exactly as a user would run it."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
FILES = ("config.json", "model.safetensors", "tokenizer.model", "generation_config.json", "README.md")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("tiny") / "model"
    proc = subprocess.run(
        [sys.executable, "-m", "apex_mini.train_default_model", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_writes_a_hugging_face_folder(quick_run):
    out, _ = quick_run
    for name in FILES:
        assert (out / name).is_file(), f"{name} missing"


def test_config_has_the_llama_fields(quick_run):
    out, _ = quick_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "rms_norm_eps", "rope_theta", "torch_dtype"):
        assert key in cfg, key
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]   # grouped-query attention
    assert cfg["tie_word_embeddings"] is False and cfg["hidden_act"] == "silu"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["attention_bias"] is False and cfg["mlp_bias"] is False
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


def test_safetensors_keys_match_the_model(quick_run):
    from safetensors.torch import load_file

    from apex_mini.config import ModelConfig
    from apex_mini.model import LlamaForCausalLM

    out, _ = quick_run
    cfg = ModelConfig.from_hf(out)
    expected = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    saved = load_file(str(out / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == expected
    assert all(v.dtype == getattr(torch, cfg.torch_dtype) for v in saved.values())


def test_tokenizer_round_trips(quick_run):
    import sentencepiece as spm

    out, _ = quick_run
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    text = 'Once upon a time, Zoë said: "42 cats!"\n\nThe end. 世界'
    assert sp.decode(sp.encode(text)) == text   # byte fallback covers unseen characters


def test_reports_perplexity_and_parity(quick_run):
    _, stdout = quick_run
    ppl = float(re.search(r"held-out perplexity: ([0-9.e+-]+|nan|inf)", stdout).group(1))
    assert math.isfinite(ppl) and ppl > 1.0
    parity = re.search(r"max \|logit difference\| ([0-9.e+-]+)", stdout)
    if parity:   # absent only when transformers is not installed
        assert float(parity.group(1)) < 1e-4
