"""The simulator: every preset with every policy, the two synthetic extremes (a host as fast as
the GPU, and one 100x slower), the command line and its JSON, workloads and traces."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from apex_mini import workloads
from apex_mini.config import EngineConfig
from apex_mini.hardware import (GPUS, HOSTS, Hardware, HostSpec, analytic_profile,
                                kv_capacity_tokens, load_hardware)
from apex_mini.metrics import FIELDS
from apex_mini.simulate import build_machine, main, simulate_policy
from apex_mini.weights import MODEL_SHAPES

POLICIES = ("gpu-only", "static", "neo", "apex")
LLAMA2 = MODEL_SHAPES["llama2-7b"]
SMALL = workloads.synthetic("chat", 24, length_scale=0.5, seed=1)


def machine(hw: Hardware, cfg: EngineConfig = EngineConfig(), mc=LLAMA2):
    return build_machine(mc, cfg, 2, hw=hw, model_name="llama2-7b")


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_every_preset_and_policy_completes(gpu):
    m = machine(Hardware(GPUS[gpu], HOSTS["server-ddr4"]))
    for policy in POLICIES:
        row = simulate_policy(policy, SMALL, m, EngineConfig())
        assert row["completed"] == row["num_requests"] == len(SMALL), policy
        assert row["output_tokens"] == sum(s.output_len for s in SMALL)
        assert row["throughput_tok_s"] > 0 and row["ttft_p50_s"] > 0 and row["tpot_p50_s"] > 0
        if policy == "gpu-only":
            assert row["host_decodes"] == 0 and row["swaps"] == 0


def synthetic_host(cpu_speedup: float) -> Hardware:
    """A T4 beside a host whose attention bandwidth and FLOP/s are `cpu_speedup` x the GPU's."""
    t4 = GPUS["t4"]
    eff = 0.7
    host = HostSpec("synthetic", mem_bw_gbps=t4.mem_bw_gbps * t4.bw_efficiency * cpu_speedup / eff,
                    cores=64, core_bw_gbps=1e6,
                    core_gflops=t4.tflops * 1e3 * t4.flop_efficiency * cpu_speedup / 64,
                    bw_efficiency=eff, call_s=t4.kernel_s)
    return Hardware(t4, host)


def test_host_as_fast_as_gpu_apex_offloads():
    m = machine(synthetic_host(1.0))
    gpu_only = simulate_policy("gpu-only", SMALL, m, EngineConfig())
    apex = simulate_policy("apex", SMALL, m, EngineConfig())
    assert apex["host_decode_iterations"] > 0
    assert apex["strategy_mix"]["overlap"] + apex["strategy_mix"]["pipeline"] > 0
    assert apex["throughput_tok_s"] > 1.2 * gpu_only["throughput_tok_s"]


def test_host_100x_slower_apex_equals_gpu_only():
    m = machine(synthetic_host(0.01))
    gpu_only = simulate_policy("gpu-only", SMALL, m, EngineConfig())
    apex = simulate_policy("apex", SMALL, m, EngineConfig())
    assert apex["host_decodes"] == 0
    assert apex["throughput_tok_s"] == pytest.approx(gpu_only["throughput_tok_s"], rel=0.02)


def test_analytic_profile_tables():
    hw = Hardware(GPUS["t4"], HOSTS["server-ddr4"])
    p = analytic_profile(hw, LLAMA2, 2, "llama2-7b")
    assert p.source == "analytic:T4+server-ddr4" and p.num_layers == 32
    # Decode of one token reads every weight once: ~13.5 GB at 0.8 x 320 GB/s.
    decode_s = 32 * p.linear[0][1] + p.lm_head[0][1]
    assert 0.045 < decode_s < 0.06
    # A T4 holds ~13.5 GB of Llama-2-7B weights; the rest, less the reserve, is KV (512 KiB/token).
    dev, host = kv_capacity_tokens(hw, LLAMA2, 2)
    assert 2000 < dev < 4000 and host > 100_000
    for table in (p.linear, p.prefill_attn, p.d2h, p.lm_head):
        assert [x for x, _ in table] == sorted(x for x, _ in table)
        assert all(t > 0 for _, t in table)


def test_model_that_does_not_fit_is_a_clear_error():
    with pytest.raises(ValueError, match="does not fit on T4"):
        build_machine(MODEL_SHAPES["llama3.1-8b"], EngineConfig(), 2,
                      hw=Hardware(GPUS["t4"], HOSTS["server-ddr4"]), model_name="llama3.1-8b")


