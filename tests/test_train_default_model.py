"""The default-model training script, end to end in its --quick mode (a tiny corpus, model and
step count), run once as a subprocess exactly as a user would run it; and its bad input: one line
on stderr, exit status 2, no traceback, before any work."""
from __future__ import annotations

import importlib.util
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
    """The run reports a finite held-out perplexity, and checks the saved files against
    transformers whenever transformers is installed (the [test] extra installs it): a skipped or
    broken check must fail here, not pass unnoticed. Without transformers it says so."""
    out, stdout = quick_run
    ppl = float(re.search(r"held-out perplexity: ([0-9.e+-]+|nan|inf)", stdout).group(1))
    assert math.isfinite(ppl) and ppl > 1.0
    parity = re.search(r"max \|logit difference\| ([0-9.e+-]+)", stdout)
    if importlib.util.find_spec("transformers") is None:
        assert parity is None and "transformers parity: skipped" in stdout, stdout[-2000:]
        return
    assert parity, stdout[-2000:]
    assert float(parity.group(1)) < 1e-4
    assert "not checked" not in (out / "README.md").read_text()


# ------------------------------------------------------------------------------- bad input

def no_work(*args, **kwargs):
    raise AssertionError("the run started before its options were checked")


@pytest.fixture
def train_cli(monkeypatch, capsys):
    """Run the CLI in this process, failing if it gets as far as building the corpus; torch's
    thread count and RNG are left as they were."""
    from apex_mini import train_default_model as tdm

    monkeypatch.setattr(tdm, "build_corpus", no_work)
    monkeypatch.setattr(tdm, "train_tokenizer", no_work)

    def run(argv):
        threads = torch.get_num_threads()
        with torch.random.fork_rng():
            code = tdm.main(argv)
        torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return code, out, err
    return run


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]

def test_the_stories_articles_agree_with_their_nouns():
    """The model learns "an owl" and "a boy" from the corpus alone: no "a" before a vowel."""
    import re
    from apex_mini.stories import build_corpus
    train, val = build_corpus(3000, 0.01, seed=0)
    text = "\n".join(train + val)
    assert re.search(r"\ban [aeiou]", text)
    assert not re.findall(r"\ba [aeiou]\w*", text)



@pytest.mark.parametrize("flag, value", [
    ("--threads", "0"), ("--threads", "-1"),
    ("--num-attention-heads", "0"),
    ("--num-key-value-heads", "0"), ("--num-key-value-heads", "3"),     # 8 query heads
    ("--hidden-size", "0"), ("--hidden-size", "65"),                     # not a multiple of 8 heads
    ("--hidden-size", "72"),                                             # head size 9: odd, no RoPE
    ("--intermediate-size", "0"), ("--num-hidden-layers", "0"),
    ("--num-stories", "0"), ("--num-stories", "1"),
    ("--val-fraction", "2"), ("--val-fraction", "0"), ("--val-fraction", "1"),
    ("--val-fraction", "-0.5"), ("--val-fraction", "nan"),
    ("--vocab-size", "10"), ("--vocab-size", "300"),
    ("--seq-len", "0"), ("--seq-len", "2048"),                           # > max positions 1024
    ("--max-position-embeddings", "0"), ("--batch-size", "0"),
    ("--minutes", "0"), ("--minutes", "-1"), ("--minutes", "inf"),
    ("--max-steps", "-1"), ("--seed", "-1"),
    ("--lr", "0"), ("--lr", "nan"), ("--min-lr-ratio", "1.5"), ("--min-lr-ratio", "-0.1"),
    ("--warmup-steps", "-1"), ("--weight-decay", "-0.1"), ("--grad-clip", "0"),
    ("--max-mb", "0"), ("--eval-every", "0"),
])
def test_bad_flag_is_one_line_and_exit_2(flag, value, train_cli, tmp_path):
    code, out, err = train_cli(["--out", str(tmp_path / "model"), flag, value])
    assert code == 2
    assert one_error_line(err).startswith(f"error: {flag} "), err
    assert out == ""
    assert not (tmp_path / "model").exists()


def test_quick_checks_its_own_small_values(train_cli, tmp_path):
    """--quick gives 4 query and 2 key/value heads: 3 query heads do not fit them."""
    code, _, err = train_cli(["--quick", "--out", str(tmp_path / "m"), "--num-attention-heads", "3"])
    assert code == 2
    line = one_error_line(err)
    assert "--num-key-value-heads 2" in line and "--quick" in line


