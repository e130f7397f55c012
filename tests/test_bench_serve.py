"""The serving benchmark: every field in its JSON, and every request completed under every policy,
on random tiny weights on the CPU with a device tier small enough that the host tier is used."""
from __future__ import annotations

import collections
import json

import pytest

from apex_mini import bench
from apex_mini.metrics import FIELDS


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", "1")
    # A private profile cache: the predictive policies profile the tiny shape once per session.
    monkeypatch.setenv("APEX_MINI_CACHE", str(tmp_path_factory.getbasetemp() / "bench_cache"))


def test_every_policy_completes_every_request(tmp_path, capsys):
    out, md, png = tmp_path / "serve.json", tmp_path / "serve.md", tmp_path / "serve.png"
    argv = ["serve", "--model-shape", "tiny", "--device", "cpu", "--workload", "mixed",
            "--num-requests", "6", "--length-scale", "0.05", "--gpu-kv-blocks", "8",
            "--policies", "gpu-only,static,neo,apex", "--json", str(out), "--markdown", str(md),
            "--plot", str(png), "--no-progress", "--torch-threads", "1"]
    assert bench.main(argv) == 0
    rep = json.loads(out.read_text())
    assert set(rep) >= {"policies", "workload", "model", "hardware", "date", "command"}
    assert rep["hardware"]["host_kernel"] == "eager"               # APEX_MINI_EAGER_CPU_ATTENTION=1
    assert list(rep["policies"]) == ["gpu-only", "static", "neo", "apex"]
    for name, row in rep["policies"].items():
        assert set(row) >= set(FIELDS), name
        assert row["completed"] == row["num_requests"] == 6, name
        assert row["throughput_tok_s"] > 0 and row["ttft_p99_s"] >= row["ttft_p50_s"] > 0
        assert row["tpot_p50_s"] > 0
        assert sum(row["strategy_mix"].values()) == pytest.approx(1.0)
        assert row["output_tokens"] == rep["workload"]["total_output_tokens"]
        assert row["parks"] <= row["swaps"] and (row["parks"] == 0 or name == "apex")
    assert rep["policies"]["gpu-only"]["ratio_to_gpu_only"] == 1.0
    assert rep["policies"]["static"]["host_decodes"] > 0       # the host tier was used
    assert "| apex |" in md.read_text() and "| apex |" in capsys.readouterr().out
    assert png.stat().st_size > 0


def test_repeats_take_turns_and_report_medians(tmp_path, monkeypatch):
    """--repeats 3: each policy runs three times, the policies in turns; a row is the policy's
    median-throughput run, and x gpu-only the median of the three rounds' own ratios."""
    from apex_mini import bench_serve
    order, real = [], bench_serve.run_policy

    def recording(engine, *a):
        order.append(engine.policy_name)
        return real(engine, *a)
    monkeypatch.setattr(bench_serve, "run_policy", recording)
    out = tmp_path / "serve.json"
    assert bench.main(["serve", "--model-shape", "tiny", "--device", "cpu", "--workload", "mixed",
                       "--num-requests", "3", "--length-scale", "0.05", "--policies",
                       "gpu-only,static", "--repeats", "3", "--json", str(out), "--no-progress",
                       "--no-warmup", "--torch-threads", "1"]) == 0
    assert order == ["gpu-only", "static"] * 3
    rep = json.loads(out.read_text())
    assert rep["repeats"] == 3
    base, static = rep["policies"]["gpu-only"], rep["policies"]["static"]
    for row in (base, static):
        runs = row["throughput_runs"]
        assert len(runs) == 3 and row["throughput_tok_s"] == sorted(runs)[1]
    ratios = sorted(s / b for s, b in zip(static["throughput_runs"], base["throughput_runs"]))
    assert static["ratio_to_gpu_only"] == pytest.approx(ratios[1])
    assert base["ratio_to_gpu_only"] == pytest.approx(1.0)


def test_median_run_of_an_even_count_is_the_lower_middle():
    from apex_mini.metrics import median_run
    rows = [{"throughput_tok_s": t, "run": i} for i, t in enumerate((40.0, 10.0, 30.0, 20.0))]
    row = median_run(rows)
    assert row["run"] == 3 and row["throughput_runs"] == [40.0, 10.0, 30.0, 20.0]


def test_trace_arrivals_are_respected(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps({"arrival_s": t, "prompt_len": 5, "output_len": 3})
                               for t in (0.0, 0.2, 0.4)) + "\n")
    out = tmp_path / "trace.json"
    assert bench.main(["serve", "--model-shape", "tiny", "--device", "cpu", "--workload", "trace",
                       "--trace", str(trace), "--policies", "gpu-only", "--json", str(out),
                       "--torch-threads", "1", "--no-progress"]) == 0
    row = json.loads(out.read_text())["policies"]["gpu-only"]
    assert row["completed"] == 3
    assert row["duration_s"] >= 0.4                  # the last request could not start earlier


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="--repeats"):
        bench.main(["serve", "--model-shape", "tiny", "--device", "cpu", "--repeats", "0"])
    with pytest.raises(ValueError, match="unknown policies"):
        bench.main(["serve", "--model-shape", "tiny", "--policies", "gpu-only,vllm"])
    with pytest.raises(ValueError, match="length-scale"):
        bench.main(["serve", "--model-shape", "tiny", "--device", "cpu", "--workload", "long-input",
                    "--num-requests", "2", "--no-progress"])


