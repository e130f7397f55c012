"""Weights: load a Hugging Face safetensors checkpoint (single file or shards), or make random
weights of a named shape.

Both build the model on the 'meta' device first, so no fp32 copy of a 7B model is ever made,
then allocate it once in the target dtype on the target device. Loading then copies one tensor
at a time out of the memory-mapped file (`copy_` converts the dtype), so at most one checkpoint
tensor is in host memory beside the model.

Every check that can be made from the files' headers (corruption, missing or unexpected keys,
shapes) runs before the first byte of tensor data is read: a bad 13 GB checkpoint fails in
milliseconds, not after minutes of loading.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .config import ModelConfig
from .model import LlamaForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROGRESS_MIN_BYTES = 500_000_000  # auto progress bar above this much tensor data

# Keys some checkpoints carry that we recompute instead (old HF Llama saves stored RoPE's
# inv_freq per layer).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

MODEL_SHAPES: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, torch_dtype="float16"),
    "llama2-13b": ModelConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, head_dim=128,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, torch_dtype="float16"),
    "llama3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_SCALING), bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16"),
    "llama3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_SCALING, factor=32.0), tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16"),
    # For tests and notebooks: GQA, runs anywhere in milliseconds.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32"),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# device and dtype names
# ---------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if present, else cpu. Asking for cuda without one is an error, not a
    silent fallback: a benchmark run on the wrong device would report the wrong numbers."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available; use --device cpu")
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto' -> the checkpoint's dtype (config.json's torch_dtype) on CUDA and float32 on CPU
    (CPU half-precision matmuls are slow and less exact). A bfloat16 checkpoint on a GPU without
    native bf16 (before Ampere, e.g. the T4) runs in float16 instead. On CUDA, 'auto' with a
    torch_dtype other than float32, bfloat16 or float16 is an error, never a guess: pass the
    dtype to use."""
    key = name.strip().lower()
    if key == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        checkpoint_dtype = _DTYPES.get(cfg.torch_dtype.strip().lower().removeprefix("torch."))
        if checkpoint_dtype is None:
            raise ValueError(f"config.json: torch_dtype={cfg.torch_dtype!r} is not float32, "
                             "bfloat16 or float16, so dtype auto cannot follow it; pass --dtype "
                             "float32, bfloat16 or float16")
        if checkpoint_dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
            return torch.float16
        return checkpoint_dtype
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[key]


# ---------------------------------------------------------------------------------------------
# building on 'meta'
# ---------------------------------------------------------------------------------------------

def _allocate(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> LlamaForCausalLM:
    """An uninitialised model in `dtype` on `device`, never materialised anywhere else."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to(dtype=dtype)              # free on meta: only metadata changes
    model.to_empty(device=device)      # one allocation, contents undefined
    # to_empty gives every module its own new Parameter, which unties shared weights.
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # inv_freq is not in the checkpoint (non-persistent) and was just cast to `dtype` and
    # emptied: recompute it, in fp32.
    model.model.rotary_emb.reset_parameters_from(cfg)
    return model


def _finish(model: LlamaForCausalLM) -> LlamaForCausalLM:
    model.eval()
    model.requires_grad_(False)
    return model


def random_model(shape: str | ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 seed: int = 0) -> LlamaForCausalLM:
    """Random weights of a named shape (see MODEL_SHAPES) or of a given config: linear and
    embedding weights ~ N(0, 0.02), norms 1, biases 0. Deterministic for a seed and device."""
    if isinstance(shape, str):
        if shape not in MODEL_SHAPES:
            raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(MODEL_SHAPES)}")
        cfg = MODEL_SHAPES[shape]
    else:
        cfg = shape
    model = _allocate(cfg, dtype, device)
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():   # tied weights appear once
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return _finish(model)


# ---------------------------------------------------------------------------------------------
# safetensors checkpoints
# ---------------------------------------------------------------------------------------------

def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"{str(path)!r} is truncated or corrupt ({why}); re-download or re-save "
                      "the checkpoint")


def _read_header(path: Path) -> dict[str, tuple[list[int], int]]:
    """key -> (shape, data bytes), from a safetensors header, checked against the file size.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor data, with
    each tensor's `data_offsets` relative to the start of the data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise _corrupt(path, f"header length {n} does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(path, f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_bytes = size - 8 - n
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            shape, (begin, end) = list(info["shape"]), info["data_offsets"]
            itemsize = _ST_ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad header entry for {key!r}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in (begin, end, *shape)):
            raise _corrupt(path, f"tensor {key!r} has data_offsets {[begin, end]!r} and shape "
                                 f"{shape!r}, which must hold integers >= 0")
        if end > data_bytes:
            raise _corrupt(path, f"tensor {key!r} ends at byte {end} of the data, but the file "
                                 f"holds only {data_bytes} bytes of data")
        if end - begin != math.prod(shape) * itemsize:
            raise _corrupt(path, f"tensor {key!r} has {end - begin} bytes for shape {shape}")
        tensors[key] = (shape, end - begin)
    return tensors


