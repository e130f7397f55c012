"""Bad input to `simulate`, `bench {kernels,decode,serve,overlap}` and `profile`: one line on stderr
naming the flag, exit status 2, and nothing run first (stdout stays empty: no table, no header).
Every case here fails fast, before a model is loaded or a point is timed, except the one serve
capacity case, which builds the tiny model's engine (and still runs no request)."""
from __future__ import annotations

import json

import pytest

from apex_mini import bench, bench_kernels, profile, simulate
from apex_mini.cli import run_cli
from apex_mini.cost_tables import PROFILE_VERSION
from apex_mini.hardware import GPUS, HOSTS, Hardware

SIM = ["--num-requests", "4", "--no-progress", "--policies", "gpu-only"]
SERVE = ["serve", "--model-shape", "tiny", "--device", "cpu", "--num-requests", "2",
         "--no-progress", "--policies", "gpu-only"]
DECODE = ["decode", "--model-shape", "tiny", "--device", "cpu", "--no-hf"]


@pytest.fixture
def files(tmp_path):
    """Placeholders in argv -> paths: {dir} a folder, {file} a plain text file, {list} a JSON
    list, {obj} a JSON object of no known kind, {old} a profile of another version, {report} a
    bench serve report of static only, {none} a path that does not exist, {hw0} hardware with
    0 host cores, {trace} a valid two-request trace."""
    (tmp_path / "file.txt").write_text("not json\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    (tmp_path / "old.json").write_text(json.dumps({"key": {}, "num_layers": 2, "linear": [],
                                                   "version": PROFILE_VERSION - 1}))
    (tmp_path / "report.json").write_text(json.dumps({"policies": {"static": {
        "throughput_tok_s": 10.0}}}))
    hw = Hardware(GPUS["t4"], HOSTS["server-ddr4"]).to_dict()
    hw["host"]["cores"] = 0
    (tmp_path / "hw0.json").write_text(json.dumps(hw))
    request = json.dumps({"arrival_s": 0, "prompt_len": 3, "output_len": 2})
    (tmp_path / "trace.jsonl").write_text(f"{request}\n" * 2)
    names = {"dir": tmp_path, "file": tmp_path / "file.txt", "list": tmp_path / "list.json",
             "obj": tmp_path / "obj.json", "old": tmp_path / "old.json",
             "report": tmp_path / "report.json", "none": tmp_path / "none.json",
             "hw0": tmp_path / "hw0.json", "trace": tmp_path / "trace.jsonl"}

    def fill(argv: list[str]) -> list[str]:
        return [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]
    return fill


