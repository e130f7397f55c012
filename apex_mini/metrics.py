"""Serving metrics, shared by the measured benchmark and the simulator so both report alike.

Per request (all times in seconds on one clock; the benchmark's is `perf_counter`, the
simulator's is simulated):

    TTFT   time to first token = first token time - arrival time (queueing included)
    TPOT   time per output token after the first = (finish - first token) / (outputs - 1)

Per policy: output tokens/s over the run (from the start to the last finish), TTFT and TPOT at
p50 and p99, requests completed, preemptions, swaps (moves between tiers, either way) and
parks (the swaps out that parked an evicted request on the host instead of preempting it), and
the strategy mix (the fraction of iterations that ran each `Strategy`).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .plan import Plan, Strategy

FIELDS = ("throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "completed",
          "num_requests", "preemptions", "swaps", "parks", "strategy_mix", "ratio_to_gpu_only")


POLICY_NAMES = ("gpu-only", "static", "neo", "apex")


def add_cli_flags(p: argparse.ArgumentParser) -> None:
    """The policy and output flags `bench serve` and `simulate` share."""
    p.add_argument("--policies", default=",".join(POLICY_NAMES),
                   help="comma-separated policies to run, in order (default: all four)")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--markdown", help="write the report as a markdown table here")
    p.add_argument("--plot", help="write throughput and latency-CDF plots here (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def parse_policies(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in POLICY_NAMES]
    if bad or not names:
        raise ValueError(f"unknown policies {bad or text!r}; choose from {', '.join(POLICY_NAMES)}")
    return names


class IterationTally:
    """Counts iterations by strategy, and those that ran host-resident decodes."""

    def __init__(self) -> None:
        self.strategies: Counter[str] = Counter()
        self.host_iterations = 0
        self.host_decodes = 0

    def add(self, plan: Plan) -> None:
        if plan.is_empty:
            return
        self.strategies[plan.strategy.value] += 1
        self.host_iterations += bool(plan.cpu_decodes)
        self.host_decodes += len(plan.cpu_decodes)

    @property
    def iterations(self) -> int:
        return sum(self.strategies.values())

    def mix(self) -> dict[str, float]:
        n = max(1, self.iterations)
        return {s.value: self.strategies[s.value] / n for s in Strategy}


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def latencies(seqs) -> tuple[list[float], list[float]]:
    """(TTFTs, TPOTs) in seconds of the finished requests; TPOT needs two or more outputs."""
    ttft, tpot = [], []
    for s in seqs:
        if s.finish_time is None or s.first_token_time is None:
            continue
        ttft.append(s.first_token_time - s.arrival_time)
        if s.num_output > 1:
            tpot.append((s.finish_time - s.first_token_time) / (s.num_output - 1))
    return ttft, tpot


def summarize(seqs, start: float, tally: IterationTally, preemptions: int, swaps: int,
              parks: int = 0, keep_samples: bool = True) -> dict:
    """One policy's row. `seqs` are every request of the run, `start` the clock at t = 0."""
    done = [s for s in seqs if s.finish_time is not None]
    end = max((s.finish_time for s in done), default=start)
    tokens = sum(s.num_output for s in done)
    ttft, tpot = latencies(done)
    row = {
        "throughput_tok_s": tokens / (end - start) if end > start else 0.0,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
        "completed": len(done), "num_requests": len(seqs),
        "preemptions": preemptions, "swaps": swaps, "parks": parks,
        "strategy_mix": tally.mix(), "ratio_to_gpu_only": None,
        "output_tokens": tokens, "duration_s": end - start, "iterations": tally.iterations,
        "host_decode_iterations": tally.host_iterations, "host_decodes": tally.host_decodes,
    }
    if keep_samples:
        row["samples"] = {"ttft_s": ttft, "tpot_s": tpot}
    return row


def add_ratios(policies: dict[str, dict]) -> None:
    """Fill ratio_to_gpu_only when gpu-only ran: throughput / gpu-only's. Rows of repeated runs
    taken in turns (`throughput_runs`, one per round) get the median of the rounds' own
    ratios, so that a machine drifting between rounds moves both sides of each ratio alike."""
    base = policies.get("gpu-only", {})
    for row in policies.values():
        runs, base_runs = row.get("throughput_runs"), base.get("throughput_runs")
        if runs and base_runs and len(runs) == len(base_runs) and all(base_runs):
            row["ratio_to_gpu_only"] = statistics.median(r / b for r, b in zip(runs, base_runs))
        else:
            b = base.get("throughput_tok_s")
            row["ratio_to_gpu_only"] = row["throughput_tok_s"] / b if b else None