def test_cli_json_and_custom_hardware(tmp_path, capsys):
    hw = dataclasses.replace(Hardware(GPUS["a10"], HOSTS["desktop-ddr4"]),
                             iteration_overhead_s=1e-3)
    hw_file = tmp_path / "box.json"
    hw_file.write_text(json.dumps(hw.to_dict()))
    out = tmp_path / "sim.json"
    assert main(["--gpu", "custom", "--hardware", str(hw_file), "--cpu-cores", "4",
                 "--model", "llama3.1-8b", "--workload", "mixed", "--num-requests", "12",
                 "--length-scale", "0.25", "--rate", "20", "--policies", "gpu-only,apex",
                 "--json", str(out), "--no-progress"]) == 0
    rep = json.loads(out.read_text())
    assert set(rep) >= {"policies", "workload", "model", "hardware", "date", "command"}
    assert rep["hardware"]["host"]["cores"] == 4 and rep["hardware"]["gpu"]["name"] == "A10"
    for name in ("gpu-only", "apex"):
        assert set(rep["policies"][name]) >= set(FIELDS)
        assert rep["policies"][name]["completed"] == 12
    assert rep["policies"]["gpu-only"]["ratio_to_gpu_only"] == 1.0
    assert "| apex |" in capsys.readouterr().out


def test_yaml_hardware(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "box.yaml"
    path.write_text(yaml.safe_dump(Hardware(GPUS["t4"], HOSTS["server-ddr5"]).to_dict()))
    hw = load_hardware(path)
    assert hw.host.cores == 64 and hw.gpu.mem_bw_gbps == 320
    path.write_text("gpu: {name: x}\n")
    with pytest.raises(ValueError, match="bad hardware description"):
        load_hardware(path)


def test_custom_needs_a_file():
    with pytest.raises(ValueError, match="--hardware"):
        main(["--gpu", "custom", "--num-requests", "2", "--no-progress"])


# ------------------------------------------------------------------------------ workloads

def test_workloads_are_seeded_and_shaped():
    chat = workloads.synthetic("chat", 50, seed=3)
    assert chat == workloads.synthetic("chat", 50, seed=3)
    assert all(32 <= s.prompt_len <= 128 and 256 <= s.output_len <= 512 for s in chat)
    assert all(s.arrival_s == 0.0 for s in chat)
    long = workloads.synthetic("long-input", 50, length_scale=0.5, seed=3)
    assert all(512 <= s.prompt_len <= 1024 and 8 <= s.output_len <= 32 for s in long)
    timed = workloads.synthetic("mixed", 200, rate=10.0, seed=3)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(timed, timed[1:])]
    assert min(gaps) >= 0 and 0.07 < sum(gaps) / len(gaps) < 0.13        # ~1 / rate
    # The arrival process draws after the lengths: every rate runs the same requests.
    same = workloads.synthetic("mixed", 200, seed=3)
    assert [(s.prompt_len, s.output_len) for s in timed] == [(s.prompt_len, s.output_len)
                                                             for s in same]
    ids = workloads.prompt_token_ids(chat[:3], 100)
    assert [len(i) for i in ids] == [s.prompt_len for s in chat[:3]]
    assert all(3 <= t < 100 for i in ids for t in i)


def test_trace_round_trip_and_errors(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival_s": 1.5, "prompt_len": 10, "output_len": 4, "extra": 1}\n\n'
                    '{"arrival_s": 0, "prompt_len": 3, "output_len": 2}\n')
    specs = workloads.make_workload("trace", 10, trace=str(path))
    assert specs == [workloads.RequestSpec(0.0, 3, 2), workloads.RequestSpec(1.5, 10, 4)]
    assert workloads.load_trace(path, 1, length_scale=2.0) == [workloads.RequestSpec(0.0, 6, 4)]
    for line, message in (('{"arrival_s": 0, "prompt_len": 3}', "line 2: missing output_len"),
                          ('[1, 2]', "line 2: expected an object"),
                          ('{"arrival_s": -1, "prompt_len": 3, "output_len": 1}', "arrival_s"),
                          ('{"arrival_s": 0, "prompt_len": 2.5, "output_len": 1}', "prompt_len"),
                          ('not json', "line 2: not valid JSON")):
        path.write_text('{"arrival_s": 0, "prompt_len": 3, "output_len": 2}\n' + line + "\n")
        with pytest.raises(ValueError, match=message):
            workloads.load_trace(path)
    with pytest.raises(ValueError, match="needs --trace"):
        workloads.make_workload("trace", 3)
    with pytest.raises(ValueError, match="rate"):
        workloads.synthetic("chat", 3, rate=0.0)
    with pytest.raises(ValueError, match="length-scale"):
        workloads.check_fits(workloads.synthetic("chat", 3), 100)
    assert math.isinf(workloads.synthetic.__defaults__[0])


