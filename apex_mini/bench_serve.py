"""`python -m apex_mini.bench serve`: one serving workload through every policy, measured.

    python -m apex_mini.bench serve                                   # the shipped model, chat
    python -m apex_mini.bench serve --workload long-input --num-requests 16 --length-scale 0.1
    python -m apex_mini.bench serve --model-shape llama2-7b --gpu-memory-gb 16 --json out.json
    python -m apex_mini.bench serve --repeats 3                       # policies in turns, medians

The model is built once; each policy gets its own engine (and KV pools) around it, freed before
the next. Requests are released by wall-clock arrival time between `Engine.step()` calls, and
TTFT counts from the intended arrival, so time a request waits for the running step is included.
Prompts are random token ids and outputs ignore end-of-sequence, so every policy computes exactly
the same number of tokens. The metrics are the simulator's (metrics.py).

On a noisy machine, `--repeats N` runs every policy N times, in turns (gpu-only, static, neo,
apex, gpu-only, ...), and reports each policy's median run and the median of the rounds' own
ratios to gpu-only: one run per policy, back to back, compares machines minutes apart.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import sys
import time

import torch
from tqdm import tqdm

from . import metrics, workloads
from .cli import (ArgumentParser, add_model_flags, check_output_path, check_threads,
                  policy_list, run_cli)
from .config import EngineConfig
from .cpu_attention import host_kernel
from .engine import Engine
from .sampling import SamplingParams
from .sequence import Status
from .simulate import check_trace_arg
from .weights import model_for, resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m apex_mini.bench serve",
                       description="Run one serving workload through every policy.")
    add_model_flags(p)
    p.add_argument("--torch-threads", type=int, default=None, help="intra-op threads for torch, "
                   ">= 1 (default: torch's own choice); 1 avoids thread contention on a busy "
                   "machine")
    p.add_argument("--no-warmup", action="store_true", help="skip each engine's untimed "
                   "warm-up: the workload's first requests, all at once, through every decode "
                   "batch size (default: off)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per policy, the policies taking turns (gpu-only, static, ..., "
                        "gpu-only, ...); each row is the median run, x gpu-only the median of "
                        "the rounds' ratios (default 1)")
    workloads.add_cli_flags(p, default_requests=32)
    metrics.add_cli_flags(p)
    EngineConfig.add_cli_flags(p, skip=("policy",))
    return p


def build_model(args, cfg: EngineConfig):
    """(model, its ModelConfig, a description for the report)."""
    device = resolve_device(cfg.device)
    model, name = model_for(args.model, args.model_shape, cfg.dtype, device, cfg.seed)
    if args.model_shape:
        name += " (random weights)"
    mc, dtype = model.config, next(model.parameters()).dtype
    info = {"name": name, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "parameters": sum(p.numel() for p in model.parameters())}
    return model, mc, info


def run_policy(engine: Engine, specs, prompts, progress: bool) -> dict:
    """Release requests at their arrival times, step until all finish; returns the metrics row.
    The tally and the predictor error cover every iteration of this run: its records are kept
    here, as `engine.records` drops its older half past `max_records` (a long run would be
    undercounted). They are bounded by the run itself, whose requests are all kept anyway."""
    sched = engine.scheduler
    records = []                                            # this run's iterations, in order
    preempt0, swaps0, parks0 = sched.num_preemptions, sched.num_swaps, sched.num_parks
    pending = collections.deque(zip(specs, prompts))
    seqs = []
    bar = tqdm(total=len(specs), desc=engine.policy_name, unit="req", disable=not progress)
    start = time.perf_counter()
    while pending or engine.has_work():
        now = time.perf_counter()
        while pending and start + pending[0][0].arrival_s <= now:
            spec, ids = pending.popleft()
            params = SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True)
            seq = engine.add_request(ids, params)
            seq.arrival_time = start + spec.arrival_s       # TTFT from the intended arrival
            seqs.append(seq)
        if not engine.has_work():
            time.sleep(max(0.0, start + pending[0][0].arrival_s - time.perf_counter()))
            continue
        plan, finished = engine.step()
        if not plan.is_empty:
            records.append(engine.records[-1])              # the record this step made
        bar.update(len(finished))
    bar.close()
    tally = metrics.IterationTally()
    for record in records:
        tally.add(record.plan)
    row = metrics.summarize(seqs, start, tally, sched.num_preemptions - preempt0,
                            sched.num_swaps - swaps0, sched.num_parks - parks0)
    # CUDA graphs captured while timed (each engine captures its own: 57 to 104 ms apiece for
    # Llama-2-7B on an H200, against 7 to 8 ms a replayed step), so a reader can weigh them.
    row["graph_captures"] = sum(record.captured_graph for record in records)
    if engine.predictor is not None:
        row["predictor_error"] = engine.predictor.error_report(records)
    return row


def warm_up(engine: Engine, specs, prompts) -> None:
    """Untimed, before each policy's timed run: the workload's first requests (as many as the
    engine runs at once) arrive at once; once every prompt is in, each decode-only step (what a
    CUDA graph replays) is followed by aborting requests down to the next smaller batch size
    (`smaller_batches`). The timed run's prefill sizes then meet kernels already loaded, and
    its decode batch sizes graphs already captured. (Block-table widths first met at its
    longer contexts are still captured while timed: each run's `graph_captures` counts them.)
    Two tiny requests did neither: on an H200 (Llama-2-7B, 2026-12-04) the first policy's timed
    prefill of 370 tokens took 0.78 s, the next policies' 0.05 s. The engine compiled its host
    kernel when it was built (`cpu_attention.precompile`; before that, `static`'s first timed
    run here served 0.5x its later rounds' tokens/s). Its cost: those prompts prefilled twice."""
    n = min(len(specs), engine.cfg.max_num_seqs)
    running = [engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=spec.output_len,
                                                      ignore_eos=True))
               for spec, ids in zip(specs[:n], prompts)]
    sizes = smaller_batches(n, engine.cfg.bucket_decode)
    while engine.has_work():
        plan, _ = engine.step()
        running = [seq for seq in running if seq.status is not Status.FINISHED]
        if running and not plan.prefills:
            keep = next((size for size in sizes if size < len(running)), 0)
            for seq in running[keep:]:
                engine.abort(seq)
            running = running[:keep]


