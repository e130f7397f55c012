"""Configuration: the model's shape (from a Hugging Face config.json) and the engine's options.

`EngineConfig` is the single source of defaults. Its fields carry their help text, and every
command-line tool builds its flags from them with `EngineConfig.add_cli_flags`, so no default is
typed twice.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL_DIR = str(Path(__file__).resolve().parent.parent / "weights" / "apex-tiny-llama")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ACTIVATIONS = ("silu", "swish")      # transformers' two names for SiLU
# The fields each supported rope_type needs (transformers' names), all numbers > 0.
ROPE_TYPE_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
SUPPORTED_ROPE_TYPES = tuple(ROPE_TYPE_FIELDS)


def rope_type_of(scaling: dict) -> str:
    """A rope_scaling's type: transformers writes `rope_type`, older configs `type`."""
    return scaling.get("rope_type") or scaling.get("type") or "default"


def _is_positive_number(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_eos_ids(value, where: str) -> tuple[int, ...]:
    """An `eos_token_id` field (config.json's or generation_config.json's): one token id, a list
    of them, or null (none). Anything else is a ValueError naming `where`, the file."""
    ids = () if value is None else tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not all(_is_token_id(i) for i in ids):
        raise ValueError(f"{where}: eos_token_id={value!r} must be a token id (an integer >= 0), "
                         "a list of token ids, or null")
    return ids


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a LLaMA-family model, with Hugging Face's field names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim",
                 "max_position_embeddings")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config.json: {name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.json: num_attention_heads={self.num_attention_heads} is not "
                             f"a multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"config.json: head_dim={self.head_dim} must be even (RoPE rotates "
                             "pairs)")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_positive_number(value):
                raise ValueError(f"config.json: {name}={value!r} must be a JSON number > 0")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"config.json: {name}={value!r} must be a JSON boolean, true "
                                 "or false")
        if not (self.bos_token_id is None or _is_token_id(self.bos_token_id)):
            raise ValueError(f"config.json: bos_token_id={self.bos_token_id!r} must be a token id "
                             "(an integer >= 0) or null")
        parse_eos_ids(self.eos_token_id, "config.json")
        if not isinstance(self.torch_dtype, str):
            raise ValueError(f"config.json: torch_dtype={self.torch_dtype!r} must be a dtype "
                             'name such as "bfloat16"')

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return parse_eos_ids(self.eos_token_id, "config.json")

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """KV bytes one token takes across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize

    @classmethod
    def from_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        """The config from config.json's fields. A field that is missing or null takes its
        default; a field of the wrong type or with a value apex_mini cannot run is a ValueError
        that names it."""
        def get(key: str, default=None):
            value = hf.get(key)
            return default if value is None else value

        archs = get("architectures", [])
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ValueError(f"config.json: architectures={archs!r} must be a list of class "
                             'names, such as ["LlamaForCausalLM"]')
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ValueError(
                f"unsupported architecture {archs[0]!r} in config.json; apex_mini runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints only"
            )
        if not archs and get("model_type", "llama") != "llama":
            raise ValueError(
                f"unsupported model_type {hf['model_type']!r} in config.json; apex_mini runs "
                "LLaMA-family checkpoints only"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if hf.get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks required fields: {', '.join(missing)}")
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim",
                  "max_position_embeddings"):
            value = hf.get(k)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"config.json: {k}={value!r} must be a positive integer")
        hidden_act = get("hidden_act", "silu")
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act={hidden_act!r} is not supported; "
                             'apex_mini\'s MLP implements SiLU only ("silu")')
        n_heads = hf["num_attention_heads"]
        rope_scaling, rope_theta = _rope_fields(hf)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=get("num_key_value_heads", n_heads),
            head_dim=get("head_dim", hf["hidden_size"] // n_heads if n_heads else 0),
            max_position_embeddings=get("max_position_embeddings", 4096),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=get("tie_word_embeddings", False),
            attention_bias=get("attention_bias", False),
            mlp_bias=get("mlp_bias", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            torch_dtype=get("torch_dtype") or get("dtype", "float32"),
        )

    @classmethod
    def from_hf(cls, model_dir: str | os.PathLike) -> "ModelConfig":
        """Read `<model_dir>/config.json`."""
        path = Path(model_dir)
        if path.is_file():
            raise ValueError(f"{str(path)!r} is a file; pass --model the folder that holds "
                             "config.json and *.safetensors")
        if not path.is_dir():
            raise FileNotFoundError(
                f"model directory {str(path)!r} does not exist; pass --model with a folder that "
                "holds config.json and *.safetensors"
            )
        cfg = path / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(
                f"{str(cfg)!r} not found; a model folder needs a Hugging Face config.json"
            )
        try:
            hf = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(cfg)!r} is not valid JSON ({e}); re-save the checkpoint") from e
        if not isinstance(hf, dict):
            raise ValueError(f"{str(cfg)!r} holds a JSON {type(hf).__name__}, not an object of "
                             "config fields; re-save the checkpoint")
        return cls.from_dict(hf)


def _rope_fields(hf: dict[str, Any]) -> tuple[dict | None, Any]:
    """(rope_scaling, rope_theta) from config.json, rope_scaling None for plain RoPE.
    transformers v5 writes `rope_parameters` instead of `rope_scaling`, with rope_theta inside
    it; a missing or null rope_theta is 10000."""
    # An empty or null rope_scaling defers to rope_parameters; any other value is checked.
    name = "rope_scaling" if hf.get("rope_scaling") not in (None, {}) else "rope_parameters"
    scaling = hf.get(name)
    theta = hf.get("rope_theta")
    if scaling is None:
        return None, 10000.0 if theta is None else theta
    if not isinstance(scaling, dict):
        raise ValueError(f"config.json: {name}={scaling!r} must be an object such as "
                         '{"rope_type": "linear", "factor": 2.0}, or null')
    if theta is None:
        theta = scaling.get("rope_theta")
        theta = 10000.0 if theta is None else theta
    rope_type = rope_type_of(scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported {name} type {rope_type!r} in config.json; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    needed = ROPE_TYPE_FIELDS[rope_type]
    missing = [key for key in needed if key not in scaling]
    if missing:
        raise ValueError(f"config.json: {name} of type {rope_type!r} lacks {', '.join(missing)}; "
                         f"{rope_type} scaling needs {', '.join(needed)}")
    for key in needed:
        if not _is_positive_number(scaling[key]):
            raise ValueError(f"config.json: {name}.{key}={scaling[key]!r} must be a JSON "
                             "number > 0")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"config.json: {name}.high_freq_factor={scaling['high_freq_factor']!r} "
                         f"must be greater than low_freq_factor={scaling['low_freq_factor']!r}")
    return (None if rope_type == "default" else dict(scaling)), theta


def _check_type(name: str, value, annotation: str) -> None:
    """ValueError unless `value` suits its field's annotation ("int", "float | None", ...):
    integers for int (not bools), finite numbers for float, True/False for bool."""
    if value is None and annotation.endswith("| None"):
        return
    kind = annotation.split(" |")[0]
    if kind == "int":
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind == "float":
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
              and math.isfinite(value))
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        what = {"int": "an integer", "float": "a finite number", "bool": "True or False",
                "str": "a string"}[kind]
        raise ValueError(f"{name}={value!r} must be {what}")


def _flag(default, help: str, choices=None, **extra):
    return field(default=default, metadata={"help": help, "choices": choices, **extra})


POLICIES = ("auto", "gpu-only", "static", "neo", "apex")


@dataclass
class EngineConfig:
    """Every engine option, with its default and help. `LLM(model, **options)` takes these."""

    device: str = _flag("auto", "where weights and linear layers run: auto (cuda if present), "
                        "cpu, cuda or cuda:N")
    dtype: str = _flag("auto", "weight and activation dtype: auto (the checkpoint's on GPU, float32 "
                       "on CPU), float32, bfloat16, float16",
                       choices=("auto", "float32", "bfloat16", "float16"))
    policy: str = _flag("auto", "scheduling policy: auto (apex with a GPU, gpu-only without), "
                        "gpu-only, static, neo, apex", choices=POLICIES)
    cpu_fraction: float = _flag(0.5, "static policy: share of running requests whose KV lives in "
                                "host memory (0..1)")
    block_size: int = _flag(16, "tokens per KV-cache block")
    gpu_kv_blocks: int | None = _flag(None, "device KV-cache blocks (default: sized from free "
                                      "GPU memory; on a CPU, from --gpu-memory-gb minus the "
                                      "weights, else a fixed 1 GiB)")
    gpu_memory_gb: float | None = _flag(None, "cap on device memory for weights plus KV cache, in GiB, "
                                        "to emulate a smaller GPU (default: no cap)")
    cpu_kv_blocks: int | None = _flag(None, "host KV-cache blocks (default: from --cpu-kv-gb)")
    cpu_kv_gb: float = _flag(2.0, "host memory for the KV cache, in GiB, when --cpu-kv-blocks is unset")
    max_num_seqs: int = _flag(256, "most requests running at once")
    max_num_batched_tokens: int = _flag(2048, "token budget of one iteration; longer prompts are "
                                        "prefilled in chunks")
    max_model_len: int | None = _flag(None, "longest prompt plus output, in tokens (default: the "
                                      "model's max_position_embeddings)")
    cpu_threads: int = _flag(1, "worker threads for CPU attention. Each layer's host work is "
                             "one task (two at once only when pipelining) whose torch ops get "
                             "(torch threads - 1) // cpu_threads threads, so 1 gives it every one "
                             "but the main thread's")
    compile_cpu_attention: bool = _flag(True, "torch.compile the CPU attention kernel (env "
                                        "APEX_MINI_EAGER_CPU_ATTENTION=1 forces eager)")
    cuda_graphs: bool = _flag(True, "capture the device part of decode steps in CUDA graphs")
    bucket_decode: bool = _flag(True, "pad decode batches to power-of-two sizes so static shapes "
                                "can be reused")
    compile_decode: bool = _flag(False, "torch.compile the decode step's device forward (pays "
                                 "for long runs; the first steps of each shape compile, ~10-30 "
                                 "s; on the CPU batches past 4 rows run eager, on a second "
                                 "weight copy)")
    prepack_weights: bool = _flag(True, "CPU: the decode step multiplies by a copy of the weights "
                                  "laid out for its products, oneDNN-packed when eager, "
                                  "transposed when compiled (faster; as much memory again as "
                                  "the weights)")
    latency_margin: float = _flag(0.1, "apex: allowed per-token slowdown over the GPU-only plan "
                                  "(0.1 = 10%)")
    predictor_feedback: bool = _flag(True, "scale the profile's predictions by the engine's own "
                                     "recent measured iterations (apex, neo)")
    max_records: int = _flag(100_000, "iteration records the engine keeps for reports; when "
                             "full, the older half is dropped (memory stays bounded)")
    profile_path: str | None = _flag(None, "profile JSON for the predictor of the apex and neo "
                                     "policies (the others have none): used if it was "
                                     "measured for this model, machine and options (else an "
                                     "error: it is never overwritten), measured and saved there "
                                     "if it does not exist (default: a cached profile for this "
                                     "model and machine, measured again when stale)")
    seed: int = _flag(0, "seed for requests that give none")

    def __post_init__(self) -> None:
        if isinstance(self.profile_path, os.PathLike):
            self.profile_path = os.fspath(self.profile_path)
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), str(f.type))
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(
                    f"{f.name}={getattr(self, f.name)!r} is not one of {', '.join(choices)}"
                )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device={self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if not 0.0 <= self.cpu_fraction <= 1.0:
            raise ValueError(f"cpu_fraction={self.cpu_fraction} must be between 0 and 1")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "cpu_threads",
                     "max_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("gpu_kv_blocks", "cpu_kv_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        for name in ("gpu_memory_gb", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be > 0 (or unset)")
        if self.cpu_kv_gb < 0:
            raise ValueError(f"cpu_kv_gb={self.cpu_kv_gb} must be >= 0")
        if self.latency_margin < 0:
            raise ValueError(f"latency_margin={self.latency_margin} must be >= 0")

    def context_length(self, mc: ModelConfig) -> int:
        """Longest prompt plus output: `max_model_len`, or the model's own context when unset. A
        longer `max_model_len` than the model's positions is a ValueError, not a quiet cut."""
        most = mc.max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > most:
            raise ValueError(f"--max-model-len {self.max_model_len} is longer than the model's "
                             f"context ({most} tokens, its max_position_embeddings); lower it or "
                             "leave it out")
        return self.max_model_len or most

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s): {', '.join(unknown)}; see EngineConfig")
        return cls(**kwargs)

    @classmethod
    def add_cli_flags(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """Add one `--flag` per field, with the field's default and help."""
        group = parser.add_argument_group("engine options")
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata["help"]
            if "(default:" not in help_text:                # some say what their default means
                help_text += f" (default: {f.default})"
            help_text = help_text.replace("%", "%%")
            if f.type in ("bool", bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                   help=help_text)
            else:
                kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(
                    str(f.type), str)
                group.add_argument(flag, type=kind, default=f.default, help=help_text,
                                   choices=f.metadata.get("choices"))

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "EngineConfig":
        """The engine options among `args`. A None for an option that cannot be None is a
        tool's own flag of the same name (generate's sampling --seed): the option keeps its
        default."""
        optional = {f.name: str(f.type).endswith("| None") for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in vars(args).items()
                          if k in optional and (v is not None or optional[k])})
        except ValueError as e:      # "max_num_seqs=0 must ..." -> "--max-num-seqs 0 must ..."
            field = re.match(r"(\w+)=", str(e))
            if field is None or field[1] not in optional:
                raise
            flag = "--" + field[1].replace("_", "-")
            raise ValueError(f"{flag} {str(e)[field.end():]}") from None
