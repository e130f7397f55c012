"""`python -m apex_mini.generate`: it writes text, and every kind of bad input gets one line on
stderr and exit status 2, never a traceback."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from apex_mini import LLM, SamplingParams
from apex_mini.cli import run_cli
from apex_mini.generate import build_parser, main


def generate(argv, capsys):
    code = run_cli(lambda: main(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_single_prompt_streams_and_summarises(mha_ckpt, capsys):
    code, out, err = generate(["--model", str(mha_ckpt), "--device", "cpu", "--prompt", "hello",
                               "--max-new-tokens", "5", "--temperature", "0", "--ignore-eos"], capsys)
    assert code == 0
    assert out.startswith("hello")
    assert "5 tokens in" in err and "tok/s" in err


def test_streamed_text_continues_the_prompt():
    """Prompt + streamed pieces read exactly as the decoded prompt and output together: the
    first piece keeps its leading space ("Lily and Ben" + " was", not "Benwas"). The shipped
    model's tokenizer, like Llama's, drops a lone piece's leading space when decoding."""
    from apex_mini import LLM, SamplingParams
    from apex_mini.config import DEFAULT_MODEL_DIR
    llm = LLM(DEFAULT_MODEL_DIR, device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for prompt in ("Lily and Ben", "Once upon a time"):
        pieces = list(llm.stream(prompt, params))
        ids = [t for t, _ in pieces if t is not None]
        prompt_ids = llm.tokenizer.encode(prompt)
        assert prompt + "".join(text for _, text in pieces) == \
            llm.tokenizer.decode(prompt_ids + ids)
    llm.close()


def test_several_prompts_from_file(mha_ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n\nthree\n")
    code, out, err = generate(["--model", str(mha_ckpt), "--device", "cpu", "--prompts-file",
                               str(prompts), "--max-new-tokens", "3", "--ignore-eos",
                               "--temperature", "0"], capsys)
    assert code == 0
    assert out.count("--- ") == 3
    assert "9 tokens in" in err
    # Each line is prompt + output, the output continuing the prompt (its leading space kept),
    # as prompt and decoded tokens read together.
    llm = LLM(mha_ckpt, device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    lines = [line[len("--- "):] for line in out.split("\n") if line.startswith("--- ")]
    for prompt, line in zip(("one", "two", "three"), lines):
        (o,) = llm.generate(prompt, params)
        assert line == prompt + o.text == llm.tokenizer.decode(o.prompt_token_ids + o.token_ids)
    llm.close()


@pytest.fixture
def broken(tmp_path, mha_ckpt):
    """Factory: a copy of the tiny checkpoint, damaged by `how`."""
    def make(how: str):
        path = tmp_path / how
        shutil.copytree(mha_ckpt, path)
        weights = path / "model.safetensors"
        config = json.loads((path / "config.json").read_text())
        if how == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif how == "corrupt":
            weights.write_bytes(b"\x07garbage" * 100)
        elif how == "architecture":
            config["architectures"] = ["GPT2LMHeadModel"]
        elif how == "shapes":
            config["intermediate_size"] += 8
        elif how == "field-type":
            config["hidden_size"] = str(config["hidden_size"])
        elif how == "heads":
            config["num_key_value_heads"] = 3
        elif how == "json-list":
            config = list(config)
        (path / "config.json").write_text(json.dumps(config))
        return str(path)
    return make


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"),
    ("truncated", "truncated or corrupt"),
    ("corrupt", "truncated or corrupt"),
    ("architecture", "unsupported architecture"),
    ("shapes", "do not match"),
    ("long-prompt", "context"),
    ("empty-prompt", "empty"),
    ("temperature", "temperature"),
    ("field-type", "must be a positive integer"),
    ("heads", "not a multiple of num_key_value_heads=3"),
    ("json-list", "holds a JSON list"),
    ("model-file", "is a file; pass --model the folder"),
    ("top-p", "--top-p"),
    ("top-k", "--top-k"),
    ("max-new-tokens", "--max-new-tokens 0 must be"),
    ("cpu-fraction", "--cpu-fraction 1.5 must be between 0 and 1"),
    ("max-num-seqs", "--max-num-seqs 0 must be at least 1"),
    ("device", "--device 'tpu' is not one of"),
    ("prompts-file", "not found"),
    ("prompts-folder", "cannot be read"),
    ("prompts-not-utf8", "is not UTF-8 text"),
    ("seed", "--seed"),
])
def test_bad_input_is_one_line_and_exit_2(case, words, broken, mha_ckpt, tmp_path, capsys):
    model = str(mha_ckpt)
    extra = []
    if case == "missing":
        model = str(tmp_path / "nowhere")
    elif case in ("truncated", "corrupt", "architecture", "shapes", "field-type", "heads",
                  "json-list"):
        model = broken(case)
    elif case == "model-file":
        model = str(mha_ckpt / "config.json")
    elif case == "long-prompt":
        extra = ["--prompt", " ".join(["word"] * 400)]
    elif case == "empty-prompt":
        extra = ["--prompt", "   "]
    elif case == "temperature":
        extra = ["--temperature", "-1"]
    elif case == "top-p":
        extra = ["--top-p", "0"]
    elif case == "top-k":
        extra = ["--top-k", "-3"]
    elif case == "max-new-tokens":
        extra = ["--max-new-tokens", "0"]
    elif case == "cpu-fraction":
        extra = ["--policy", "static", "--cpu-fraction", "1.5"]
    elif case == "max-num-seqs":
        extra = ["--max-num-seqs", "0"]
    elif case == "device":
        extra = ["--device", "tpu"]
    elif case == "prompts-file":
        extra = ["--prompts-file", str(tmp_path / "none.txt")]
    elif case == "prompts-folder":
        extra = ["--prompts-file", str(tmp_path)]
    elif case == "prompts-not-utf8":
        (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
        extra = ["--prompts-file", str(tmp_path / "latin1.txt")]
    elif case == "seed":
        extra = ["--seed", str(2**64)]
    device = [] if case == "device" else ["--device", "cpu"]
    code, out, err = generate(["--model", model, *device, *extra], capsys)
    assert code == 2
    assert out == ""                          # nothing printed before the error (the prompt)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert words in lines[0]


def test_a_bad_prompt_is_named_as_the_user_gave_it(mha_ckpt, tmp_path, capsys):
    """Blank lines are skipped, so "prompt 1" would not find it: the file's line number does."""
    path = tmp_path / "prompts.txt"
    path.write_text("a short one\n\n" + " ".join(["word"] * 400) + "\n")
    code, out, err = generate(["--model", str(mha_ckpt), "--device", "cpu", "--prompts-file",
                               str(path)], capsys)
    assert code == 2 and out == ""
    assert err.strip().startswith(f"error: line 3 of {path} has") and "context" in err
    code, out, err = generate(["--model", str(mha_ckpt), "--device", "cpu", "--prompt", "hi",
                               "--prompt", "  "], capsys)
    assert code == 2 and err.strip() == ("error: --prompt number 2 is empty; give some text or "
                                         "token ids")


def test_no_traceback_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "apex_mini.generate", "--model", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_help_names_every_flag():
    """--help lists generate's own flags and one per EngineConfig field (both forms of a
    boolean one), each as a whole flag, not as the prefix of a longer one."""
    import dataclasses
    import re

    from apex_mini.config import EngineConfig

    proc = subprocess.run([sys.executable, "-m", "apex_mini.generate", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    flags = ["--model", "--prompt", "--prompts-file", "--max-new-tokens", "--temperature",
             "--top-p", "--top-k", "--seed"]
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        flags += [flag, "--no-" + flag[2:]] if f.type in ("bool", bool) else [flag]
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", proc.stdout), flag


@pytest.mark.parametrize("argv, words", [
    (["--policy", "foo"], ("argument --policy: invalid choice: 'foo'", "'apex'")),
    (["--dtype", "fp16"], ("argument --dtype: invalid choice: 'fp16'",)),
    (["--max-new-tokens", "abc"], ("argument --max-new-tokens: invalid int value: 'abc'",)),
    (["--no-such-flag"], ("unrecognized arguments: --no-such-flag",)),
])
def test_argparse_errors_are_one_line_too(argv, words, capsys):
    """argparse's own errors: one line naming the flag and pointing at --help, no usage block."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and "usage:" not in err, err
    assert lines[0].startswith("error: ") and lines[0].endswith("; see --help"), err
    for word in words:
        assert word in lines[0]


def test_seed_help_tells_the_truth(mha_ckpt, capsys):
    """--seed left out does not mean random: each prompt gets a fixed seed (from the engine's
    seed), so two runs write the same text. The help says so, and that the engine's own --seed
    is not a flag here."""
    help_text = " ".join(build_parser().format_help().split())
    assert "default: random" not in help_text
    assert "so runs repeat" in help_text and "the engine's own --seed" in help_text
    argv = ["--model", str(mha_ckpt), "--device", "cpu", "--prompt", "hello", "--max-new-tokens",
            "8", "--temperature", "1.0", "--ignore-eos"]
    first, second = (generate(argv, capsys)[1] for _ in range(2))
    assert first == second
    seeded = {generate(argv + ["--seed", seed], capsys)[1] for seed in ("1", "2", "3")}
    assert seeded - {first}                          # a seed given varies the text


@pytest.mark.parametrize("case, words, not_words", [
    ("other-file", ("--profile-path: profile file", "README.md", "is not a profile JSON",
                    "name another file"), ("delete",)),
    ("folder", ("is a folder; give a file path",), ("delete", "no profile at")),
    ("old-profile", ("has version", "delete it or name another file"), ()),
])
def test_profile_path_that_is_no_profile(case, words, not_words, mha_ckpt, tmp_path, capsys):
    """--profile-path names the user's file: a file that is no profile at all is never called
    theirs to delete, and a folder is called a folder."""
    from apex_mini.cost_tables import PROFILE_VERSION
    path = tmp_path / "README.md"
    if case == "other-file":
        path.write_text("# my project\n")
    elif case == "folder":
        path = tmp_path
    else:
        path = tmp_path / "old.json"
        path.write_text(json.dumps({"key": {}, "version": PROFILE_VERSION - 1}))
    code, out, err = generate(["--model", str(mha_ckpt), "--device", "cpu", "--policy", "apex",
                               "--profile-path", str(path), "--max-new-tokens", "2"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    for word in not_words:
        assert word not in lines[0], lines[0]
    if case == "other-file":
        assert path.read_text() == "# my project\n"