def median_run(rows: list[dict]) -> dict:
    """One policy's repeated runs as one row: the run with the median throughput (the lower of
    the middle two for an even count), plus every run's throughput in run order."""
    ordered = sorted(rows, key=lambda r: r["throughput_tok_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["throughput_runs"] = [r["throughput_tok_s"] for r in rows]
    return row


def report(policies: dict[str, dict], workload: dict, model: dict, hardware: dict, program: str,
           argv: list[str] | None = None, **extra) -> dict:
    """The JSON document both commands write: results plus what, where, when and how.
    `program` is the command's module path, e.g. 'apex_mini.simulate'. The workload's `rate`
    (requests/s) is written null when every request arrives at t = 0 (an infinite rate; a trace
    keeps its own arrivals whatever the rate): the file is standard JSON, with no Infinity or
    NaN (`write_outputs`)."""
    add_ratios(policies)
    command = " ".join(["python", "-m", program] + list(sys.argv[1:] if argv is None else argv))
    return {"policies": policies, "workload": workload, "model": model, "hardware": hardware,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command, **extra}


def _fmt(x: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if x is None else f"{x * scale:.{digits}g}"


def markdown(rep: dict) -> str:
    """A markdown table of the policies, with the run's context beneath."""
    lines = ["| policy | output tok/s | x gpu-only | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) "
             "| TPOT p99 (ms) | completed | preemptions | swaps | strategy mix (iterations) |",
             "|" + "---|" * 11]
    for name, r in rep["policies"].items():
        mix = ", ".join(f"{k} {v:.0%}" for k, v in r["strategy_mix"].items() if v)
        lines.append(
            f"| {name} | {r['throughput_tok_s']:.1f} | {_fmt(r['ratio_to_gpu_only'])} "
            f"| {_fmt(r['ttft_p50_s'])} | {_fmt(r['ttft_p99_s'])} | {_fmt(r['tpot_p50_s'], 1e3)} "
            f"| {_fmt(r['tpot_p99_s'], 1e3)} | {r['completed']}/{r['num_requests']} "
            f"| {r['preemptions']} | {r['swaps']} | {mix or '-'} |")
    w = rep["workload"]
    if rep.get("repeats", 1) > 1:
        lines += ["", f"each policy ran {rep['repeats']} times, the policies taking turns; a row is "
                  "its median-throughput run, x gpu-only the median of the rounds' ratios"]
    lines += ["", f"workload: {w.get('name')}, {w.get('num_requests')} requests, mean prompt "
              f"{w.get('mean_prompt_len', 0):.0f} tokens, mean output "
              f"{w.get('mean_output_len', 0):.0f} "
              f"tokens, {_arrivals(w)}",
              f"model: {_describe(rep['model'])}", f"hardware: {_describe(rep['hardware'])}",
              f"date: {rep['date']}", f"command: `{rep['command']}`"]
    return "\n".join(lines) + "\n"


def _arrivals(workload: dict) -> str:
    rate = workload.get("rate")
    if workload.get("name") == "trace":
        return "arrivals from the trace"
    return "every request at t = 0" if rate is None or math.isinf(rate) else f"rate {rate} req/s"


def compare(simulated: dict, measured: dict) -> dict[str, dict]:
    """Simulated vs measured output tokens/s for each policy in both reports;
    error = simulated / measured - 1."""
    out = {}
    for name, sim in simulated["policies"].items():
        meas = measured["policies"].get(name)
        if meas and meas["throughput_tok_s"]:
            out[name] = {"simulated_tok_s": sim["throughput_tok_s"],
                         "measured_tok_s": meas["throughput_tok_s"],
                         "error": sim["throughput_tok_s"] / meas["throughput_tok_s"] - 1.0}
    return out


def compare_markdown(rows: dict[str, dict]) -> str:
    lines = ["| policy | simulated tok/s | measured tok/s | simulated / measured - 1 |",
             "|---|---|---|---|"]
    lines += [f"| {n} | {r['simulated_tok_s']:.1f} | {r['measured_tok_s']:.1f} "
              f"| {r['error']:+.1%} |" for n, r in rows.items()]
    return "\n".join(lines) + "\n"


def _describe(d: dict) -> str:
    """One line: the name, then scalar fields; nested objects by their own name."""
    parts = [str(d.get("name", ""))] if d.get("name") else []
    for k, v in d.items():
        if k == "name":
            continue
        if isinstance(v, dict):
            v = v.get("name")
        if v is not None and not isinstance(v, (list, dict)):
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def publish(rep: dict, args, title: str) -> None:
    """Print the report's markdown table, write --json / --markdown, and plot to --plot."""
    print(markdown(rep))
    write_outputs(rep, args.json, args.markdown)
    if args.plot:
        from .bench_plot import save_plot
        save_plot(rep, args.plot, title)


def write_outputs(rep: dict, json_path: str | None, markdown_path: str | None) -> None:
    """Write the report to either path given, as standard JSON (a NaN or infinite figure
    is written null: cli.json_text) and as markdown."""
    from .cli import json_text, write_text
    if json_path:
        write_text(json_path, json_text(rep, indent=1))
    if markdown_path:
        write_text(markdown_path, markdown(rep))


def host_cpu_name() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device=None) -> dict:
    """This machine: CPU model and cores, torch version, and the GPU when one is used."""
    info = {"cpu": host_cpu_name(), "cpu_cores": os.cpu_count(), "torch": _torch_version()}
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _torch_version() -> str:
    import torch
    return torch.__version__
