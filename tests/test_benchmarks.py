"""`bench kernels`, `bench decode` and `bench overlap`: each runs in its smoke form, writes every JSON field the
issues name, and its figures are consistent with what it measured. (The figures themselves are
performance: docs/benchmarks.md, never asserted here.)"""
from __future__ import annotations

import json
import threading

import pytest

from apex_mini import bench, bench_kernels, bench_overlap
from apex_mini.cli import run_cli


def test_kernels_json_has_every_field(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert bench.main(["kernels", "--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["copy_gbps"] > 0
    rows, read_rows = report["rows"], report["read_rows"]
    assert {(r["context"], r["batch"], r["mode"]) for r in rows} == {
        (c, b, m) for c in (512, 1024) for b in (1, 8) for m in ("compiled", "eager")}
    assert {(r["context"], r["batch"], r["mode"]) for r in read_rows} == {
        (c, b, "read") for c in (512, 1024) for b in (1, 8)}
    for r in rows + read_rows:
        assert r["gbps"] > 0 and r["ms"] > 0
        # GB/s is exactly the KV bytes read over the time per call (tiny shape: 2 KV heads x 16).
        kv_bytes = 2 * r["batch"] * r["context"] * 2 * 16 * 2       # bf16
        assert r["gbps"] == pytest.approx(kv_bytes / (r["ms"] / 1e3) / 1e9)
        if r["mode"] == "compiled":                 # both kernels ran on the same inputs
            assert r["max_abs_diff_vs_eager"] < 2e-2
    text = capsys.readouterr().out
    assert "of copy" in text and "goal: >= 50%" in text and "the pattern's ceiling" in text


def test_read_mode_reads_every_kv_element_of_the_points_blocks():
    """`read` sums exactly the blocks the kernels read, K and V, per token: a different block,
    a missed one or K alone would change the sums."""
    p = bench_kernels.Point(context=40, batch=3, num_heads=4, num_kv_heads=2, head_dim=8,
                            block_size=16, dtype=bench_kernels.torch.float32, pool_bytes=1 << 16)
    for i in (1, 2):                                # two copies: the same graph, other blocks
        q, k_cache, v_cache, tables, scale = p.args(i)
        out = bench_kernels.paged_read(q, k_cache, v_cache, tables, scale)
        blocks = tables.table                       # [batch, 3]; one superblock, padded
        assert blocks.shape == (3, 3)
        expect = k_cache[blocks].sum((-2, -1)) + v_cache[blocks].sum((-2, -1))   # [3, 3, 16]
        assert bench_kernels.torch.allclose(out[:, :3], expect, rtol=1e-5, atol=1e-4)
        padding = k_cache[0].sum((-2, -1)) + v_cache[0].sum((-2, -1))   # block 0, masked in kernels
        assert bench_kernels.torch.allclose(out[:, 3:], padding.expand(3, 5, 16), rtol=1e-5,
                                            atol=1e-4)


@pytest.mark.parametrize("modes", [["compiled"], ["eager", "read"]])
def test_compiled_rows_are_timed_on_graphs_compiled_as_an_engine_compiles_them(modes,
                                                                               monkeypatch):
    """Which loops Inductor's threads share depends on the sizes a graph is first compiled at,
    so before any compiled row is timed, run() calls precompile, as an engine does: on the
    timing worker, with the shape's heads, up to the longest context. Without compiled rows,
    nothing is compiled."""
    calls = []

    def precompile(k_cache, v_cache, num_heads, max_context=None, min_context=1):
        thread = threading.current_thread().name
        calls.append(("precompile", tuple(k_cache.shape[1:]), num_heads, min_context,
                      max_context, thread))

    def kernel(q, *args):
        calls.append(("kernel",))
        return q

    monkeypatch.setattr(bench_kernels.ca, "precompile", precompile)
    for mode in modes:
        monkeypatch.setitem(bench_kernels.KERNELS, mode, kernel)
    rows = bench_kernels.run([40, 70], [1, 3], modes, "tiny", bench_kernels.torch.float32,
                             block_size=16, pool_bytes=1 << 16, progress=lambda row: None)
    assert len(rows) == 4 * len(modes)
    if "compiled" in modes:
        assert calls[0][:5] == ("precompile", (16, 2, 16), 4, 40, 70)   # tiny: 4 heads, 2 KV x 16
        assert calls[0][5].startswith("apex-cpu-attn")
        assert [c[0] for c in calls[1:]] == ["kernel"] * (len(calls) - 1)
    else:
        assert all(c == ("kernel",) for c in calls)


def one_line_error(argv, capsys, *words) -> str:
    """`bench <argv>` fails as a user sees it: exit status 2, one `error:` line on stderr that
    holds each of `words`, no traceback, nothing on stdout (it failed before any work)."""
    code = run_cli(lambda: bench.main(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == "", err + out
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, words", [
    (["kernels", "--modes", "fast"], ("error: --modes ", "'fast'")),
    (["kernels", "--contexts", "0"], ("error: --contexts ", "'0'")),
    (["kernels", "--batches", "a,b"], ("error: --batches ", "'a,b'")),
    (["decode", "--batches", "a,b"], ("error: --batches ", "'a,b'")),
    (["decode", "--batches", "0"], ("error: --batches ", "'0'")),
    (["decode", "--new-tokens", "1"], ("--new-tokens >= 2",)),
])
def test_bad_flags_are_one_line(argv, words, capsys):
    """A bad value is one line naming the flag it came from, and the value."""
    one_line_error(argv, capsys, *words)


def test_kernel_point_reads_what_it_says():
    p = bench_kernels.Point(context=40, batch=3, num_heads=4, num_kv_heads=2, head_dim=8,
                            block_size=16, dtype=bench_kernels.torch.float32, pool_bytes=1 << 16)
    assert p.kv_bytes == 2 * 3 * 40 * 2 * 8 * 4
    assert p.copies >= 2                            # small points rotate over disjoint copies
    used = [b for t in p.tables for b in t.table.flatten().tolist()]
    assert len(used) == len(set(used))              # no block shared between copies or rows


def test_kernel_time_leaves_out_the_handoff_to_the_worker():
    """A worker that takes 10 ms to start each task: the figure is still the kernel's."""
    import time
    from concurrent.futures import Future

    class SlowHandoff:
        def submit(self, fn, *args):
            time.sleep(0.01)
            done = Future()
            done.set_result(fn(*args))
            return done

    p = bench_kernels.Point(context=40, batch=3, num_heads=4, num_kv_heads=2, head_dim=8,
                            block_size=16, dtype=bench_kernels.torch.float32, pool_bytes=1 << 16)
    seconds, out = bench_kernels.time_kernel(SlowHandoff(), lambda *args: args[0], p)
    assert seconds < 0.005 and out is p.q


def test_decode_json_has_every_field_and_matches_transformers(tmp_path):
    """The shipped model in fp32: our greedy tokens equal transformers' on the same weights."""
    out = tmp_path / "decode.json"
    assert bench.main(["decode", "--quick", "--device", "cpu", "--prompt-len", "16",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 8]
    for r in rows:
        assert {"device", "model", "batch", "tok_s", "gbps", "roofline_gbps", "hf_tok_s"} <= set(r)
        assert r["device"] == "cpu" and r["tok_s"] > 0 and r["gbps"] > 0 and r["hf_tok_s"] > 0
        assert r["same_tokens"] == 1.0


def test_decode_without_transformers_writes_null(tmp_path):
    out = tmp_path / "decode.json"
    assert bench.main(["decode", "--model-shape", "tiny", "--batches", "2", "--new-tokens", "3",
                       "--repeats", "1", "--device", "cpu", "--no-hf", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["hf_tok_s"] is None and row["model"] == "tiny" and row["batch"] == 2


def test_decode_batches_prefill_in_one_step(monkeypatch):
    """8 prompts of 300 tokens pass the default 2048-token budget: the bench raises it, so that
    t(N) - t(1) holds N - 1 decode steps of all 8 rows, not prefill chunks with decodes mixed
    in (transformers prefills the batch in one pass)."""
    from apex_mini import bench_decode
    budgets, Engine = [], bench_decode.Engine
    def engine(model, cfg, *args, **kwargs):
        budgets.append(cfg.max_num_batched_tokens)
        return Engine(model, cfg, *args, **kwargs)
    monkeypatch.setattr(bench_decode, "Engine", engine)
    assert bench.main(["decode", "--model-shape", "tiny", "--batches", "8", "--prompt-len", "300",
                       "--new-tokens", "3", "--repeats", "1", "--device", "cpu", "--no-hf"]) == 0
    assert budgets == [2400]


def test_a_negative_decode_time_is_measured_again_never_published():
    from apex_mini.bench_decode import decode_time
    stalls = iter([(1.0, []), (3.0, []), (2.0, []), (0.5, [])])   # t(1) stalled once
    assert decode_time(lambda n: next(stalls), 4) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="too busy to measure"):
        decode_time(lambda n: (1.0, []) if n > 1 else (2.0, []), 4)


def test_bench_usage_and_unknown_command(capsys):
    assert bench.main(["--help"]) == 0
    assert "kernels" in capsys.readouterr().out
    assert bench.main([]) == 2                        # no command: usage on stderr, exit 2
    assert "kernels" in capsys.readouterr().err
    assert run_cli(lambda: bench.main(["nope"])) == 2


def test_overlap_summary_measures_the_stamped_intervals():
    """Two layers: the worker [1, 4] beside device attention [2, 6], then [10, 11] beside
    [12, 13]; where GPU stamps exist they, not the main thread's, time the device."""
    host_only = [("launch", 0, 0.5), ("cpu_start", 0, 1.0), ("dev_start", 0, 2.0),
                 ("cpu_end", 0, 4.0), ("dev_end", 0, 6.0), ("join", 0, 6.5),
                 ("cpu_start", 1, 10.0), ("cpu_end", 1, 11.0), ("dev_start", 1, 12.0),
                 ("dev_end", 1, 13.0), ("join", 1, 10.5)]
    s = bench_overlap.summarize([host_only])
    assert s["device_clock"] == "host" and s["layers"] == 2
    assert s["overlap_of_worker"] == pytest.approx(2 / 4)          # 2 s together of 3 + 1
    assert s["overlap_of_device"] == pytest.approx(2 / 5)          # of 4 + 1
    assert s["layers_overlapping"] == 0.5
    assert s["wait_us"] == pytest.approx(0.25e6)                   # median of 0 and 0.5 s
    on_gpu = host_only + [("gpu_dev_start", 0, 3.5), ("gpu_dev_end", 0, 7.0),
                          ("gpu_dev_start", 1, 10.5), ("gpu_dev_end", 1, 14.0)]
    s = bench_overlap.summarize([on_gpu])
    assert s["device_clock"] == "gpu"
    assert s["overlap_of_device"] == pytest.approx((0.5 + 0.5) / (3.5 + 3.5))
    with pytest.raises(ValueError, match="no host rows"):
        bench_overlap.summarize([[("dev_start", 0, 1.0), ("dev_end", 0, 2.0)]])


def test_overlap_records_every_layer_of_hybrid_steps(tmp_path, capsys):
    """The shipped model: every recorded step is a merged batch with rows on both tiers, and
    every layer has each stamp once, in the order the runner reaches them. The report says
    which host kernel ran (eager here: asked for with the flag)."""
    out = tmp_path / "overlap.json"
    assert bench.main(["overlap", "--num-requests", "4", "--prompt-len", "20", "--steps", "2",
                       "--no-compile-cpu-attention", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["host_kernel"] == "eager"
    assert len(report["steps"]) == 2
    for step in report["steps"]:
        assert step["plan"].startswith("overlap:") and "2 gpu decode, 2 cpu decode" in step["plan"]
        layers = bench_overlap.by_layer(step["stamps"])
        assert len(layers) == report["summary"]["layers"] // 2 and len(step["stamps"]) == 6 * len(layers)
        for ev in layers.values():
            assert step["t0"] <= ev["launch"] <= ev["dev_start"] <= ev["dev_end"] <= ev["join"]
            assert ev["launch"] <= ev["cpu_start"] <= ev["cpu_end"] <= step["t1"]
    assert report["summary"]["device_clock"] == "host"
    assert 0 <= report["summary"]["overlap_of_worker"] <= 1
    printed = capsys.readouterr().out
    assert "of the device attention's time" in printed and "eager CPU attention" in printed


@pytest.mark.parametrize("argv", [
    ["overlap", "--num-requests", "1"], ["overlap", "--steps", "0"],
    ["overlap", "--cpu-fraction", "0"], ["overlap", "--prompt-len", "100000"],
])
def test_overlap_bad_flags_are_one_line(argv, capsys):
    """Each is one line that starts with the flag it came from and gives its value."""
    one_line_error(argv, capsys, f"error: {argv[1]} ", argv[2])


def run_gpu_session(tmp_path, fake_body: str = "", **env_vars):
    """Run docs/gpu_session.sh with a stand-in python3 that records its arguments (and the
    host-kernel variable) and then runs `fake_body` (sh). Returns the finished process, each
    step's end line, and the recorded calls."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    record = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\t" "$a"; done >> {record}\n'
                    f'echo "eager=$APEX_MINI_EAGER_CPU_ATTENTION" >> {record}\n{fake_body}\n')
    fake.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "APEX_MINI_EAGER_CPU_ATTENTION"}
    env.update({"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
                "OUT": str(tmp_path / "out"), "TMPDIR": str(scratch), "DRY": "0", **env_vars})
    run = subprocess.run(["bash", "docs/gpu_session.sh"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "results.tgz").is_file()
    assert not list(scratch.iterdir())               # its scratch folder is removed
    ends = [line for line in run.stdout.splitlines() if line.startswith("== ") and ": exit " in line]
    half = len(ends) // 2                            # each step's end, then the summary again
    assert ends[:half] == ends[half:], run.stdout
    calls = []
    for line in record.read_text().splitlines() if record.exists() else []:
        argv, _, eager = line.rpartition("eager=")
        calls.append((argv.rstrip("\t").split("\t"), eager))
    return run, ends[:half], calls


@pytest.mark.parametrize("dry", [False, True], ids=["gpu", "dry"])
def test_gpu_session_script_runs_every_step_with_flags_that_parse(tmp_path, dry):
    """docs/gpu_session.sh, with a stand-in python3 that records its arguments: every step runs
    and reports its exit status, the reports are archived, and each apex_mini command's flags
    parse (a renamed flag would cost a GPU session its one call)."""
    import importlib

    from apex_mini import profile

    run, ends, recorded = run_gpu_session(tmp_path, DRY="1" if dry else "0")
    assert len(ends) == 9 and all(": exit 0 after" in line for line in ends), run.stdout
    assert (tmp_path / "out" / "session.log").read_text().count("exit 0") >= 9
    # The overlap evidence is recorded with the compiled host kernel, whatever the torch.
    assert [eager for argv, eager in recorded if "overlap" in argv] == ["0"]
    calls = [argv for argv, _ in recorded]
    modules = [c[1] for c in calls if c[0] == "-m"]
    assert modules.count("apex_mini.bench") == 6 and "apex_mini.profile" in modules
    for argv in calls:
        if argv[:2] == ["-m", "apex_mini.bench"]:
            parser = importlib.import_module(bench.COMMANDS[argv[2]][0]).build_parser()
            args = parser.parse_args(argv[3:])
        elif argv[:2] == ["-m", "apex_mini.profile"]:
            args = profile.build_parser().parse_args(argv[2:])
        else:
            continue
        assert getattr(args, "device", None) in ((None, "cpu") if dry else (None, "cuda"))


def test_gpu_session_falls_back_to_the_eager_overlap_and_keeps_to_its_budget(tmp_path):
    """A compiled overlap run that fails (a compile error, a crash) is followed by an eager one, and
    with the budget spent, every later step is skipped while the archive is still written."""
    fail_compiled_overlap = ('case "$*" in *overlap*) [ "$APEX_MINI_EAGER_CPU_ATTENTION" = 0 ] '
                             '&& exit 139;; esac; exit 0')
    _, ends, recorded = run_gpu_session(tmp_path / "a", fail_compiled_overlap)
    assert [eager for argv, eager in recorded if "overlap" in argv] == ["0", "1"]
    assert [line.split(":")[0] for line in ends if ": exit 0" not in line] == ["== overlap"]
    assert any(line.startswith("== overlap-eager: exit 0") for line in ends)
    assert len(ends) == 10

    _, ends, recorded = run_gpu_session(tmp_path / "b", BUDGET="0")
    assert recorded == [] and len(ends) == 10                # overlap-eager is tried, and skipped
    assert all(": exit 124 after 0 s (skipped" in line for line in ends)