def one_line_error(main, argv, capsys, *words):
    code = run_cli(lambda: main(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert out == "", out                            # failed before any work or output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, words", [
    # output paths, checked before the run
    (["--json", "{dir}"], ("--json", "folder")),
    (["--json", "{file}/x.json"], ("--json", "not a folder")),
    (["--markdown", "{dir}"], ("--markdown", "folder")),
    (["--plot", "{file}/p.png"], ("--plot",)),
    # figures: > 0 where zero is meaningless, >= 0 where it means "none"
    (["--cpu-cores", "0"], ("--cpu-cores", ">= 1")),
    (["--cpu-cores", "-2"], ("--cpu-cores", ">= 1")),
    (["--cpu-mem-gbps", "0"], ("--cpu-mem-gbps", "> 0")),
    (["--cpu-mem-gbps", "-1"], ("--cpu-mem-gbps", "> 0")),
    (["--cpu-mem-gbps", "nan"], ("--cpu-mem-gbps", "> 0")),
    (["--overhead-ms", "-50"], ("--overhead-ms", ">= 0")),
    (["--overhead-ms", "inf"], ("--overhead-ms", ">= 0")),
    (["--noise", "-0.1"], ("--noise", ">= 0")),
    (["--cpu-kv-gb", "0"], ("--cpu-kv-gb", "> 0")),
    (["--cpu-kv-gb", "-1"], ("--cpu-kv-gb", "> 0")),
    (["--gpu-memory-gb", "-5"], ("--gpu-memory-gb", "> 0")),
    (["--gpu-memory-gb", "0"], ("--gpu-memory-gb", "> 0")),
    (["--cpu-kv-gb", "0.0001", "--policies", "apex"], ("--cpu-kv-gb", "no KV block")),
    # input files: named, with what was expected
    (["--calibrate-from", "{none}"], ("--calibrate-from", "no such file", "apex_mini.profile")),
    (["--calibrate-from", "{dir}"], ("--calibrate-from", "folder")),
    (["--calibrate-from", "{list}"], ("--calibrate-from", "not a profile", "list")),
    (["--calibrate-from", "{obj}"], ("--calibrate-from", "not a profile", "num_layers")),
    (["--calibrate-from", "{file}"], ("--calibrate-from", "file.txt", "not valid JSON")),
    (["--calibrate-from", "{old}", "--gpu-kv-blocks", "8", "--cpu-kv-blocks", "8"],
     ("--calibrate-from", "version")),
    (["--compare-to", "{none}"], ("--compare-to", "no such file", "bench serve")),
    (["--compare-to", "{list}"], ("--compare-to", "not a bench serve report")),
    (["--compare-to", "{obj}"], ("--compare-to", "not a bench serve report")),
    (["--compare-to", "{file}"], ("--compare-to", "file.txt", "not valid JSON")),
    (["--compare-to", "{report}"], ("--compare-to", "static", "none of --policies gpu-only")),
    (["--workload", "trace", "--trace", "{dir}"], ("--trace", "folder", "JSONL")),
    (["--workload", "trace", "--trace", "{none}"], ("--trace", "no such file")),
    (["--workload", "trace", "--trace", "{trace}", "--num-requests", "0"],
     ("--num-requests", "at least 1")),
    (["--workload", "trace", "--trace", "{trace}", "--num-requests", "-3"],
     ("--num-requests", "at least 1")),
    (["--gpu", "custom", "--hardware", "{dir}"], ("--hardware", "folder")),
    (["--gpu", "custom", "--hardware", "{hw0}"], ("hw0.json", "cores=0")),
    # policies, each once; capacity hints in this tool's own flags
    (["--policies", "apex,gpu-only,apex"], ("--policies", "apex", "more than once")),
    (["--gpu-kv-blocks", "2"], ("--length-scale", "--gpu-kv-blocks")),
])
def test_simulate_bad_input(argv, words, files, capsys):
    line = one_line_error(simulate.main, files(SIM + argv), capsys, *words)
    assert "--max-new-tokens" not in line              # simulate has no such flag