def checkpoint_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: `model.safetensors`, or every shard that
    `model.safetensors.index.json` names."""
    root = Path(model_dir)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{str(index)!r} is not a valid safetensors index ({e!r}); "
                             "re-download or re-save the checkpoint") from None
        files = [root / name for name in names]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f.name!r} listed in {INDEX_FILE} is missing from "
                                        f"{str(root)!r}; re-download the checkpoint")
        return files
    single = root / SINGLE_FILE
    if single.is_file():
        return [single]
    hint = ""
    if any(root.glob("*.bin")) or any(root.glob("*.pth")):
        hint = " (found .bin/.pth weights: convert them with save_pretrained(safe_serialization=True))"
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(root)!r}{hint}; apex_mini "
                            "loads Hugging Face safetensors checkpoints")


def _check_keys(model: LlamaForCausalLM, found: dict[str, tuple[list[int], int, Path]]) -> None:
    """Every parameter present with the config's shape, nothing else. Errors name the first
    offender in model order, so the message points at the config field to fix."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    problems = []
    for name, p in params.items():
        if name not in found:
            if not (tied and name in ("lm_head.weight", "model.embed_tokens.weight")
                    and ({"lm_head.weight", "model.embed_tokens.weight"} & found.keys())):
                problems.append(f"{name} is missing from the checkpoint")
        elif list(p.shape) != found[name][0]:
            problems.append(f"{name} has shape {found[name][0]} in the checkpoint but "
                            f"config.json implies {list(p.shape)}")
    for key in found:
        if key not in params and not key.endswith(IGNORED_SUFFIXES):
            problems.append(f"unexpected key {key} in {found[key][2].name}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"weights do not match config.json: {problems[0]}{more}; use the "
                         "config.json that came with these weights")


def _check_tied_copy(found: dict[str, tuple[list[int], int, Path]]) -> None:
    """ValueError unless a tied checkpoint's stored lm_head equals its embedding."""
    def stored(key):
        with safe_open(found[key][2], framework="pt", device="cpu") as f:
            return f.get_tensor(key)
    if not torch.equal(stored("lm_head.weight"), stored("model.embed_tokens.weight")):
        raise ValueError("config.json sets tie_word_embeddings, but the checkpoint's "
                         "lm_head.weight differs from model.embed_tokens.weight; set "
                         "tie_word_embeddings to false to use the stored lm_head")


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype, device: torch.device | str,
               progress: bool | None = None) -> LlamaForCausalLM:
    """Load a LLaMA checkpoint in Hugging Face layout (config.json + safetensors) into `dtype`
    on `device`, in eval mode with gradients off. progress=None shows a bar for big models."""
    cfg = ModelConfig.from_hf(model_dir)
    files = checkpoint_files(model_dir)

    found: dict[str, tuple[list[int], int, Path]] = {}
    for path in files:
        for key, (shape, nbytes) in _read_header(path).items():
            found[key] = (shape, nbytes, path)
    model = _allocate(cfg, dtype, device)
    _check_keys(model, found)

    params = dict(model.named_parameters(remove_duplicate=False))
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in found:
        # One tensor serves both: a stored lm_head must be the embedding's copy (transformers
        # 4 and 5 load one that is not differently: the embedding wins, or the lm_head).
        if "lm_head.weight" in found:
            _check_tied_copy(found)
        found.pop("lm_head.weight", None)
    total = sum(nbytes for key, (_, nbytes, _) in found.items() if key in params)
    show = total > PROGRESS_MIN_BYTES if progress is None else progress
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show)
    with torch.no_grad(), bar:
        for path in files:
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for key in f.keys():
                        if key not in params or found.get(key, (0, 0, None))[2] != path:
                            continue   # ignored key, or the tied lm_head
                        params[key].copy_(f.get_tensor(key))   # converts dtype, and copies H2D
                        bar.update(found[key][1])
            except SafetensorError as e:
                raise _corrupt(path, str(e).splitlines()[0]) from None
    return _finish(model)


def config_for(model_dir: str | None, shape: str | None) -> ModelConfig | None:
    """The ModelConfig `model_for` would load, read before any weights are (a tool checks its
    flags against it first); None where there is none to read (`model_for` says why)."""
    from .config import DEFAULT_MODEL_DIR
    if shape in MODEL_SHAPES:
        return MODEL_SHAPES[shape]
    if Path(model_dir or DEFAULT_MODEL_DIR, "config.json").is_file():
        return ModelConfig.from_hf(model_dir or DEFAULT_MODEL_DIR)
    return None


def model_for(model_dir: str | None, shape: str | None, dtype_name: str, device: torch.device,
              seed: int = 0) -> tuple[LlamaForCausalLM, str]:
    """(model, a name for it) from a checkpoint folder or, for `shape`, random weights of a
    named shape; the shipped default model when neither is given. The benchmarks and the
    profiler share this (their --model / --model-shape flags)."""
    from .config import DEFAULT_MODEL_DIR
    if model_dir and shape:
        raise ValueError("give --model or --model-shape, not both")
    if shape:
        if shape not in MODEL_SHAPES:
            raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(MODEL_SHAPES)}")
        dtype = resolve_dtype(dtype_name, MODEL_SHAPES[shape], device)
        return random_model(shape, dtype, device, seed=seed), shape
    path = model_dir or DEFAULT_MODEL_DIR
    if not model_dir and not Path(path).is_dir():
        raise FileNotFoundError(f"the default model {path!r} is missing; pass --model DIR or "
                                "--model-shape tiny")
    dtype = resolve_dtype(dtype_name, ModelConfig.from_hf(path), device)
    return load_model(path, dtype, device), Path(path).name
