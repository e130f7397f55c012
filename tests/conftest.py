"""Shared fixtures: tiny random Hugging Face checkpoints, built once per test session.

Each checkpoint is what `LlamaForCausalLM(config).save_pretrained(dir)` from transformers writes
(config.json, generation_config.json, fp32 safetensors), plus a small sentencepiece
`tokenizer.model` trained on generated text, so `LLM(path)` loads it like a real model folder.

    kind          what it exercises
    ----------    ---------------------------------------------------------------------------
    mha           plain multi-head attention (num_key_value_heads == num_attention_heads)
    gqa_llama3    grouped-query attention (8 heads, 2 KV heads), head_dim * heads != hidden,
                  rope_scaling type llama3 with original_max_position_embeddings 32 and
                  max_position_embeddings 256, so positions past 32 use the scaled frequencies
                  (theta 10000 and head_dim 16 put frequencies in all three llama3 bands)
    tied          tie_word_embeddings (no lm_head.weight in the file), multi-query attention
    sharded       the mha shape with 3 layers saved in several shards + model.safetensors.index.json
    linear_rope   the mha shape with rope_scaling type linear, factor 4 (not in CKPT_KINDS, so
                  not in any_ckpt: test_parity's linear-scaling case asks for it by name)

Helpers for end-to-end runs: `mixed_prompts()` (six token-id prompts of different lengths)
and `run_greedy(path, prompts, params, ...)` -> (output token lists, the closed engine).
`CapturingGraphs(step)` stands in for CUDA graphs on the CPU (set as `engine.runner.graphs`):
each decode shape's first step is slower, as a capture is.

Fixtures (all session-scoped; treat the folders as read-only, copy them to modify):
    hf_checkpoint(kind) -> Path      factory over the kinds above
    mha_ckpt, gqa_llama3_ckpt, tied_ckpt, sharded_ckpt -> Path
    any_ckpt -> Path                 parametrised over all kinds (test ids are the kind names)
    spm_model_path -> Path           the shared tokenizer.model

All checkpoints share VOCAB_SIZE (= the tokenizer's size), BOS_ID 1, EOS_ID 2, UNK 0.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import time
from pathlib import Path

import pytest
import torch

CKPT_KINDS = ("mha", "gqa_llama3", "tied", "sharded")
VOCAB_SIZE = 384
BOS_ID, EOS_ID = 1, 2

_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
               max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=BOS_ID,
               eos_token_id=EOS_ID)

CKPT_CONFIGS: dict[str, dict] = {
    "mha": dict(_COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "gqa_llama3": dict(_COMMON, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                       head_dim=16, rope_theta=10000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 32}),
    "tied": dict(_COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                 tie_word_embeddings=True),
    "sharded": dict(_COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4),
}

# Built only where asked for by name (hf_checkpoint("linear_rope")), not for every kind.
CKPT_CONFIGS["linear_rope"] = dict(CKPT_CONFIGS["mha"],
                                   rope_scaling={"rope_type": "linear", "factor": 4.0})


def corpus_lines(n: int = 3000, seed: int = 0) -> list[str]:
    """Generated pseudo-English with digits, punctuation and a few accented/CJK words, so the
    trained vocabulary has real merges and byte fallback covers everything else."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "tu", "ra", "shi", "po", "el", "an", "or", "is", "the",
                 "and", "we", "to", "be", "ing", "er", "on", "at", "re", "st", "qu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    words += ["café", "naïve", "über", "世界", "你好", "2024", "42", "hello", "world"]
    lines = []
    for _ in range(n):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 16)))
        lines.append(line.capitalize() + rng.choice([".", "!", "?", ",", ";", ""]))
    return lines


def train_spm(path: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """A Llama-2-style sentencepiece BPE model: byte fallback, identity normalisation, digits
    split, unk/bos/eos = 0/1/2."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        num_threads=1, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def build_checkpoint(kind: str, out_dir: Path, tokenizer_model: Path | None = None,
                     seed: int = 0) -> Path:
    """Save a random transformers LlamaForCausalLM of `kind` (see CKPT_CONFIGS) to out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CKPT_CONFIGS[kind])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # Default init (std 0.02, norms 1) gives near-uniform logits where greedy ties are
    # likely; wider weights make argmaxes decisive, so token-level comparisons are meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.15)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard = {"max_shard_size": "100KB"} if kind == "sharded" else {}
    model.save_pretrained(out_dir, safe_serialization=True, **shard)
    if tokenizer_model is not None:
        shutil.copy(tokenizer_model, out_dir / "tokenizer.model")
    return out_dir