def strict_json(text: str):
    """json.loads that refuses Infinity and NaN, as jq and JavaScript's JSON.parse do."""
    def refuse(name):
        raise ValueError(f"not standard JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_report_json_is_standard_for_an_infinite_rate(tmp_path):
    """The default rate is inf (every request at t = 0): written null, not Infinity, and so is
    any other non-finite figure."""
    from apex_mini import metrics
    out = tmp_path / "sim.json"
    assert main(["--num-requests", "3", "--policies", "gpu-only", "--json", str(out),
                 "--no-progress"]) == 0
    rep = strict_json(out.read_text())
    assert rep["workload"]["rate"] is None
    assert "every request at t = 0" in metrics.markdown(rep)
    from apex_mini.cli import json_text
    assert strict_json(json_text({"x": [math.nan, 1.5], "y": {"z": -math.inf}})) == \
        {"x": [None, 1.5], "y": {"z": None}}


@pytest.mark.parametrize("tool", ["simulate", "bench serve"])
def test_a_trace_runs_whole_unless_num_requests_cuts_it(tmp_path, tool):
    """Without --num-requests a trace keeps every request (a synthetic workload takes the
    tool's default count); with it, the first ones by arrival."""
    import apex_mini.bench_serve as bench_serve
    import apex_mini.simulate as simulate
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(f'{{"arrival_s": {i}, "prompt_len": 3, "output_len": 2}}\n'
                            for i in range(250)))
    parser = (simulate if tool == "simulate" else bench_serve).build_parser()
    trace = ["--workload", "trace", "--trace", str(path)]
    assert len(workloads.from_args(parser.parse_args(trace), seed=0)) == 250
    assert len(workloads.from_args(parser.parse_args(trace + ["--num-requests", "7"]), 0)) == 7
    default = 200 if tool == "simulate" else 32
    assert len(workloads.from_args(parser.parse_args([]), seed=0)) == default


def test_num_requests_must_be_positive_for_a_trace(tmp_path):
    """0 or a negative count is an error, not "every request"; None keeps meaning all."""
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_len": 3, "output_len": 2}\n' * 3)
    assert len(workloads.load_trace(path, None)) == 3
    for n in (0, -1):
        with pytest.raises(ValueError, match="--num-requests must be at least 1"):
            workloads.load_trace(path, n)
        with pytest.raises(ValueError, match="--num-requests must be at least 1"):
            workloads.make_workload("trace", n, trace=str(path))
    assert len(workloads.make_workload("trace", None, trace=str(path))) == 3


def test_scheduler_time_adds_the_schedulers_wall_time(tmp_path, monkeypatch):
    """--scheduler-time adds the wall time spent in schedule() and finish() to the simulated
    clock. With a fake wall clock that ticks 1 s per reading, that is exactly 2 s per
    iteration (one reading before and after each call), so the run ends 2 s x iterations later
    than without the flag, and a first token after k iterations comes 2k s later. Every
    request arrives at t = 0 and there is no noise, so both runs make the same plans."""
    import types

    import apex_mini.simulate as simulate

    def run(*flags):
        """(the gpu-only row, scheduler iterations: four clock readings each)."""
        readings = []

        def perf_counter():
            readings.append(float(len(readings)))
            return readings[-1]
        monkeypatch.setattr(simulate, "time", types.SimpleNamespace(perf_counter=perf_counter))
        out = tmp_path / f"sim{len(flags)}.json"
        assert main(["--num-requests", "6", "--policies", "gpu-only", "--json", str(out),
                     "--no-progress", *flags]) == 0
        assert len(readings) % 4 == 0
        return json.loads(out.read_text())["policies"]["gpu-only"], len(readings) // 4

    plain, loops = run()
    timed, loops_timed = run("--scheduler-time")
    assert loops == loops_timed and loops == plain["iterations"] > 1
    assert timed["iterations"] == plain["iterations"]
    assert timed["duration_s"] == pytest.approx(plain["duration_s"] + 2.0 * loops)
    for t, p in zip(timed["samples"]["ttft_s"], plain["samples"]["ttft_s"]):
        k = round((t - p) / 2.0)
        assert k >= 1 and t == pytest.approx(p + 2.0 * k), (t, p)
