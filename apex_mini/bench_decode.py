"""`python -m apex_mini.bench decode`: decode tokens/s and achieved memory bandwidth against the
roofline, beside transformers' `generate` on the same weights.

    python -m apex_mini.bench decode                  # the shipped model: CPU, and CUDA if present
    python -m apex_mini.bench decode --model-shape llama2-7b --device cuda --dtype float16
    python -m apex_mini.bench decode --batches 1,16 --no-hf --no-cuda-graphs --json out.json

How it measures, identically for both sides: B requests of `--prompt-len` random tokens each
generate n tokens greedily (end-of-sequence ignored). One run with n = 1 (prefill only) and one
with n = `--new-tokens` N; decode time = t(N) - t(1), which holds N - 1 decode steps (the
batch's prefill is one step on both sides: the engine's token budget is raised to B times the
prompt length where it is smaller), and
decode tokens/s = B * (N - 1) / decode time. Ours runs through `Engine.step()` (scheduler,
runner, sampling: everything a server pays per step); theirs through `generate(do_sample=False,
max_new_tokens=n)` with no end-of-sequence id. Each figure is the median of `--repeats` runs after one
untimed warm-up run (which also captures CUDA graphs and compiles, when those are on). The two
sides take turns within each repeat, and the ratio is the median of the repeats' own ratios, so
a machine that drifts between repeats moves both sides of a ratio alike. Both sides share one
process, one weight tensor set and one `torch.set_num_threads`.

Achieved GB/s = bytes a decode step must read (every weight once, only B rows of an untied
embedding table, plus the K/V of every request's context) summed over the steps, / decode time.
Roofline = this device's measured copy bandwidth: bytes moved (read + written) per second by
`dst.copy_(src)` on a buffer far larger than the caches, median of several runs. On a CPU a small
model's weights can sit in the last-level cache, so its achieved GB/s may pass the roofline.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time

import torch

from .cli import (ArgumentParser, add_model_flags, check_output_path, check_threads, run_cli,
                  size_list, write_json)
from .config import EngineConfig
from .engine import Engine
from .metrics import machine_info
from .sampling import SamplingParams
from .sequence import peak_kv_tokens
from .weights import config_for, model_for, resolve_device

BIG_SHAPES = ("llama2-7b", "llama2-13b", "llama3.1-8b")    # transformers on CPU: only if asked
# What --batches, --new-tokens and --repeats take when not given: a full run, or a --quick one.
DEFAULTS = {"batches": "1,8,16,32,64", "new_tokens": 64, "repeats": 3}
QUICK = {"batches": "1,8", "new_tokens": 16, "repeats": 1}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m apex_mini.bench decode",
                       description="Decode tok/s and GB/s vs the roofline and transformers.")
    add_model_flags(p)
    # None: not given, so --quick may choose (see `resolve_quick`).
    p.add_argument("--batches", default=None, help="decode batch sizes, comma-separated (default: "
                   f"{DEFAULTS['batches']}; with --quick {QUICK['batches']})")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (>= 1; "
                   "with --new-tokens, within the model's context; default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (N, "
                   f">= 2; default: {DEFAULTS['new_tokens']}; with --quick {QUICK['new_tokens']})")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median, >= 1; "
                   f"default: {DEFAULTS['repeats']}; with --quick {QUICK['repeats']})")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for both sides, >= 1 (default: torch's own choice)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate (default: "
                   "run it, except for 7B+ shapes on CPU)")
    p.add_argument("--hf", action="store_true", help="run transformers even for 7B+ shapes on CPU "
                   "(default: off)")
    p.add_argument("--json", default=None, help="write {'rows': [...], ...} to this path "
                   "(default: none)")
    p.add_argument("--quick", action="store_true", help="a smoke run: batches 1,8, 16 new tokens, "
                   "1 repeat, for those of the three flags not given (default: off)")
    # The token budget is the bench's: each batch prefills in one step (see bench_device).
    EngineConfig.add_cli_flags(p, skip=("policy", "max_num_batched_tokens"))
    return p


# ------------------------------------------------------------------------------ the two sides

def hf_twin(model):
    """transformers' LlamaForCausalLM around the SAME weight tensors (no copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    fields = {f.name: getattr(model.config, f.name) for f in dataclasses.fields(model.config)}
    fields.pop("torch_dtype")
    config = LlamaConfig(**fields)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    device = next(model.parameters()).device
    hf.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)    # buffers, not in the state dict
    hf.generation_config.pad_token_id = 0
    # No end-of-sequence for transformers either: both sides pick the plain argmax every step.
    # (min_new_tokens would instead mask EOS out of the logits, a different greedy choice.)
    hf.generation_config.eos_token_id = None
    return hf.eval()


def prompts(batch: int, length: int, vocab: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)   # [B, P]


