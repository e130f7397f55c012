"""`python -m apex_mini.profile`: measure this machine's cost tables, and check the predictor.

    python -m apex_mini.profile                                   # the shipped model
    python -m apex_mini.profile --model-shape llama2-7b --device cuda --dtype float16
    python -m apex_mini.profile --quick --report --json report.json

The profile is saved where the engine looks for it (a cache keyed by model shape, dtype and
hardware; see profiler.py) and to --out. --report then runs a short mixed workload four times
(policy apex, GPU-only, and overlap and pipelining forced, so every strategy has iterations)
and compares each iteration's predicted time, asked before it ran, with the measured one. The
predictor keeps its feedback (feedback.py) from run to run, as a long-running engine would;
the report also scores the tables alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import random
import sys

from .cli import ArgumentParser, add_model_flags, check_output_path, run_cli, write_json
from .config import EngineConfig

REPORT_RUNS = ("apex", "gpu-only", "overlap", "pipeline")
WARMUP_TOKENS = 4     # outputs per request of the report's untimed warm-up run


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m apex_mini.profile",
                       description="Time the pieces of an iteration on this machine and "
                                   "save the table the predictor reads.")
    add_model_flags(p)
    p.add_argument("--out", default=None,
                   help="also write the profile JSON here (it is always saved to the cache the "
                        "engine reads: $APEX_MINI_CACHE/profiles or ~/.cache/apex_mini/profiles; "
                        "default: none)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller grid with fewer repeats (what the engine uses when it has to "
                        "profile on its own; default: off)")
    p.add_argument("--reuse", action="store_true",
                   help="use the cached profile when it is current instead of measuring again "
                        "(default: off)")
    p.add_argument("--report", action="store_true",
                   help="run a short mixed workload under every strategy and report the "
                        "predictor's error against measured iteration times (default: off)")
    p.add_argument("--json", default=None, help="write the --report results here as JSON "
                   "(default: none)")
    p.add_argument("--requests", type=int, default=16,
                   help="--report: requests per run (default: %(default)s)")
    p.add_argument("--show", type=int, default=8,
                   help="--report: print this many of apex's scheduling decisions (>= 0; 0: none; "
                        "default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: off)")
    EngineConfig.add_cli_flags(p, skip=("policy", "profile_path", "seed", "cpu_fraction"))
    return p


# ------------------------------------------------------------------------------- the report

def workload(n: int, vocab: int, max_len: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, output tokens) pairs: short and long prompts, short and long outputs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.choice((8, 16, 32, 64, 128)) + rng.randrange(8)
        output = rng.choice((8, 16, 32, 48))
        prompt = min(prompt, max(1, max_len - output - 1))
        out.append(([rng.randrange(3, vocab) for _ in range(prompt)], output))
    return out


def make_engine(model, cfg: EngineConfig, run: str, predictor):
    """An engine whose policy is `run`: apex, gpu-only, or apex's placement with one strategy
    forced (overlap, pipeline)."""
    from .engine import Engine
    from .plan import Strategy
    from .predictive_policies import ForcedStrategyPolicy
    policy = "gpu-only" if run == "gpu-only" else "apex"
    engine = Engine(model, dataclasses.replace(cfg, policy=policy), predictor=predictor)
    if run in ("overlap", "pipeline"):
        forced = ForcedStrategyPolicy(cfg, predictor, Strategy(run))
        engine.policy = engine.scheduler.policy = forced
    return engine


def run_report(model, cfg: EngineConfig, predictor, requests: int = 16, seed: int = 0,
               progress: bool = True) -> dict:
    """Run the workload under each of REPORT_RUNS; the predictor's error over all iterations,
    per strategy and per run, every iteration's predicted and measured time (`points`), and
    apex's decisions with their reasons."""
    from tqdm import tqdm
    from .sampling import SamplingParams
    mc = model.config
    max_len = cfg.context_length(mc)
    jobs = workload(requests, mc.vocab_size, max_len, seed)
    blocks = [-(-(len(p) + o) // cfg.block_size) for p, o in jobs]     # each request's KV
    if cfg.gpu_kv_blocks is None:      # room for about a third of the requests: the host tier works
        cfg = dataclasses.replace(cfg, gpu_kv_blocks=max(max(blocks) + 1, sum(blocks) // 3))
    if cfg.cpu_kv_blocks is None:      # not the default gigabytes: each run builds an engine
        cfg = dataclasses.replace(cfg, cpu_kv_blocks=sum(blocks) + 1)
    records, per_run, points = [], {}, []
    # Untimed first: every prompt, a few tokens each, so the runs' prefill sizes do not meet
    # kernels for the first time in the process (on an H200 such first prefills took 1.4x to
    # 4.8x the tables' time, with the first 4 prompts as the warm-up).
    warm_jobs = [(ids, min(n, WARMUP_TOKENS)) for ids, n in jobs]
    runs = [("warm-up", "overlap")] + [(r, r) for r in REPORT_RUNS]
    for label, run in tqdm(runs, desc="report", unit="run", disable=not progress, leave=False):
        engine = make_engine(model, cfg, run, predictor)
        try:
            for ids, n in (warm_jobs if label == "warm-up" else jobs):
                engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
            while engine.has_work():
                engine.step()
        finally:
            engine.close()
        if label == "warm-up":
            continue
        per_run[label] = predictor.error_report(engine.records)
        records += engine.records
        points += [dict(_decision(r, predictor), run=label) for r in engine.records]
    report = predictor.error_report(records)
    report.update(feedback=predictor.feedback.correction() if predictor.feedback else None,
                  by_run=per_run, decisions=[p for p in points if p["run"] == "apex"],
                  points=points, gpu_kv_blocks=cfg.gpu_kv_blocks, requests=requests,
                  profile_key=predictor.profile.key)
    return report


def _decision(record, predictor) -> dict:
    predicted, b = predictor.scored(record.shape, record.plan)
    return {"plan": record.plan.summary(), "strategy": record.plan.strategy.value,
            "path": predictor.path(record.shape, record.plan.strategy),
            "predicted_ms": round(predicted * 1e3, 3), "table_ms": round(b["table_s"] * 1e3, 3),
            "measured_ms": round(record.measured_s * 1e3, 3),
            "reason": record.plan.reason, "captured_graph": record.captured_graph}


def format_report(report: dict, show: int = 8) -> str:
    def pct(x):
        return "   -  " if x is None else f"{100 * x:5.1f}%"
    lines = [f"{'strategy':10s} {'iterations':>10s} {'median err':>10s} {'p90 err':>8s}"]
    for name, r in report["by_strategy"].items():
        lines.append(f"{name:10s} {r['n']:10d} {pct(r['median_rel_error']):>10s} "
                     f"{pct(r['p90_rel_error']):>8s}")
    lines.append(f"{'all':10s} {report['n']:10d} {pct(report['median_rel_error']):>10s} "
                 f"{pct(report['p90_rel_error']):>8s}")
    tables = report.get("tables_only")
    if tables and tables["n"]:
        lines.append(f"{'(tables only, no feedback)':27s} {pct(tables['median_rel_error']):>5s} "
                     f"{pct(tables['p90_rel_error']):>8s}")
    captures = report.get("graph_captures")
    if captures and captures["n"]:
        lines.append(f"not scored: {captures['n']} iterations that captured a CUDA graph "
                     f"({1e3 * captures['measured_s']:.0f} ms in all; a one-time cost)")
    if report.get("feedback"):
        lines.append(f"feedback correction at the end: x{report['feedback']:.2f}")
    if show and report.get("decisions"):
        lines += ["", f"apex's first {min(show, len(report['decisions']))} decisions "
                      "(predicted / measured, ms):"]
        for d in report["decisions"][:show]:
            captured = " (captured a CUDA graph)" if d.get("captured_graph") else ""
            lines.append(f"  {d['predicted_ms']:8.2f} / {d['measured_ms']:8.2f}  {d['plan']}  "
                         f"[{d['reason']}]{captured}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    from .engine import Engine
    from .metrics import machine_info
    from .predictor import Predictor
    from .weights import model_for, resolve_device
    from .profiler import (DECODE_POOL_BYTES, FULL, QUICK, cache_path, engine_key, load_profile,
                           profile_engine)
    args = build_parser().parse_args(argv)
    if args.json and not args.report:
        raise ValueError("--json writes the --report results; add --report")
    if args.requests < 1:
        raise ValueError(f"--requests={args.requests} must be at least 1")
    if args.show < 0:
        raise ValueError(f"--show={args.show} must be >= 0 (0 prints no decisions)")
    check_output_path(args.out, "--out")
    check_output_path(args.json, "--json")
    cfg = EngineConfig.from_cli(args)
    model, name = model_for(args.model, args.model_shape, cfg.dtype, resolve_device(cfg.device))
    progress = not args.no_progress
    # An engine only for its pools and runner settings (policy gpu-only: no predictor needed);
    # its device pool is where whole decode iterations are timed.
    per_block = model.config.kv_bytes_per_token(next(model.parameters()).element_size()) * cfg.block_size
    blocks = cfg.gpu_kv_blocks or max(16, DECODE_POOL_BYTES // per_block)
    engine = Engine(model, dataclasses.replace(cfg, policy="gpu-only", gpu_kv_blocks=blocks))
    key = engine_key(engine)
    path = cache_path(key)
    profile, why = load_profile(path, key) if args.reuse else (None, "")
    if profile is None:
        print(f"profiling {name} on {key['device_name']} ({key['dtype']}); {why or 'measuring'}",
              file=sys.stderr)
        profile = profile_engine(engine, QUICK if args.quick else FULL, progress)
        profile.to_json(path)
    engine.close()
    print(f"profile: {path}")
    if args.out:
        profile.to_json(args.out)
        print(f"profile: {args.out}")
    print(f"overhead {profile.overhead * 1e3:.3f} ms/iteration, host job {profile.host_job_s * 1e6:.1f} "
          f"us/layer")
    if args.report:
        predictor = Predictor(profile, bucket_decode=cfg.bucket_decode,
                              feedback=cfg.predictor_feedback)
        report = run_report(model, cfg, predictor, args.requests, progress=progress)
        command = "python -m apex_mini.profile " + " ".join(sys.argv[1:] if argv is None else argv)
        report.update(model=name, command=command, machine=machine_info(engine.device),
                      date=datetime.datetime.now().isoformat(timespec="seconds"))
        print(format_report(report, args.show))
        if args.json:
            write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