def test_simulate_zero_where_zero_means_none_runs(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert simulate.main(SIM + ["--overhead-ms", "0", "--noise", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["policies"]["gpu-only"]["completed"] == 4


@pytest.mark.parametrize("argv, words", [
    (["--torch-threads", "-1"], ("--torch-threads", "at least 1")),
    (["--torch-threads", "0"], ("--torch-threads", "at least 1")),
    (["--json", "{dir}"], ("--json", "folder")),
    (["--markdown", "{file}/m.md"], ("--markdown",)),
    (["--plot", "{dir}"], ("--plot", "folder")),
    (["--policies", "gpu-only,gpu-only"], ("--policies", "more than once", "--repeats")),
    (["--workload", "trace", "--trace", "{dir}"], ("--trace", "folder")),
    (["--workload", "trace", "--trace", "{trace}", "--num-requests", "0"],
     ("--num-requests", "at least 1")),
    (["--num-requests", "0"], ("--num-requests", "at least 1")),
    (["--gpu-kv-blocks", "2", "--length-scale", "0.1", "--no-warmup"],
     ("--length-scale", "--gpu-kv-blocks")),
])
def test_bench_serve_bad_input(argv, words, files, capsys, monkeypatch):
    monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", "1")
    line = one_line_error(bench.main, files(SERVE + argv), capsys, *words)
    assert "--max-new-tokens" not in line


@pytest.mark.parametrize("argv, words", [
    (["--repeats", "0"], ("--repeats must be at least 1",)),
    (["--repeats", "-1"], ("--repeats must be at least 1",)),
    (["--torch-threads", "-1"], ("--torch-threads", "at least 1")),
    (["--torch-threads", "0"], ("--torch-threads", "at least 1")),
    (["--json", "{dir}"], ("--json", "folder")),
    (["--json", "{file}/d.json"], ("--json", "not a folder")),
    (["--prompt-len", "5000"], ("--prompt-len", "--new-tokens", "context is 512")),
    (["--prompt-len", "500", "--new-tokens", "20"], ("--prompt-len", "520")),
    (["--max-model-len", "32", "--prompt-len", "30", "--new-tokens", "4"], ("--max-model-len",)),
    (["--max-model-len", "100000"], ("--max-model-len 100000 is longer than the model's context",)),
])
def test_bench_decode_bad_input(argv, words, files, capsys):
    one_line_error(bench.main, files(DECODE + argv), capsys, *words)


@pytest.mark.parametrize("argv, words", [
    (["--threads", "-2"], ("--threads", "at least 1")),
    (["--threads", "0"], ("--threads", "at least 1")),
    (["--json", "{dir}"], ("--json", "folder")),
    (["--shape", "tiny", "--contexts", "100000000"], ("--contexts", "GB", "free")),
])
def test_bench_kernels_bad_input(argv, words, files, capsys, monkeypatch):
    monkeypatch.setattr(bench_kernels, "available_memory_bytes", lambda: 8 << 30)
    one_line_error(bench.main, files(["kernels"] + argv), capsys, *words)


def test_kernels_memory_estimate_covers_the_pool():
    """The refusal is sized from what a point allocates: at least its K and V pools."""
    dtype = bench_kernels.torch.bfloat16
    for context, batch in ((40, 3), (5000, 2)):
        p = bench_kernels.Point(context, batch, num_heads=4, num_kv_heads=2, head_dim=8,
                                block_size=16, dtype=dtype, pool_bytes=1 << 16)
        pools = p.k_cache.numel() * p.k_cache.element_size() * 2
        estimate = bench_kernels.peak_bytes(context, batch, 2, 8, 16, dtype, pool_bytes=1 << 16)
        assert pools <= estimate <= 3 * pools


@pytest.mark.parametrize("argv, words", [
    (["--show", "-1"], ("--show", ">= 0")),
    (["--out", "{dir}"], ("--out", "folder")),
    (["--out", "{file}/p.json"], ("--out", "not a folder")),
    (["--report", "--json", "{dir}"], ("--json", "folder")),
])
def test_profile_bad_input(argv, words, files, capsys):
    one_line_error(profile.main, files(["--model-shape", "tiny", "--device", "cpu"] + argv),
                   capsys, *words)


# ------------------------------------------------------------------------------ argparse's own errors

@pytest.mark.parametrize("main, argv, words", [
    (simulate.main, ["--gpu", "v100"], ("argument --gpu: invalid choice: 'v100'",)),
    (profile.main, ["--requests", "many"], ("argument --requests: invalid int value",)),
    (bench.main, ["decode", "--repeats", "x"], ("argument --repeats",)),
    (bench.main, ["kernels", "--dtype", "fp16"], ("argument --dtype: invalid choice",)),
    (bench.main, ["serve", "--policies"], ("argument --policies: expected one argument",)),
    (bench.main, ["overlap", "--steps", "1.5"], ("argument --steps: invalid int value",)),
    (bench.main, ["serve", "--model", "m", "--model-shape", "tiny"], ("not allowed with",)),
])
def test_argparse_errors_are_one_line(main, argv, words, capsys):
    """A bad choice, a word for a number, a missing value: one line, no usage block above it."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exc.value.code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and "usage:" not in err, err
    assert lines[0].endswith("; see --help")
    for word in words:
        assert word in lines[0], lines[0]


def test_every_tool_parser_is_the_one_line_kind():
    from apex_mini import bench_decode, bench_overlap, bench_serve, generate
    from apex_mini.cli import ArgumentParser
    from apex_mini.train_default_model import TrainOptions
    for tool in (bench_decode, bench_kernels, bench_overlap, bench_serve, generate, profile,
                 simulate):
        assert isinstance(tool.build_parser(), ArgumentParser), tool.__name__
    assert isinstance(TrainOptions.parser(), ArgumentParser)


def test_bench_without_a_command_is_one_line(capsys):
    assert bench.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        "error: name a benchmark: one of kernels, decode, serve, overlap; see --help"]


# ------------------------------------------------------------------------------ tool by tool

@pytest.mark.parametrize("argv, words", [
    # --quick fills only the flags not given: those given are kept, and checked
    (["--quick", "--batches", "0"], ("--batches", ">= 1")),
    (["--quick", "--repeats", "0"], ("--repeats must be at least 1",)),
    (["--quick", "--new-tokens", "1"], ("--new-tokens >= 2",)),
    (["--quick", "--prompt-len", "500", "--new-tokens", "20"], ("--prompt-len", "520")),
    # a batch that could not run whole is refused, not reported
    (["--batches", "1,8", "--max-num-seqs", "2"], ("--batches 8", "--max-num-seqs 2")),
    (["--batches", "8", "--prompt-len", "64", "--new-tokens", "16", "--gpu-kv-blocks", "39"],
     ("batch 8 needs 40 KV blocks", "--gpu-kv-blocks")),
])
def test_bench_decode_flags_quick_does_not_override(argv, words, files, capsys):
    one_line_error(bench.main, files(DECODE + argv), capsys, *words)


def test_bench_decode_quick_keeps_explicit_flags(monkeypatch, capsys):
    """--quick --new-tokens 5 --batches 3 times batch 3 with 5 new tokens (not 1,8 and 16)."""
    from apex_mini import bench_decode
    seen = {}

    def fake_bench_device(args, device, batches):
        seen.update(batches=batches, new_tokens=args.new_tokens, repeats=args.repeats)
        return []
    monkeypatch.setattr(bench_decode, "bench_device", fake_bench_device)
    assert bench.main(DECODE + ["--quick", "--new-tokens", "5", "--batches", "3"]) == 0
    assert seen == {"batches": [3], "new_tokens": 5, "repeats": 1}
    assert bench.main(DECODE + ["--quick"]) == 0
    assert seen == {"batches": [1, 8], "new_tokens": 16, "repeats": 1}
    assert bench.main(DECODE) == 0
    assert seen == {"batches": [1, 8, 16, 32, 64], "new_tokens": 64, "repeats": 3}
    capsys.readouterr()


@pytest.mark.parametrize("argv, words", [
    (["--gpu", "a10", "--hardware", "{hw}"], ("--gpu a10", "--hardware", "drop --gpu")),
    (["--cpu", "server-ddr5", "--hardware", "{hw}"], ("--cpu server-ddr5", "--hardware")),
    (["--block-size", "100000"], ("one KV block", "--block-size 100000", "lower --block-size")),
])
def test_simulate_machine_conflicts_and_blocks(argv, words, files, tmp_path, capsys):
    hw = tmp_path / "hw.json"
    hw.write_text(json.dumps(Hardware(GPUS["t4"], HOSTS["server-ddr4"]).to_dict()))
    line = one_line_error(simulate.main, [a.replace("{hw}", str(hw)) for a in SIM + argv],
                          capsys, *words)
    assert "does not fit" not in line


def test_simulate_hardware_alone_is_custom(tmp_path, capsys):
    """--hardware without --gpu reads the file, as --gpu custom --hardware does."""
    hw = tmp_path / "hw.json"
    hw.write_text(json.dumps(Hardware(GPUS["a10"], HOSTS["desktop-ddr4"]).to_dict()))
    out = tmp_path / "sim.json"
    assert simulate.main(SIM + ["--hardware", str(hw), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["hardware"]["gpu"]["name"] == "A10"
    capsys.readouterr()


@pytest.mark.parametrize("argv, words", [
    (["--num-requests", "0"], ("--num-requests must be at least 2",)),
    (["--num-requests", "1"], ("--num-requests must be at least 2",)),
    (["--max-num-seqs", "1"], ("--max-num-seqs 1", "at least 2")),
    (["--cpu-kv-blocks", "1"], ("--cpu-kv-blocks 1", "raise --cpu-kv-blocks")),
    (["--max-model-len", "16", "--prompt-len", "64"], ("--prompt-len 64", "--max-model-len 16")),
])
def test_bench_overlap_bad_input(argv, words, capsys, monkeypatch):
    from apex_mini import bench_overlap
    monkeypatch.setattr(bench_overlap, "build_model", lambda *a: pytest.fail("model built"))
    one_line_error(bench.main, ["overlap", "--num-requests", "4", "--prompt-len", "20",
                                "--steps", "2"] + argv, capsys, *words)
