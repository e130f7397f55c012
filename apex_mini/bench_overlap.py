"""`python -m apex_mini.bench overlap`: does CPU attention run while the device computes?

    python -m apex_mini.bench overlap                                 # the shipped model
    python -m apex_mini.bench overlap --model-shape llama2-7b --dtype float16 --device cuda \\
        --num-requests 16 --prompt-len 512 --json overlap.json

The engine serves `--num-requests` requests with the static policy (`--cpu-fraction` of them,
half by default, in the host tier), so every decode step is one merged batch with host rows:
the asynchronous-overlap strategy. After the prefills and a few warm steps it records
`--steps` decode steps with the runner's timeline (`ModelRunner.timeline`), per layer:

    main thread   dev_start, dev_end   issuing device attention (on CUDA: launching kernels)
                  join                 arriving where it waits for the worker's result
    worker        cpu_start, cpu_end   appending K/V to the host pool and attending over it
    GPU (CUDA)    gpu_dev_start/_end   when the device attention's kernels began and ended on
                                       the GPU: CUDA events, mapped to the host clock

Per layer it reports the worker's time, the device attention's time (on the GPU; on a machine
without CUDA, the main thread's), how much of each the two spent at the same time, and the
main thread's wait at the join. On CUDA, `overlap / device` is the share of the GPU's attention
time during which the CPU was attending too: the evidence that the two really run together.
The JSON report keeps every recorded step's stamps (notebook 04 plots them).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time

import torch

from .bench_serve import build_model
from .cli import (ArgumentParser, add_model_flags, check_number, check_output_path, run_cli,
                  write_json)
from .config import EngineConfig
from .cpu_attention import host_kernel
from .engine import Engine
from .metrics import machine_info
from .sampling import SamplingParams
from .sequence import peak_kv_tokens
from .weights import config_for

WARM_STEPS = 3          # decode steps run before recording (the first ones compile, on a CPU)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m apex_mini.bench overlap",
                       description="Record when CPU attention and device attention run, "
                                   "per layer, in decode steps with host rows.")
    add_model_flags(p)
    p.add_argument("--num-requests", type=int, default=8,
                   help="requests decoding together, >= 2 (default 8)")
    p.add_argument("--prompt-len", type=int, default=256,
                   help="tokens per prompt (random ids), >= 1 (default 256)")
    p.add_argument("--steps", type=int, default=5, help="decode steps to record, >= 1 (default 5)")
    p.add_argument("--json", default=None, help="write the summary and every step's stamps here "
                   "(default: none)")
    EngineConfig.add_cli_flags(p, skip=("policy",))
    return p


# ------------------------------------------------------------------------------ the analysis

def by_layer(stamps: list) -> dict[int, dict[str, float]]:
    """{layer: {event: time}} from one merged-batch step's (event, layer, time) stamps."""
    layers: dict[int, dict[str, float]] = {}
    for what, layer, t in stamps:
        layers.setdefault(layer, {})[what] = t
    return layers


def device_interval(ev: dict[str, float]) -> tuple[float, float]:
    """When the layer's device attention ran: on the GPU where it was stamped, else on the main
    thread (the "device" is then the CPU)."""
    if "gpu_dev_start" in ev:
        return ev["gpu_dev_start"], ev["gpu_dev_end"]
    return ev["dev_start"], ev["dev_end"]


def layer_figures(ev: dict[str, float]) -> dict[str, float]:
    """One layer with host rows: seconds of worker, device attention, both at once, and wait."""
    dev_start, dev_end = device_interval(ev)
    both = min(ev["cpu_end"], dev_end) - max(ev["cpu_start"], dev_start)
    return {"worker_s": ev["cpu_end"] - ev["cpu_start"], "device_s": dev_end - dev_start,
            "overlap_s": max(0.0, both), "wait_s": max(0.0, ev["cpu_end"] - ev["join"])}


def summarize(timelines: list[list]) -> dict:
    """Medians per layer (microseconds) over every recorded layer with host rows, and the
    shares of worker and device time spent together (totals over all of them)."""
    events = [ev for stamps in timelines for ev in by_layer(stamps).values()]
    layers = [layer_figures(ev) for ev in events if "cpu_start" in ev]
    if not layers:
        raise ValueError("no recorded layer ran host attention: the steps had no host rows "
                         "(raise --cpu-fraction, --max-num-seqs, or --cpu-kv-blocks / "
                         "--cpu-kv-gb)")
    total = {k: sum(f[k] for f in layers) for k in layers[0]}
    on_gpu = any("gpu_dev_start" in ev for ev in events)
    return {"layers": len(layers), "device_clock": "gpu" if on_gpu else "host",
            **{k.replace("_s", "_us"): statistics.median(f[k] for f in layers) * 1e6
               for k in layers[0]},
            "overlap_of_worker": total["overlap_s"] / total["worker_s"] if total["worker_s"] else 0.0,
            "overlap_of_device": total["overlap_s"] / total["device_s"] if total["device_s"] else 0.0,
            "layers_overlapping": sum(f["overlap_s"] > 0 for f in layers) / len(layers)}