def run_ours(engine: Engine, ids: torch.Tensor, n: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    start = time.perf_counter()
    seqs = [engine.add_request(row, params) for row in ids.tolist()]
    while engine.has_work():
        engine.step()                                # ends in a host sync: the sampled tokens
    return time.perf_counter() - start, [s.output_ids for s in seqs]


@torch.inference_mode()
def run_hf(hf, ids: torch.Tensor, n: int) -> tuple[float, list[list[int]]]:
    sync(ids.device)
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                      max_new_tokens=n)
    sync(ids.device)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def decode_times(runs: dict, n: int, repeats: int) -> tuple[dict, dict]:
    """Per side (`runs`: side -> run(tokens) -> (seconds, token lists)): `repeats` decode
    times t(n) - t(1), the sides taking turns within each repeat
    (so drift on a noisy machine hits both alike), after one untimed warm-up run of n tokens
    each. Returns ({side: [seconds, ...]}, {side: that warm-up's tokens})."""
    tokens = {side: run(n)[1] for side, run in runs.items()}
    times = {side: [] for side in runs}
    for _ in range(repeats):
        for side, run in runs.items():
            times[side].append(decode_time(run, n))
    return times, tokens


def decode_time(run, n: int, tries: int = 3) -> float:
    """t(n) - t(1) of one side. A stall during t(1) on a busy machine can make it negative;
    such a pair is measured again, and a machine that stalls every time is an error, never a
    figure."""
    for _ in range(tries):
        seconds = run(n)[0] - run(1)[0]
        if seconds > 0:
            return seconds
    raise ValueError(f"decoding {n} tokens took less time than decoding 1, {tries} times in a "
                     "row: this machine is too busy to measure; run again when it is idle")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ bandwidth

def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, runs: int = 7) -> float:
    """Bytes moved (read + written) per second by one large device copy, in GB/s (1e9)."""
    if device.type == "cpu":
        nbytes = 256 << 20                           # >> any last-level cache, < RAM
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(runs + 1):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[1:]) / 1e9