def smaller_batches(n: int, bucket_decode: bool) -> list[int]:
    """The batch sizes below n that a decode step can be padded to, largest first: the powers
    of two (with `bucket_decode`) or every size."""
    if not bucket_decode:
        return list(range(n - 1, 0, -1))
    return [1 << k for k in reversed(range(max(0, n - 1).bit_length()))]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_threads(args.torch_threads, "--torch-threads")
    threads = torch.get_num_threads()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    try:
        return serve(args, argv)
    finally:
        torch.set_num_threads(threads)


CAPACITY_HINT = "lower --length-scale, or raise --gpu-kv-blocks / --cpu-kv-blocks"


def check_capacity(engine: Engine, specs) -> None:
    """Every request's KV must fit a tier this engine's policy uses: checked before it runs,
    naming this tool's flags (the engine's own check would name --max-new-tokens)."""
    longest = max(specs, key=lambda s: s.total_len)
    engine.scheduler.check_capacity(longest.prompt_len, longest.output_len,
                                    f"the longest request (policy {engine.policy_name})",
                                    CAPACITY_HINT)


def serve(args, argv) -> int:
    # Every input is checked before the model is built: a bad one costs no run.
    policies = policy_list(args.policies, "list each policy once (--repeats N runs each N times)")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    for flag in ("json", "markdown", "plot"):
        check_output_path(getattr(args, flag), f"--{flag}")
    if args.plot:
        from .bench_plot import check_plot
        check_plot()
    check_trace_arg(args)
    cfg = EngineConfig.from_cli(args)
    specs = workloads.from_args(args, cfg.seed)
    model, mc, model_info = build_model(args, cfg)
    workloads.check_fits(specs, cfg.context_length(mc))
    prompts = workloads.prompt_token_ids(specs, mc.vocab_size, cfg.seed)
    runs, predictor = {name: [] for name in policies}, None
    for _round in range(args.repeats):            # in turns: drift hits every policy alike
        for name in policies:
            engine = Engine(model, dataclasses.replace(cfg, policy=name), predictor=predictor,
                            progress=not args.no_progress)
            predictor = predictor or engine.predictor       # profile once, share it
            try:
                check_capacity(engine, specs)
                if not args.no_warmup:
                    warm_up(engine, specs, prompts)
                row = run_policy(engine, specs, prompts, not args.no_progress)
                row["kv_blocks"] = {"gpu": engine.gpu_blocks.num_blocks,
                                    "cpu": engine.cpu_blocks.num_blocks}
                runs[name].append(row)
            finally:
                engine.close()
                del engine
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    rows = {name: metrics.median_run(r) for name, r in runs.items()}
    workload = {"name": args.workload, "rate": args.rate, "length_scale": args.length_scale,
                **workloads.describe(specs)}
    hardware = {**metrics.machine_info(next(model.parameters()).device),
                "torch_threads": torch.get_num_threads(),
                "host_kernel": host_kernel(cfg.compile_cpu_attention)}
    rep = metrics.report(rows, workload, model_info, hardware, "apex_mini.bench serve", argv,
                         simulated=False, repeats=args.repeats)
    metrics.publish(rep, args, f"measured: {model_info['name']}, {args.workload} workload")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