def test_counts_cover_every_iteration_past_max_records(tmp_path, monkeypatch):
    """The engine keeps at most --max-records records (trimming to the newer half); the bench's
    iteration tally and predictor error still cover every iteration the run took."""
    from apex_mini.engine import Engine
    taken, real_step = collections.Counter(), Engine.step

    def counting(engine):
        plan, finished = real_step(engine)
        taken[engine.policy_name] += not plan.is_empty
        return plan, finished
    monkeypatch.setattr(Engine, "step", counting)
    out = tmp_path / "serve.json"
    assert bench.main(["serve", "--model-shape", "tiny", "--device", "cpu", "--workload", "chat",
                       "--num-requests", "3", "--length-scale", "0.05", "--max-records", "2",
                       "--policies", "gpu-only,apex", "--json", str(out), "--no-progress",
                       "--no-warmup", "--torch-threads", "1"]) == 0
    rows = json.loads(out.read_text())["policies"]
    assert taken["gpu-only"] > 4 and taken["apex"] > 4            # well past max_records
    for name, row in rows.items():
        assert row["iterations"] == taken[name], name
    assert rows["apex"]["predictor_error"]["n"] == taken["apex"]


def test_the_warm_up_batches_fall_through_every_padded_size():
    from apex_mini.bench_serve import smaller_batches
    assert smaller_batches(11, True) == [8, 4, 2, 1] and smaller_batches(16, True) == [8, 4, 2, 1]
    assert smaller_batches(2, True) == [1] and smaller_batches(1, True) == []
    assert smaller_batches(4, False) == [3, 2, 1]


def engine_with_stand_in_graphs(**options):
    """A tiny gpu-only engine on the CPU whose decode steps run through the CPU stand-in for
    CUDA graphs (it records each shape it 'captures', without waiting)."""
    import torch
    from conftest import CapturingGraphs

    from apex_mini.config import EngineConfig
    from apex_mini.engine import Engine
    from apex_mini.weights import random_model
    cfg = EngineConfig(device="cpu", dtype="float32", policy="gpu-only", **options)
    engine = Engine(random_model("tiny", torch.float32, "cpu"), cfg, progress=False)
    engine.runner.graphs = graphs = CapturingGraphs(engine.runner.decode_step)
    graphs.CAPTURE_S = 0.0
    return engine, graphs


@pytest.mark.parametrize("bucket", [True, False], ids=["buckets", "no-buckets"])
def test_after_the_warm_up_no_decode_batch_size_is_new(bucket):
    """The warm-up's decode steps meet every batch size of the timed run, also when its prompts
    take several prefill steps (a small token budget): the timed run captures no graph of a new
    batch size (new block-table widths only), with the CPU stand-in for CUDA graphs."""
    from apex_mini import bench_serve, workloads
    engine, graphs = engine_with_stand_in_graphs(gpu_kv_blocks=128, max_num_batched_tokens=64,
                                                 max_num_seqs=11, bucket_decode=bucket)
    specs = [workloads.RequestSpec(0.0, 20 + i, 30 + 3 * i) for i in range(11)]
    prompts = workloads.prompt_token_ids(specs, 100, 0)
    added = []
    add_request = engine.add_request
    engine.add_request = lambda ids, params: added.append(ids) or add_request(ids, params)
    try:
        bench_serve.warm_up(engine, specs, prompts)
        warm, warmed_up = set(graphs.captured), list(added)
        timed = bench_serve.run_policy(engine, specs, prompts, False)
    finally:
        engine.close()
    assert warmed_up == prompts[:11] and timed["completed"] == 11
    assert {batch for batch, _ in warm} == ({1, 2, 4, 8, 16} if bucket else set(range(1, 12)))
    assert {batch for batch, _ in graphs.captured - warm} <= {batch for batch, _ in warm}


def test_each_run_counts_the_cuda_graphs_it_captured_while_timed():
    """A run's row says how many of its timed iterations captured a CUDA graph (one-time costs
    that each policy's fresh engine pays again); here with the CPU stand-in for graphs."""
    from apex_mini import bench_serve, workloads
    engine, graphs = engine_with_stand_in_graphs(gpu_kv_blocks=64)
    specs = [workloads.RequestSpec(0.0, 6 + i, 2 + 3 * i) for i in range(3)]
    try:
        row = bench_serve.run_policy(engine, specs, workloads.prompt_token_ids(specs, 100, 0),
                                     False)
    finally:
        engine.close()
    assert row["graph_captures"] == graphs.num_graphs >= 2                  # batches 3, 2, 1