def decode_bytes(model, batch: int, prompt_len: int, new_tokens: int) -> int:
    """Bytes the N - 1 decode steps must read at the least (see the module docstring)."""
    params = {id(p): p for p in model.parameters()}.values()        # a tied weight once
    weights = sum(p.numel() * p.element_size() for p in params)
    embed = model.model.embed_tokens.weight
    if embed is not model.lm_head.weight:                           # a lookup reads B rows
        weights -= (embed.shape[0] - batch) * embed.shape[1] * embed.element_size()
    steps = new_tokens - 1
    # Step i (1-based) attends over prompt_len + i tokens per request.
    kv_tokens = batch * (steps * prompt_len + steps * (steps + 1) // 2)
    return weights * steps + kv_tokens * model.config.kv_bytes_per_token(embed.element_size())


# ------------------------------------------------------------------------------ main

def bench_device(args, device: torch.device, batches: list[int]) -> list[dict]:
    cfg = EngineConfig.from_cli(args)
    cfg.device, cfg.policy = device.type, "gpu-only"
    model, name = model_for(args.model, args.model_shape, cfg.dtype, device, cfg.seed)
    P, N = args.prompt_len, args.new_tokens
    if cfg.gpu_kv_blocks is None:                    # just enough KV: leave memory to transformers
        cfg.gpu_kv_blocks = max(batches) * -(-(P + N) // cfg.block_size) + 1
    # Each batch prefills in one step, as transformers' generate does: t(N) - t(1) then holds
    # N - 1 decode steps of all B rows, not prefill chunks with decodes mixed in.
    cfg.max_num_batched_tokens = max(cfg.max_num_batched_tokens, max(batches) * P)
    engine = Engine(model, cfg)
    want_hf = not args.no_hf and (device.type == "cuda" or args.hf or args.model_shape not in BIG_SHAPES)
    hf = hf_twin(model) if want_hf else None
    roofline = copy_bandwidth_gbps(device)
    vocab = model.config.vocab_size
    rows = []
    try:
        for B in batches:
            ids = prompts(B, P, vocab)
            runs = {"ours": lambda n: run_ours(engine, ids, n)}
            if hf is not None:
                hf_ids = ids.to(device)                     # once, not per run
                runs["hf"] = lambda n: run_hf(hf, hf_ids, n)
            times, tokens = decode_times(runs, N, args.repeats)
            ours_s = statistics.median(times["ours"])
            gbps = decode_bytes(model, B, P, N) / ours_s / 1e9
            row = dict(device=device.type, model=name, batch=B, tok_s=B * (N - 1) / ours_s,
                       gbps=gbps, roofline_gbps=roofline, roofline_frac=gbps / roofline,
                       hf_tok_s=None, ratio=None, same_tokens=None)
            if hf is not None:
                # The ratio of each repeat's pair, then the median: one pair ran back to back.
                ratios = [h / o for h, o in zip(times["hf"], times["ours"])]
                row.update(hf_tok_s=B * (N - 1) / statistics.median(times["hf"]),
                           ratio=statistics.median(ratios),
                           same_tokens=_agreement(tokens["ours"], tokens["hf"]))
            print(format_row(row), flush=True)
            rows.append(row)
    finally:
        engine.close()
    return rows


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of generated tokens equal between the two sides (1.0: identical greedy output)."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / max(1, sum(len(r) for r in a))


HEADER = (f"{'device':6s} {'model':18s} {'batch':>5s} {'tok/s':>9s} {'GB/s':>8s} {'roofline GB/s':>13s} "
          f"{'of roofline':>11s} {'HF tok/s':>9s} {'ours/HF':>8s} {'same tokens':>11s}")


def format_row(r: dict) -> str:
    hf = (f"{r['hf_tok_s']:9.1f} {r['ratio']:7.2f}x {r['same_tokens']:11.0%}" if r["hf_tok_s"]
          else f"{'-':>9s} {'-':>8s} {'-':>11s}")
    return (f"{r['device']:6s} {r['model'][:18]:18s} {r['batch']:5d} {r['tok_s']:9.1f} "
            f"{r['gbps']:8.2f} {r['roofline_gbps']:13.2f} {r['roofline_frac']:11.0%} {hf}")


def check_context(args, cfg: EngineConfig) -> None:
    """--prompt-len plus --new-tokens must fit the model's context (else the engine refuses the
    prompt, or stops generating short of N tokens), known from its config before it loads."""
    mc = config_for(args.model, args.model_shape)
    if mc is None:
        return                                   # model_for says what is missing
    context = cfg.context_length(mc)
    if args.prompt_len + args.new_tokens > context:
        limit = ("--max-model-len is" if context < mc.max_position_embeddings
                 else "the model's context is")
        raise ValueError(f"--prompt-len {args.prompt_len} plus --new-tokens {args.new_tokens} is "
                         f"{args.prompt_len + args.new_tokens} tokens but {limit} {context}; "
                         "lower --prompt-len or --new-tokens")


def resolve_quick(args) -> None:
    """--batches, --new-tokens and --repeats not given take the --quick or the full run's value;
    those given are kept, and checked like any other."""
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def check_batches_run_whole(batches: list[int], cfg: EngineConfig, prompt_len: int,
                            new_tokens: int) -> None:
    """Each batch must run as one: all its requests admitted together (--max-num-seqs) and their
    KV kept to the last token (--gpu-kv-blocks), else its row would time smaller batches."""
    biggest = max(batches)
    if biggest > cfg.max_num_seqs:
        raise ValueError(f"--batches {biggest} is more than --max-num-seqs {cfg.max_num_seqs} "
                         "requests running at once; raise --max-num-seqs or lower --batches")
    if cfg.gpu_kv_blocks is not None:
        per_request = -(-peak_kv_tokens(prompt_len, new_tokens) // cfg.block_size)
        if biggest * per_request > cfg.gpu_kv_blocks:
            raise ValueError(f"batch {biggest} needs {biggest * per_request} KV blocks "
                             f"({per_request} per request) but --gpu-kv-blocks is "
                             f"{cfg.gpu_kv_blocks}; raise --gpu-kv-blocks (or leave it out), or "
                             "lower --batches, --prompt-len or --new-tokens")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    resolve_quick(args)
    batches = size_list(args.batches, "--batches")
    # Every input is checked here, before a model is loaded or anything is timed.
    if args.prompt_len < 1 or args.new_tokens < 2:
        raise ValueError("--prompt-len needs >= 1 and --new-tokens >= 2")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    check_threads(args.torch_threads, "--torch-threads")
    check_output_path(args.json, "--json")
    cfg = EngineConfig.from_cli(args)
    check_context(args, cfg)
    check_batches_run_whole(batches, cfg, args.prompt_len, args.new_tokens)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    # Here --device auto means every device: the CPU, and CUDA when present.
    devices = [args.device] if args.device != "auto" else (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    command = "python -m apex_mini.bench decode " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {command}\n# {datetime.datetime.now().isoformat(timespec='seconds')}, "
          f"{machine_info()}, torch threads {torch.get_num_threads()}, prompt {args.prompt_len} "
          f"tokens, {args.new_tokens} new tokens, median of {args.repeats}\n"
          f"# decode tok/s = batch * (N - 1) / (t(N) - t(1)); GB/s = 1e9 bytes/s; roofline = "
          f"measured copy bandwidth (read + write)")
    print(HEADER)
    rows = []
    for name in devices:
        rows += bench_device(args, resolve_device(name), batches)
    if args.json:
        report = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "machine": machine_info(torch.device("cuda") if "cuda" in devices else None),
                  "torch_threads": torch.get_num_threads(), "prompt_len": args.prompt_len,
                  "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows}
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
