"""weights.py: loading on 'meta', every bad-input error, random models, device/dtype names."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from apex_mini.config import ModelConfig
from apex_mini.model import LlamaForCausalLM
from apex_mini.weights import (MODEL_SHAPES, load_model, random_model, resolve_device,
                               resolve_dtype)


@pytest.fixture
def mha_copy(mha_ckpt, tmp_path):
    """A private copy of the mha checkpoint that a test may damage."""
    return shutil.copytree(mha_ckpt, tmp_path / "ckpt")


def _edit_config(path, **changes):
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))


# --- loading ---------------------------------------------------------------------------------

def test_loaded_model_is_materialised_frozen_and_in_eval(any_ckpt):
    model = load_model(any_ckpt, torch.float32, "cpu")
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_meta for t in tensors)
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_loaded_weights_equal_the_file(mha_ckpt):
    model = load_model(mha_ckpt, torch.float32, "cpu")
    stored = load_file(mha_ckpt / "model.safetensors")
    params = dict(model.named_parameters())
    assert stored.keys() == params.keys()
    assert all(torch.equal(params[k], v) for k, v in stored.items())


def test_tied_embeddings_share_one_tensor(tied_ckpt):
    model = load_model(tied_ckpt, torch.float16, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    stored = load_file(tied_ckpt / "model.safetensors")
    assert "lm_head.weight" not in stored          # transformers omits it
    assert torch.equal(model.lm_head.weight, stored["model.embed_tokens.weight"].half())


def test_tied_checkpoint_may_also_store_lm_head(tied_ckpt, tmp_path):
    ckpt = shutil.copytree(tied_ckpt, tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    model = load_model(ckpt, torch.float32, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_tied_checkpoint_with_a_different_lm_head_is_refused(tied_ckpt, tmp_path):
    """The config ties the two, the file holds two different tensors: which one is meant is
    not for the loader to guess (transformers 4 and 5 guess differently)."""
    ckpt = shutil.copytree(tied_ckpt, tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_model(ckpt, torch.float32, "cpu")


def test_tied_checkpoint_with_only_lm_head_fills_the_embedding(tied_ckpt, tmp_path):
    ckpt = shutil.copytree(tied_ckpt, tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    model = load_model(ckpt, torch.float32, "cpu")
    assert torch.equal(model.model.embed_tokens.weight, tensors["lm_head.weight"])


def test_sharded_equals_single_file_layout(sharded_ckpt):
    index = json.loads((sharded_ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2   # the fixture really is sharded
    model = load_model(sharded_ckpt, torch.float32, "cpu")
    for key, shard in index["weight_map"].items():
        stored = load_file(sharded_ckpt / shard)[key]
        assert torch.equal(model.get_parameter(key), stored)


def test_old_inv_freq_keys_are_ignored(mha_copy):
    tensors = load_file(mha_copy / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    save_file(tensors, mha_copy / "model.safetensors", metadata={"format": "pt"})
    model = load_model(mha_copy, torch.float32, "cpu")
    assert model.model.rotary_emb.inv_freq.abs().min() > 0


def test_progress_bar_can_be_forced(mha_ckpt, capsys):
    load_model(mha_ckpt, torch.float32, "cpu", progress=True)
    assert "loading weights" in capsys.readouterr().err
    load_model(mha_ckpt, torch.float32, "cpu")            # auto: tiny, so silent
    assert "loading weights" not in capsys.readouterr().err


# --- bad inputs: one clear line each ---------------------------------------------------------

def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope", torch.float32, "cpu")


def test_missing_config(mha_copy):
    (mha_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(mha_copy, torch.float32, "cpu")


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "GPT2LMHeadModel"])
def test_unsupported_architecture(mha_copy, arch):
    _edit_config(mha_copy, architectures=[arch])
    with pytest.raises(ValueError, match=f"unsupported architecture '{arch}'"):
        load_model(mha_copy, torch.float32, "cpu")


def test_no_safetensors(mha_copy):
    (mha_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index"):
        load_model(mha_copy, torch.float32, "cpu")


def test_truncated_file(mha_copy):
    f = mha_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt.*re-download or re-save"):
        load_model(mha_copy, torch.float32, "cpu")


@pytest.mark.parametrize("garbage", [b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"{nonsense" * 4,
                                     b"abc"])
def test_corrupt_header(mha_copy, garbage):
    f = mha_copy / "model.safetensors"
    f.write_bytes(garbage + f.read_bytes()[len(garbage):] if len(garbage) > 8 else garbage)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(mha_copy, torch.float32, "cpu")


def test_header_that_safetensors_rejects(mha_copy):
    """Sizes fit the file, so our own header check passes; overlapping offsets are caught by
    safetensors itself and reported the same way."""
    f = mha_copy / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["model.norm.weight"]["data_offsets"] = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    raw = json.dumps(header).encode()
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(mha_copy, torch.float32, "cpu")


@pytest.mark.parametrize("offsets", [["0", "10"], [0, 1.5], [-4, 0]])
def test_header_offsets_that_are_not_integers(mha_copy, offsets):
    f = mha_copy / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["model.norm.weight"]["data_offsets"] = offsets
    raw = json.dumps(header).encode()
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(ValueError, match="truncated or corrupt.*'model.norm.weight' has "
                                         "data_offsets.*must hold integers >= 0"):
        load_model(mha_copy, torch.float32, "cpu")


@pytest.mark.parametrize("field,first_bad", [
    ("intermediate_size", "model.layers.0.mlp.gate_proj.weight has shape [128, 64] in the "
                          "checkpoint but config.json implies [256, 64]"),
    ("hidden_size", "model.embed_tokens.weight has shape [384, 64] in the checkpoint but "
                    "config.json implies [384, 128]"),
])
def test_shape_mismatch_names_first_key_and_both_shapes(mha_copy, field, first_bad):
    cfg = json.loads((mha_copy / "config.json").read_text())
    _edit_config(mha_copy, **{field: cfg[field] * 2})
    with pytest.raises(ValueError, match="weights do not match config.json") as info:
        load_model(mha_copy, torch.float32, "cpu")
    assert first_bad in str(info.value) and "\n" not in str(info.value)


def test_missing_key(mha_copy):
    tensors = load_file(mha_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, mha_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight is missing"):
        load_model(mha_copy, torch.float32, "cpu")


def test_unexpected_key(mha_copy):
    tensors = load_file(mha_copy / "model.safetensors")
    tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, mha_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected key model.layers.9.mlp.up_proj.weight"):
        load_model(mha_copy, torch.float32, "cpu")


def test_fewer_layers_in_config_is_an_unexpected_key(mha_copy):
    _edit_config(mha_copy, num_hidden_layers=1)
    with pytest.raises(ValueError, match="unexpected key model.layers.1"):
        load_model(mha_copy, torch.float32, "cpu")


def test_missing_shard(sharded_ckpt, tmp_path):
    ckpt = shutil.copytree(sharded_ckpt, tmp_path / "ckpt")
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard '{shard.name}'.*missing"):
        load_model(ckpt, torch.float32, "cpu")


def test_corrupt_index(sharded_ckpt, tmp_path):
    ckpt = shutil.copytree(sharded_ckpt, tmp_path / "ckpt")
    (ckpt / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        load_model(ckpt, torch.float32, "cpu")


# --- random models ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_tiny_model(dtype):
    model = random_model("tiny", dtype, "cpu", seed=3)
    cfg = MODEL_SHAPES["tiny"]
    assert all(p.dtype == dtype and not p.is_meta for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.norm.weight, torch.ones(cfg.hidden_size, dtype=dtype))
    w = model.model.layers[0].mlp.up_proj.weight.float()
    assert abs(w.std().item() - 0.02) < 0.002
    again = random_model("tiny", dtype, "cpu", seed=3)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(random_model("tiny", dtype, "cpu", seed=4).lm_head.weight,
                           model.lm_head.weight)
    with torch.no_grad():
        logits = model.forward_dense(torch.randint(0, cfg.vocab_size, (1, 16)))
    assert logits.shape == (1, 16, cfg.vocab_size) and torch.isfinite(logits).all()


def test_random_model_from_config_ties_weights():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      tie_word_embeddings=True)
    model = random_model(cfg, torch.float32, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_unknown_shape_lists_known_names():
    with pytest.raises(ValueError, match="llama2-7b.*tiny"):
        random_model("llama9-1t", torch.float32, "cpu")


def _meta_numel(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())   # tied weights count once


def _llama_param_count(cfg: ModelConfig) -> int:
    h, i, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q_o = 2 * h * cfg.num_attention_heads * cfg.head_dim
    k_v = 2 * h * cfg.num_key_value_heads * cfg.head_dim
    per_layer = q_o + k_v + 3 * h * i + 2 * h
    return L * per_layer + h + V * h * (1 if cfg.tie_word_embeddings else 2)


@pytest.mark.parametrize("name,billions", [("llama2-7b", 6.74), ("llama2-13b", 13.016),
                                           ("llama3.1-8b", 8.03), ("llama3.2-1b", 1.24)])
def test_real_shapes_parameter_counts(name, billions):
    cfg = MODEL_SHAPES[name]
    n = _meta_numel(cfg)
    assert n == _llama_param_count(cfg)
    assert abs(n / 1e9 - billions) < 0.01
    if name == "llama2-7b":
        assert n == 6_738_415_616
        assert cfg.kv_bytes_per_token(2) == 512 * 1024
    if name == "llama3.1-8b":
        assert cfg.kv_bytes_per_token(2) == 128 * 1024
        assert cfg.eos_token_ids == (128001, 128008, 128009) and cfg.bos_token_id == 128000
        assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.torch_dtype == "bfloat16"


# --- device and dtype names ------------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("fp32", torch.float32),
                                        ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                        ("float16", torch.float16), ("FP16", torch.float16)])
def test_resolve_dtype_names(name, dtype):
    assert resolve_dtype(name, MODEL_SHAPES["llama2-7b"], CPU) == dtype


def test_resolve_dtype_auto_is_fp32_on_cpu():
    assert resolve_dtype("auto", MODEL_SHAPES["llama3.1-8b"], CPU) == torch.float32


def test_resolve_dtype_unknown():
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", MODEL_SHAPES["tiny"], CPU)


def test_resolve_dtype_auto_rejects_an_unknown_torch_dtype_on_cuda():
    """Never a guess (it once became float16 on CUDA); the error names the field and the fix.
    On the CPU auto is float32 whatever the checkpoint says, as --dtype's help promises."""
    cfg = dataclasses.replace(MODEL_SHAPES["tiny"], torch_dtype="float8")
    with pytest.raises(ValueError, match="config.json: torch_dtype='float8' is not float32, "
                                         "bfloat16 or float16.*pass --dtype"):
        resolve_dtype("auto", cfg, torch.device("cuda"))
    assert resolve_dtype("float16", cfg, torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", cfg, CPU) == torch.float32


def test_resolve_dtype_auto_follows_the_checkpoint_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    cfg = dataclasses.replace(MODEL_SHAPES["tiny"], torch_dtype="torch.bfloat16")
    assert resolve_dtype("auto", cfg, torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("checkpoint, capability, expected", [
    ("bfloat16", (7, 5), torch.float16),       # T4: no native bf16
    ("bfloat16", (6, 0), torch.float16),
    ("bfloat16", (9, 0), torch.bfloat16),
    ("float16", (7, 5), torch.float16),
    ("float32", (7, 5), torch.float32),
])
def test_resolve_dtype_auto_before_ampere(checkpoint, capability, expected, monkeypatch):
    """A bfloat16 checkpoint on a GPU before Ampere (compute capability < 8.0) runs in float16;
    other checkpoint dtypes, and bfloat16 on newer GPUs, are kept. An explicit dtype is never
    changed. (The capability is faked: no GPU needed.)"""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    cfg = dataclasses.replace(MODEL_SHAPES["tiny"], torch_dtype=checkpoint)
    assert resolve_dtype("auto", cfg, torch.device("cuda")) == expected
    assert resolve_dtype("bfloat16", cfg, torch.device("cuda")) == torch.bfloat16


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_resolve_device_cuda_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available; use --device cpu"):
        resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_on_cuda_and_auto_dtype(gqa_llama3_ckpt):
    device = resolve_device("auto")
    cfg = ModelConfig.from_hf(gqa_llama3_ckpt)
    assert resolve_dtype("auto", cfg, device) == torch.float32     # the checkpoint's dtype
    model = load_model(gqa_llama3_ckpt, torch.bfloat16, device)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.device.type == "cuda"