@pytest.fixture(scope="session", autouse=True)
def private_profile_cache(tmp_path_factory):
    """No test reads or writes the user's cached profiles (~/.cache/apex_mini)."""
    old = os.environ.get("APEX_MINI_CACHE")
    os.environ["APEX_MINI_CACHE"] = str(tmp_path_factory.mktemp("apex_cache"))
    yield
    if old is None:
        os.environ.pop("APEX_MINI_CACHE", None)
    else:
        os.environ["APEX_MINI_CACHE"] = old


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, spm_model_path):
    """Factory: kind -> path of that checkpoint folder (built on first use, then cached)."""
    root = tmp_path_factory.mktemp("ckpts")
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in CKPT_CONFIGS:
            raise ValueError(f"unknown checkpoint kind {kind!r}; known: {', '.join(CKPT_KINDS)}")
        if kind not in cache:
            cache[kind] = build_checkpoint(kind, root / kind, spm_model_path)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def mha_ckpt(hf_checkpoint) -> Path:
    return hf_checkpoint("mha")


@pytest.fixture(scope="session")
def gqa_llama3_ckpt(hf_checkpoint) -> Path:
    return hf_checkpoint("gqa_llama3")


@pytest.fixture(scope="session")
def tied_ckpt(hf_checkpoint) -> Path:
    return hf_checkpoint("tied")


@pytest.fixture(scope="session")
def sharded_ckpt(hf_checkpoint) -> Path:
    return hf_checkpoint("sharded")


@pytest.fixture(scope="session", params=CKPT_KINDS)
def any_ckpt(request, hf_checkpoint) -> Path:
    return hf_checkpoint(request.param)


# ------------------------------------------------------------------------------ end-to-end runs

def mixed_prompts(vocab: int = VOCAB_SIZE, lengths=(5, 17, 33, 2, 48, 9)) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def run_greedy(path, prompts, params, predictor=None, fast: bool = True, device: str = "cpu",
               **options):
    """Generate in fp32 with engine `options` and check the scheduler's integrity at the end;
    returns (output token lists, engine). `predictor` replaces the profiled one (a fake);
    fast=False turns the static decode step off, so every step runs the general layer loop."""
    from apex_mini import LLM
    from apex_mini.config import EngineConfig
    from apex_mini.engine import load_engine

    cfg = EngineConfig(device=device, dtype="float32", **options)
    llm = LLM.from_engine(load_engine(str(path), cfg, predictor))
    if not fast:
        llm.engine.runner.decode_step = llm.engine.runner.graphs = None
    try:
        outs = llm.generate(prompts, params)
        llm.engine.scheduler.check_integrity()
        return [o.token_ids for o in outs], llm.engine
    finally:
        llm.close()


class CapturingGraphs:
    """Stands in for CudaGraphDecoder on the CPU: the first step of each decode shape
    'captures' (takes CAPTURE_S more), then every step runs the decode step as a replay would."""
    CAPTURE_S = 0.15

    def __init__(self, step):
        self.step, self.captured = step, set()

    def run(self, inputs):
        if inputs.key not in self.captured:
            self.captured.add(inputs.key)
            time.sleep(self.CAPTURE_S)
        return self.step(inputs)

    @property
    def num_graphs(self) -> int:
        return len(self.captured)


# ------------------------------------------------------------------------------ reporting

def pytest_terminal_summary(terminalreporter):
    """One line to grab for docs, after every test ran: test_parity's max |logit difference|
    per case (PARITY_MAX_ABS_DIFF), whatever order the cases ran in; none when none ran."""
    import sys
    module = next((m for name, m in list(sys.modules.items())
                   if name.rsplit(".", 1)[-1] == "test_parity"), None)
    figures = getattr(module, "PARITY_MAX_ABS_DIFF", None)
    if figures:
        terminalreporter.write_line("PARITY_MAX_ABS_DIFF " + " ".join(
            f"{k}={v:.3e}" for k, v in figures.items()))