def format_summary(s: dict) -> str:
    clock = "the GPU's" if s["device_clock"] == "gpu" else "the main thread's (no CUDA)"
    return (f"# {s['layers']} layers with host rows; device attention timed on {clock} clock\n"
            f"per layer (median): worker {s['worker_us']:.0f} us, device attention "
            f"{s['device_us']:.0f} us, both at once {s['overlap_us']:.0f} us, main thread's wait "
            f"at the join {s['wait_us']:.0f} us\n"
            f"together: {s['overlap_of_device']:.0%} of the device attention's time and "
            f"{s['overlap_of_worker']:.0%} of the worker's; {s['layers_overlapping']:.0%} of "
            f"layers overlapped")


# ------------------------------------------------------------------------------ the run

def tokens_per_request(num_requests: int, prompt_len: int, steps: int, budget: int) -> int:
    """Output tokens enough for every request to be decoding still when the recording ends
    (those admitted first decode while the later ones prefill, `budget` tokens a step)."""
    prefill_steps = -(-num_requests * prompt_len // budget) + 1
    return prefill_steps + WARM_STEPS + steps + 2


def record(engine: Engine, num_requests: int, prompt_len: int, steps: int, seed: int) -> list[dict]:
    """Serve the requests to their decode steps, then record `steps` steps:
    [{"plan": summary, "t0", "t1": the step's bounds, "stamps": [...]}, ...]."""
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    max_tokens = tokens_per_request(num_requests, prompt_len, steps,
                                    engine.cfg.max_num_batched_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for _ in range(num_requests):
        engine.add_request(torch.randint(3, vocab, (prompt_len,), generator=g).tolist(), params)
    while engine.has_work() and engine.step()[0].prefills:       # prefills first
        pass
    for _ in range(WARM_STEPS):
        engine.step()
    runner, recorded = engine.runner, []
    try:
        for _ in range(steps):
            runner.timeline = []
            t0 = time.perf_counter()
            plan, _ = engine.step()
            recorded.append({"plan": plan.summary(), "t0": t0, "t1": time.perf_counter(),
                             "stamps": runner.timeline})
    finally:
        runner.timeline = None
    return recorded


def check_host_rows(cfg: EngineConfig, prompt_len: int, new_tokens: int) -> None:
    """The static policy must be able to put requests in the host tier while others decode on
    the device, else no step has host rows to record."""
    if cfg.cpu_fraction == 0:
        raise ValueError("--cpu-fraction 0 puts no request in the host tier: nothing to overlap")
    if cfg.max_num_seqs < 2:
        raise ValueError(f"--max-num-seqs {cfg.max_num_seqs} runs one request at a time, never one "
                         "on each tier; give at least 2")
    per_request = -(-peak_kv_tokens(prompt_len, new_tokens) // cfg.block_size)
    if cfg.cpu_kv_blocks is not None and cfg.cpu_kv_blocks < per_request:
        raise ValueError(f"--cpu-kv-blocks {cfg.cpu_kv_blocks} cannot hold one request's KV "
                         f"({per_request} blocks of --prompt-len and the decode steps), so none "
                         "would run on the host; raise --cpu-kv-blocks or lower --prompt-len")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_requests < 2:
        raise ValueError(f"--num-requests must be at least 2 (one on each tier), got "
                         f"{args.num_requests}")
    check_number(args.prompt_len, "--prompt-len", positive=True, whole=True)
    check_number(args.steps, "--steps", positive=True, whole=True)
    check_output_path(args.json, "--json")
    cfg = dataclasses.replace(EngineConfig.from_cli(args), policy="static")
    new_tokens = tokens_per_request(args.num_requests, args.prompt_len, args.steps,
                                    cfg.max_num_batched_tokens)
    need = args.prompt_len + new_tokens
    check_host_rows(cfg, args.prompt_len, new_tokens)
    mc = config_for(args.model, args.model_shape)          # before the weights load
    context = cfg.context_length(mc) if mc is not None else need
    if need > context:
        limit, fix = ((f"--max-model-len {context}", " or raise --max-model-len")
                      if context < mc.max_position_embeddings else
                      (f"the model's context of {context}", ""))
        raise ValueError(f"--prompt-len {args.prompt_len} and the decode steps need {need} "
                         f"tokens, past {limit}; lower --prompt-len{fix}")
    model, mc, model_info = build_model(args, cfg)
    engine = Engine(model, cfg, progress=False)
    try:
        recorded = record(engine, args.num_requests, args.prompt_len, args.steps, cfg.seed)
        # Which host kernel the worker ran: the overlap depends on it.
        kernel = host_kernel(engine.runner.compile_cpu_attention)
    finally:
        engine.close()
    summary = summarize([r["stamps"] for r in recorded])
    command = "python -m apex_mini.bench overlap " + " ".join(sys.argv[1:] if argv is None else argv)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    machine = machine_info(engine.device)
    print(f"# {command}\n# {date}, {', '.join(f'{k} {v}' for k, v in machine.items())}\n"
          f"# model {model_info['name']}, "
          f"{model_info['dtype']} on {engine.device}, {kernel} CPU attention; last step: "
          f"{recorded[-1]['plan']}")
    print(format_summary(summary))
    if args.json:
        write_json(args.json, {"command": command, "date": date, "machine": machine,
                               "model": model_info, "host_kernel": kernel,
                               "summary": summary, "steps": recorded})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
