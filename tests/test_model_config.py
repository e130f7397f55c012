"""ModelConfig from config.json, and the eos ids of generation_config.json: a malformed field
is a ValueError that names the file and the field and says what is expected, never a
traceback from deep inside the model, nor a value silently taken for another."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from apex_mini.cli import run_cli
from apex_mini.config import DEFAULT_MODEL_DIR, EngineConfig, ModelConfig
from apex_mini.engine import CPU_DEVICE_KV_BYTES
from apex_mini.generate import main as generate_main
from apex_mini.tokenizer import Tokenizer

SHIPPED = Path(DEFAULT_MODEL_DIR)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def shipped_config(**changes) -> dict:
    """The shipped model's config.json with `changes` (None: the field is null)."""
    return {**json.loads((SHIPPED / "config.json").read_text()), **changes}


@pytest.mark.parametrize("changes,message", [
    (dict(rope_scaling={"type": "linear"}),
     "rope_scaling of type 'linear' lacks factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8}),
     "lacks low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    (dict(rope_scaling={"type": "linear", "factor": "2"}),
     r"rope_scaling.factor='2' must be a JSON number > 0"),
    (dict(rope_scaling={"type": "linear", "factor": -2.0}), r"rope_scaling.factor=-2.0 must be"),
    (dict(rope_scaling={"type": "linear", "factor": 0}), r"rope_scaling.factor=0 must be"),
    (dict(rope_scaling=dict(LLAMA3_SCALING, high_freq_factor=1.0)),
     "high_freq_factor=1.0 must be greater than low_freq_factor=1.0"),
    (dict(rope_scaling=[1, 2]), r"rope_scaling=\[1, 2\] must be an object"),
    (dict(rope_scaling="linear"), "rope_scaling='linear' must be an object"),
    (dict(rope_scaling=False), "rope_scaling=False must be an object"),
    (dict(rope_scaling=[]), r"rope_scaling=\[\] must be an object"),
    (dict(rope_parameters=5), "rope_parameters=5 must be an object"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps='1e-5' must be a JSON number > 0"),
    (dict(rms_norm_eps=0), "rms_norm_eps=0 must be a JSON number > 0"),
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps=-1e-05 must be"),
    (dict(rope_theta="abc"), "rope_theta='abc' must be a JSON number > 0"),
    (dict(rope_theta=0), "rope_theta=0 must be a JSON number > 0"),
    (dict(architectures="LlamaForCausalLM"),
     r"architectures='LlamaForCausalLM' must be a list of class names"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings='false' must be a JSON boolean"),
    (dict(attention_bias=1), "attention_bias=1 must be a JSON boolean"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported.*SiLU only"),
    (dict(num_key_value_heads=0), "num_key_value_heads=0 must be a positive integer"),
    (dict(head_dim=0), "head_dim=0 must be a positive integer"),
    (dict(num_attention_heads=None), "lacks required fields: num_attention_heads"),
    (dict(eos_token_id="2"), "eos_token_id='2' must be a token id"),
    (dict(eos_token_id=[2, -1]), r"eos_token_id=\[2, -1\] must be a token id"),
    (dict(bos_token_id=True), "bos_token_id=True must be a token id"),
    (dict(torch_dtype=16), "torch_dtype=16 must be a dtype name"),
])
def test_bad_field_names_file_and_field(changes, message):
    with pytest.raises(ValueError, match=message) as info:
        ModelConfig.from_dict(shipped_config(**changes))
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("changes,expected", [
    (dict(rms_norm_eps=None), dict(rms_norm_eps=1e-6)),
    (dict(rope_theta=None), dict(rope_theta=10000.0)),
    (dict(rope_theta=500000), dict(rope_theta=500000)),
    (dict(num_key_value_heads=None), dict(num_key_value_heads=8)),
    (dict(head_dim=None), dict(head_dim=32)),
    (dict(hidden_act="swish"), {}),
    (dict(tie_word_embeddings=True), dict(tie_word_embeddings=True)),
    (dict(eos_token_id=[2, 7]), dict(eos_token_id=[2, 7])),
    (dict(rope_scaling={"type": "linear", "factor": 2}),
     dict(rope_scaling={"type": "linear", "factor": 2})),
    (dict(rope_scaling=LLAMA3_SCALING), dict(rope_scaling=LLAMA3_SCALING)),
    (dict(rope_scaling={"rope_type": "default"}), dict(rope_scaling=None)),
    (dict(rope_scaling={}), dict(rope_scaling=None)),
    # a null rope_type defers to the older `type`, as in transformers
    (dict(rope_scaling={"rope_type": None, "type": "linear", "factor": 2}),
     dict(rope_scaling={"rope_type": None, "type": "linear", "factor": 2})),
    # transformers v5: rope_parameters, with rope_theta inside it
    (dict(rope_scaling=None, rope_theta=None,
          rope_parameters=dict(LLAMA3_SCALING, rope_theta=500000.0)),
     dict(rope_theta=500000.0)),
])
def test_missing_or_null_fields_take_defaults_and_valid_ones_pass(changes, expected):
    cfg = ModelConfig.from_dict(shipped_config(**changes))
    for name, value in expected.items():
        assert getattr(cfg, name) == value


def test_bad_config_on_the_command_line_is_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(shipped_config(rope_scaling={"type": "linear"})))
    for name in ("tokenizer.model", "generation_config.json", "model.safetensors"):
        (model / name).symlink_to(SHIPPED / name)
    code = run_cli(lambda: generate_main(["--model", str(model), "--device", "cpu",
                                          "--max-new-tokens", "2"]))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "rope_scaling of type 'linear' lacks factor" in err


# --- generation_config.json ------------------------------------------------------------------

def _tokenizer_folder(tmp_path: Path, generation_config: str) -> Path:
    (tmp_path / "tokenizer.model").symlink_to(SHIPPED / "tokenizer.model")
    (tmp_path / "generation_config.json").write_text(generation_config)
    return tmp_path


@pytest.mark.parametrize("text,message", [
    ("[1]", "generation_config.json' holds a JSON list, not an object of fields"),
    ('{"eos_token_id": "x"}', r"generation_config.json': eos_token_id='x' must be a token id"),
    ('{"eos_token_id": [2, null]}', r"eos_token_id=\[2, None\] must be a token id"),
])
def test_bad_generation_config(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_dir(_tokenizer_folder(tmp_path, text))


def test_generation_config_eos_list_is_merged(tmp_path):
    tok = Tokenizer.from_dir(_tokenizer_folder(tmp_path, '{"eos_token_id": [2, 7]}'))
    assert tok.eos_ids == (2, 7)


# --- engine options --------------------------------------------------------------------------

def test_gpu_kv_blocks_help_tells_the_cpu_default():
    help_text = next(f.metadata["help"] for f in EngineConfig.__dataclass_fields__.values()
                     if f.name == "gpu_kv_blocks")
    assert CPU_DEVICE_KV_BYTES == 1 << 30
    assert "free GPU memory" in help_text and "on a CPU, from --gpu-memory-gb" in help_text
    assert "else a fixed 1 GiB" in help_text