def test_few_stories_are_not_an_error_by_themselves(train_cli, tmp_path):
    """The checks pass a small valid run: it gets as far as building the corpus."""
    with pytest.raises(AssertionError, match="started before"):
        train_cli(["--quick", "--out", str(tmp_path / "m"), "--num-stories", "2",
                   "--val-fraction", "0.5", "--warmup-steps", "0"])


@pytest.mark.parametrize("case", ["file", "under-a-file"])
def test_out_must_be_a_writable_folder(case, train_cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker if case == "file" else blocker / "model"
    code, _, err = train_cli(["--out", str(out)])
    assert code == 2
    assert one_error_line(err).startswith(f"error: --out {out}"), err
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("case", ["readme", "config", "other-checkpoint", "save-pretrained"])
def test_out_with_files_of_another_kind_is_refused(case, train_cli, tmp_path):
    """A folder holding a README.md or config.json (or a checkpoint this script did not write:
    with its own README, or none, as `save_pretrained` leaves it) is refused, and nothing in it
    is touched."""
    out = tmp_path / "project"
    out.mkdir()
    if case == "readme":
        (out / "README.md").write_text("# my project\n")
    elif case == "config":
        (out / "config.json").write_text('{"name": "my app"}')
    else:
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(b"weights")
        if case == "other-checkpoint":
            (out / "README.md").write_text("---\nlicense: llama2\n---\n# Llama 2\n")
    before = snapshot(out)
    code, out_text, err = train_cli(["--quick", "--out", str(out)])
    assert code == 2 and out_text == ""
    line = one_error_line(err)
    assert line.startswith(f"error: --out {out} holds ") and "give another folder" in line
    assert snapshot(out) == before


def test_out_may_be_a_checkpoint_this_script_wrote(train_cli, tmp_path):
    """Retraining into a folder of ours (the shipped model's, or a scratch one) is allowed: the
    checks pass and the run starts."""
    from apex_mini.config import DEFAULT_MODEL_DIR
    from apex_mini.train_default_model import check_out_folder

    check_out_folder(DEFAULT_MODEL_DIR)                  # the default full run's --out
    out = tmp_path / "ours"
    out.mkdir()
    for name in ("config.json", "README.md"):              # as a run writes them
        (out / name).write_text((Path(DEFAULT_MODEL_DIR) / name).read_text())
    (out / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(AssertionError, match="started before"):
        train_cli(["--quick", "--out", str(out)])


@pytest.mark.parametrize("flag, value", [("--amp", "yes"), ("--save-dtype", "float16")])
def test_amp_and_save_dtype_are_choices(flag, value, train_cli, capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli([flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    line = one_error_line(err)                   # no usage block above it
    assert f"argument {flag}: invalid choice: '{value}'" in line and line.endswith("see --help")


def test_vocab_too_large_for_the_corpus_is_one_line(monkeypatch, tmp_path, capsys):
    """Only sentencepiece knows how many pieces a corpus yields: its complaint, a second into
    the run, still becomes one line naming the flag."""
    from apex_mini import train_default_model as tdm

    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        code = tdm.main(["--quick", "--out", str(tmp_path / "m"), "--num-stories", "3",
                         "--vocab-size", "5000", "--threads", str(threads)])
    torch.set_num_threads(threads)
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --vocab-size 5000 is too large") and "--num-stories" in line
    assert not (tmp_path / "m").exists()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def test_quick_without_out_leaves_the_shipped_model_alone():
    from apex_mini.config import DEFAULT_MODEL_DIR

    weights = Path(DEFAULT_MODEL_DIR).parent
    before = snapshot(weights)
    proc = subprocess.run([sys.executable, "-m", "apex_mini.train_default_model", "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert "--quick needs --out" in line
    assert proc.stdout == ""
    assert snapshot(weights) == before


def test_help_names_the_command_and_the_out_default():
    proc = subprocess.run([sys.executable, "-m", "apex_mini.train_default_model", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: python -m apex_mini.train_default_model")
    help_text = " ".join(proc.stdout.split())
    assert "writes the shipped model folder by default" in help_text
    assert "--quick requires an explicit --out" in help_text
    for flag in ("--amp {auto,on,off}", "--save-dtype {auto,float32,bfloat16}"):
        assert flag in help_text
