"""Serving workloads: when requests arrive and how long their prompts and outputs are.

A workload is a list of `RequestSpec` (arrival time in seconds from the start, prompt length and
output length in tokens), sorted by arrival. Both the serving benchmark and the simulator read
the same specs, so a measured run and a simulated run see identical requests.

    chat         short prompt (32-128 tokens), long output (256-512): chain-of-thought-like
    long-input   long prompt (1024-2048 tokens), short output (16-64): summarisation-like
    mixed        each request is chat or long-input with equal odds
    trace        a JSONL file, one request per line:
                     {"arrival_s": 0.25, "prompt_len": 812, "output_len": 97}
                 arrival_s >= 0 (seconds from the start), lengths >= 1; other keys are ignored,
                 so a public trace only needs its columns renamed.

Lengths are multiplied by `length_scale` (at least 1 token), so a CPU run can keep the shape of a
workload at a fraction of its cost. Arrivals are a Poisson process of `rate` requests/s; an
infinite rate puts every request at t = 0 (an offline batch). Everything is seeded.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

# (prompt_lo, prompt_hi, output_lo, output_hi) in tokens, before scaling
SHAPES = {
    "chat": (32, 128, 256, 512),
    "long-input": (1024, 2048, 16, 64),
}
WORKLOADS = ("chat", "long-input", "mixed", "trace")
FIRST_TOKEN_ID = 3          # skip the usual unk/bos/eos ids 0, 1, 2


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float        # seconds after the run starts
    prompt_len: int         # tokens
    output_len: int         # tokens, exact: requests ignore end-of-sequence

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.output_len


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def poisson_arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    """Arrival times (s) of `n` requests at `rate` requests/s; inf -> all at 0."""
    if rate <= 0 or math.isnan(rate):
        raise ValueError(f"--rate must be > 0 requests/s (inf for all at once), not {rate}")
    if math.isinf(rate):
        return [0.0] * n
    t, times = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def synthetic(name: str, num_requests: int, rate: float = math.inf, length_scale: float = 1.0,
              seed: int = 0) -> list[RequestSpec]:
    """A generated workload: 'chat', 'long-input' or 'mixed'."""
    if name not in ("chat", "long-input", "mixed"):
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    _check_counts(num_requests, length_scale)
    rng = random.Random(seed)
    lengths = []                     # drawn first: every --rate gets the same requests
    for _ in range(num_requests):
        kind = name if name != "mixed" else rng.choice(("chat", "long-input"))
        p_lo, p_hi, o_lo, o_hi = SHAPES[kind]
        lengths.append((_scaled(rng.randint(p_lo, p_hi), length_scale),
                        _scaled(rng.randint(o_lo, o_hi), length_scale)))
    arrivals = poisson_arrivals(num_requests, rate, rng)
    return [RequestSpec(t, prompt, output) for t, (prompt, output) in zip(arrivals, lengths)]


def load_trace(path: str | Path, num_requests: int | None = None,
               length_scale: float = 1.0) -> list[RequestSpec]:
    """Read a JSONL trace (format in the module docstring); keeps the first `num_requests` by
    arrival (None: all; 0 or fewer is an error). Bad lines raise ValueError naming the file and
    line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {str(path)!r} not found")
    _check_counts(1 if num_requests is None else num_requests, length_scale)
    specs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"trace {str(path)!r} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object like "
                             '{"arrival_s": 0.0, "prompt_len": 100, "output_len": 50}')
        missing = [k for k in ("arrival_s", "prompt_len", "output_len") if k not in row]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        arrival, prompt, output = row["arrival_s"], row["prompt_len"], row["output_len"]
        if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not (
                math.isfinite(arrival) and arrival >= 0):
            raise ValueError(f"{where}: arrival_s must be a finite number >= 0, not {arrival!r}")
        for key, value in (("prompt_len", prompt), ("output_len", output)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {key} must be an integer >= 1, not {value!r}")
        specs.append(RequestSpec(float(arrival), _scaled(prompt, length_scale),
                                 _scaled(output, length_scale)))
    if not specs:
        raise ValueError(f"trace file {str(path)!r} holds no requests")
    specs.sort(key=lambda s: s.arrival_s)
    return specs if num_requests is None else specs[:num_requests]


def from_args(args, seed: int) -> list[RequestSpec]:
    """The workload `add_cli_flags`' flags describe: without --num-requests, the tool's default
    count of a synthetic workload, or the whole of a trace."""
    n = args.num_requests
    if n is None and args.workload != "trace":
        n = args.synthetic_requests
    return make_workload(args.workload, n, args.rate, args.length_scale, seed, args.trace)


def make_workload(name: str, num_requests: int | None, rate: float = math.inf,
                  length_scale: float = 1.0, seed: int = 0,
                  trace: str | None = None) -> list[RequestSpec]:
    """Dispatch on the workload name; 'trace' needs `trace` (its arrivals are kept, not `rate`;
    `num_requests` None keeps all of it, as `load_trace`)."""
    if name == "trace":
        if not trace:
            raise ValueError("--workload trace needs --trace PATH (a JSONL file)")
        return load_trace(trace, num_requests, length_scale)
    if trace:
        raise ValueError("--trace is only read with --workload trace")
    return synthetic(name, num_requests, rate, length_scale, seed)


def prompt_token_ids(specs: list[RequestSpec], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random prompt ids in [3, vocab_size), one list per request, so random-weight models work."""
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size={vocab_size} is too small for random prompts")
    rng = random.Random(seed + 1)
    return [[rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(s.prompt_len)] for s in specs]


def check_fits(specs: list[RequestSpec], max_model_len: int) -> None:
    """Every request must fit the model's context; say how to shrink it if not."""
    longest = max(s.total_len for s in specs)
    if longest > max_model_len:
        raise ValueError(f"the longest request needs {longest} tokens but the model takes "
                         f"{max_model_len}; lower --length-scale (e.g. "
                         f"{max_model_len / longest * 0.9:.2f}), or raise --max-model-len where it "
                         "is set below the model's context")


def describe(specs: list[RequestSpec]) -> dict:
    """A summary for reports: counts and mean lengths (tokens)."""
    n = len(specs)
    return {"num_requests": n,
            "mean_prompt_len": sum(s.prompt_len for s in specs) / n,
            "mean_output_len": sum(s.output_len for s in specs) / n,
            "total_output_tokens": sum(s.output_len for s in specs),
            "last_arrival_s": specs[-1].arrival_s}


def _check_counts(num_requests: int | None, length_scale: float) -> None:
    if num_requests is None or num_requests < 1:           # None: only a trace knows its count
        raise ValueError(f"--num-requests must be at least 1, not {num_requests}; give how many "
                         "requests to run")
    if not (length_scale > 0 and math.isfinite(length_scale)):
        raise ValueError(f"--length-scale must be a positive number, not {length_scale}")


def add_cli_flags(p: argparse.ArgumentParser, default_requests: int) -> None:
    """The workload flags `bench serve` and `simulate` share."""
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="chat", choices=WORKLOADS,
                   help="chat (short in, long out), long-input (long in, short out), mixed, or "
                   "trace (a JSONL file) (default: chat)")
    g.add_argument("--trace", help="JSONL trace for --workload trace, one "
                   '{"arrival_s": s, "prompt_len": n, "output_len": n} per line')
    g.add_argument("--num-requests", type=int, default=None,
                   help=f"requests in the workload (default: {default_requests}; with --workload "
                   "trace, every request of the trace)")
    p.set_defaults(synthetic_requests=default_requests)
    g.add_argument("--rate", type=float, default=math.inf, help="Poisson arrival rate, requests/s "
                   "(default: inf, every request at t = 0)")
    g.add_argument("--length-scale", type=float, default=1.0, help="multiply prompt and output "
                   "lengths by this, to shrink a workload for a CPU (default: 1)")
