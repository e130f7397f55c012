"""`python -m apex_mini.bench kernels`: CPU attention's achieved bandwidth beside this machine's
copy bandwidth, measured in the same run.

    python -m apex_mini.bench kernels                           # Llama-3.1-8B layer, bf16 KV
    python -m apex_mini.bench kernels --shape llama2-7b --contexts 1024,4096 --batches 8,32
    python -m apex_mini.bench kernels --modes eager --quick --json kernels.json

Decode attention reads every cached K and V byte once per step and does one multiply-add per
element for each query head that shares it (G = H / KVH: 4 for Llama-3.1-8B), so it is bound by
memory bandwidth. Its figure of merit is KV bytes read per second:

    GB/s = 2 (K and V) * batch * context * num_kv_heads * head_dim * itemsize / time / 1e9

The ceiling is the copy bandwidth: bytes moved (read + written) per second by one large
`dst.copy_(src)` (`bench_decode.copy_bandwidth_gbps`, the same figure `bench decode` uses).

How it measures, per (context, batch, mode) point: one layer of a host pool holding several
disjoint copies of the point's KV (at least `POOL_BYTES`, so a small point does not sit in the
last-level cache between calls), random block tables (blocks are scattered, as in a pool that
has served many requests; laid out for the kernels once and untimed, as the engine does once
per step: `cpu_attention.DecodeTables`), every sequence exactly `context` tokens long. The
kernel runs on a `CPUAttentionWorker` thread, as in the engine, each call on the next copy; the
figure is the median over calls after one warm-up call per point (which compiles, in
`compiled` mode, on the first point). Each compiled row also reports its largest difference
from the eager output.

The `read` rows time no attention at all: the same blocks of the same pool, every K and V byte
read and summed, compiled by Inductor (`paged_read`). They are this access pattern's own
ceiling on this machine (random 16-token blocks, bf16 converted to fp32), which the copy
bandwidth, a single contiguous stream, overstates: a kernel cannot read faster than `read`, and
what it loses below it is its arithmetic and loop order. In the JSON they are `read_rows`,
beside the kernels' `rows`.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import sys
import time

import torch

from . import cpu_attention as ca
from .bench_decode import copy_bandwidth_gbps
from .cli import (ArgumentParser, check_output_path, check_threads, run_cli, size_list,
                  write_json)
from .cpu_worker import CPUAttentionWorker
from .metrics import machine_info
from .packed_linear import available_memory_bytes
from .weights import MODEL_SHAPES

POOL_BYTES = 512 << 20         # K + V bytes per point at least: far more than any LLC
QUICK_POOL_BYTES = 16 << 20    # --quick: a smoke run, not a measurement
MIN_SECONDS = 0.3              # per point: repeat until this much time has been measured...
MAX_CALLS = 50                 # ...or this many calls
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _paged_read(k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Every K and V element of `blocks` [num_seqs, cols], summed per token: [num_seqs, cols,
    block_size]. Each token's row (all KV heads) is contiguous, so the loops walk it in order."""
    return k_cache[blocks].float().sum((-2, -1)) + v_cache[blocks].float().sum((-2, -1))


@functools.cache
def _compiled_read():
    return torch.compile(_paged_read, options={"assert_indirect_indexing": False})


def paged_read(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               tables: ca.DecodeTables, scale: float) -> torch.Tensor:
    """The `read` mode: the blocks the kernels read, read and summed, no attention (q and scale
    unused; the signature is the kernels'). The fused kernel's superblock tables, fresh and
    marked dynamic: no recompile per call."""
    blocks = tables.superblocks.flatten(1)                            # [num_seqs, cols]
    torch._dynamo.maybe_mark_dynamic(blocks, 0)
    torch._dynamo.maybe_mark_dynamic(blocks, 1)
    torch._dynamo.maybe_mark_dynamic(k_cache, 0)
    torch._dynamo.maybe_mark_dynamic(v_cache, 0)
    return _compiled_read()(k_cache, v_cache, blocks)


KERNELS = {"compiled": ca.attend_fused, "eager": ca.attend_eager, "read": paged_read}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m apex_mini.bench kernels",
                       description="CPU attention bandwidth vs memory-copy bandwidth.")
    p.add_argument("--shape", choices=MODEL_SHAPES, default="llama3.1-8b",
                   help="the model whose attention heads to use (default: llama3.1-8b)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="KV cache and query dtype (default: bfloat16)")
    p.add_argument("--contexts", default="512,1024,2048,4096,8192",
                   help="tokens of context per sequence, comma-separated (default: %(default)s)")
    p.add_argument("--batches", default="1,8,16,32",
                   help="sequences per call, comma-separated (default: %(default)s)")
    p.add_argument("--modes", default="compiled,eager,read",
                   help="what to time, comma-separated: compiled, eager (the kernels), read (the "
                        "same blocks read with no attention: the access pattern's ceiling; "
                        "default: %(default)s)")
    p.add_argument("--block-size", type=int, default=16,
                   help="tokens per KV block (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the kernel, >= 1 (default: torch's own choice)")
    p.add_argument("--quick", action="store_true",
                   help="contexts 512,1024, batches 1,8, the tiny shape, a small pool: a smoke run "
                        "(default: off)")
    p.add_argument("--json", default=None, help="write {'copy_gbps': ..., 'rows': [...]} here "
                   "(default: none)")
    return p


def pool_blocks(context: int, batch: int, block_size: int, block_bytes: int,
                pool_bytes: int) -> tuple[int, int]:
    """(blocks of one copy of a point's KV, copies in its pool): as many disjoint copies as
    fill `pool_bytes`, at least one."""
    need = batch * -(-context // block_size)
    return need, max(1, pool_bytes // (need * block_bytes))


def peak_bytes(context: int, batch: int, num_kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, pool_bytes: int = POOL_BYTES) -> int:
    """About the most memory one point takes at once: its K and V pools, plus the larger of the
    float32 staging tensor one pool is drawn in and the eager kernel's gathered K and V."""
    block_bytes = 2 * block_size * num_kv_heads * head_dim * dtype.itemsize      # K and V
    need, copies = pool_blocks(context, batch, block_size, block_bytes, pool_bytes)
    pools = copies * need * block_bytes
    staging = pools // 2 // dtype.itemsize * 4
    gathered = need * block_bytes
    return pools + max(staging, gathered)


def check_memory(contexts: list[int], batches: list[int], shape: str, dtype: torch.dtype,
                 block_size: int, pool_bytes: int) -> None:
    """Refuse, before anything runs, a point whose pool would not fit in the memory free now."""
    free = available_memory_bytes()
    if free is None:
        return
    mc = MODEL_SHAPES[shape]
    peak, context, batch = max((peak_bytes(c, b, mc.num_key_value_heads, mc.head_dim, block_size,
                                           dtype, pool_bytes), c, b)
                               for c in contexts for b in batches)
    if peak > free:
        raise ValueError(f"--contexts {context} with --batches {batch} needs about "
                         f"{peak / 1e9:.1f} GB for its KV pool but {free / 1e9:.1f} GB is free; "
                         "lower --contexts or --batches")


class Point:
    """The host pool, tables and query of one (context, batch) point, in `copies` disjoint sets."""

    def __init__(self, context: int, batch: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, block_size: int, dtype: torch.dtype, pool_bytes: int = POOL_BYTES,
                 seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        blocks_per_seq = -(-context // block_size)
        block_bytes = 2 * block_size * num_kv_heads * head_dim * dtype.itemsize
        need, self.copies = pool_blocks(context, batch, block_size, block_bytes, pool_bytes)
        pool = (self.copies * need, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.randn(pool, generator=g).to(dtype)  # [num_blocks, block_size, KVH, D]
        self.v_cache = torch.randn(pool, generator=g).to(dtype)
        perm = torch.randperm(self.copies * need, generator=g)
        tables = perm.view(self.copies, batch, blocks_per_seq)        # [copies, batch, blocks]
        self.q = torch.randn(batch, num_heads, head_dim, generator=g).to(dtype)  # [batch, H, D]
        lens = torch.full((batch,), context, dtype=torch.long)
        with torch.inference_mode():       # as the engine: built once per step, not timed
            self.tables = [ca.DecodeTables(t, lens, self.k_cache) for t in tables]
            for t in self.tables:          # both kernels' layouts, built now (else on first use)
                t.superblocks, t.padding
        self.scale = head_dim ** -0.5
        self.kv_bytes = 2 * batch * context * num_kv_heads * head_dim * dtype.itemsize

    def args(self, i: int):
        return self.q, self.k_cache, self.v_cache, self.tables[i % self.copies], self.scale


def _timed(kernel, *args) -> tuple[float, torch.Tensor]:
    """On the worker: (seconds the kernel took, its output). Timed there, so the figure is the
    kernel's, without the ~50 us of handing the call to the thread and back."""
    t0 = time.perf_counter()
    out = kernel(*args)
    return time.perf_counter() - t0, out


def time_kernel(worker: CPUAttentionWorker, kernel, point: Point) -> tuple[float, torch.Tensor]:
    """(median seconds per call, the first timed call's output), after one warm-up call."""
    worker.submit(kernel, *point.args(0)).result()
    times, out, spent = [], None, 0.0
    while len(times) < 3 or (spent < MIN_SECONDS and len(times) < MAX_CALLS):
        seconds, result = worker.submit(_timed, kernel, *point.args(len(times) + 1)).result()
        times.append(seconds)
        spent += seconds
        out = result if out is None else out
    return statistics.median(times), out


def run(contexts: list[int], batches: list[int], modes: list[str], shape: str,
        dtype: torch.dtype, block_size: int, pool_bytes: int = POOL_BYTES,
        progress=print) -> list[dict]:
    """One row per (context, batch, mode): seconds, GB/s and, for compiled rows, the largest
    difference from eager on the same inputs."""
    mc = MODEL_SHAPES[shape]
    heads = (mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim)
    rows = []
    # The kernel alone: its worker may use every torch thread (the engine leaves one to its
    # main thread; see CPUAttentionWorker).
    with CPUAttentionWorker(1, intra_op_threads=torch.get_num_threads()) as worker:
        if "compiled" in modes:
            # The engine's graphs, compiled in its order: which loops Inductor shares among the
            # threads depends on the sizes it first compiles at (ca.precompile). Pool sizes are
            # dynamic, so a small pool stands in for the points' own.
            pool = torch.zeros(64, block_size, *heads[1:], dtype=dtype)
            worker.submit(ca.precompile, pool, pool, heads[0], max(contexts),
                          min(contexts)).result()
        for context in contexts:
            for batch in batches:
                point = Point(context, batch, *heads, block_size, dtype, pool_bytes)
                outputs = {}
                for mode in modes:
                    seconds, outputs[mode] = time_kernel(worker, KERNELS[mode], point)
                    rows.append(dict(context=context, batch=batch, mode=mode,
                                     ms=seconds * 1e3, gbps=point.kv_bytes / seconds / 1e9,
                                     max_abs_diff_vs_eager=None))
                if "compiled" in outputs and "eager" in outputs:
                    diff = (outputs["compiled"].float() - outputs["eager"].float()).abs().max()
                    for row in rows[-len(modes):]:
                        if row["mode"] == "compiled":
                            row["max_abs_diff_vs_eager"] = diff.item()
                for row in rows[-len(modes):]:
                    progress(row)
                del point
    return rows


HEADER = (f"{'context':>7s} {'batch':>5s} {'mode':9s} {'ms':>9s} {'GB/s':>7s} {'of copy':>7s} "
          f"{'|compiled - eager|':>18s}")


def format_row(row: dict, copy_gbps: float) -> str:
    diff = row["max_abs_diff_vs_eager"]
    diff = f"{diff:18.1e}" if diff is not None else f"{'-':>18s}"
    return (f"{row['context']:7d} {row['batch']:5d} {row['mode']:9s} {row['ms']:9.3f} "
            f"{row['gbps']:7.2f} {row['gbps'] / copy_gbps:7.0%} {diff}")


def goal_summary(rows: list[dict], copy_gbps: float) -> str:
    """The issue's goal: at least half the copy bandwidth at context >= 1k and batch >= 8."""
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        big = [r["gbps"] / copy_gbps for r in rows
               if r["mode"] == mode and r["context"] >= 1024 and r["batch"] >= 8]
        if big and mode == "read":
            lines.append(f"# read (no attention, the pattern's ceiling): {min(big):.0%} to "
                         f"{max(big):.0%} of copy bandwidth at context >= 1024, batch >= 8")
        elif big:
            lines.append(f"# {mode}: {min(big):.0%} to {max(big):.0%} of copy bandwidth at context "
                         f">= 1024, batch >= 8 (goal: >= 50%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.contexts, args.batches, args.shape = "512,1024", "1,8", "tiny"
    contexts = size_list(args.contexts, "--contexts")
    batches = size_list(args.batches, "--batches")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in KERNELS]
    if bad or not modes:
        raise ValueError(f"--modes takes {', '.join(KERNELS)}, got {args.modes!r}")
    if args.block_size < 1:
        raise ValueError(f"--block-size={args.block_size} must be at least 1")
    check_threads(args.threads, "--threads")
    check_output_path(args.json, "--json")
    pool_bytes = QUICK_POOL_BYTES if args.quick else POOL_BYTES
    check_memory(contexts, batches, args.shape, DTYPES[args.dtype], args.block_size, pool_bytes)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    command = "python -m apex_mini.bench kernels " + " ".join(sys.argv[1:] if argv is None else argv)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    mc = MODEL_SHAPES[args.shape]
    copy_gbps = copy_bandwidth_gbps(torch.device("cpu"))
    print(f"# {command}\n# {date}, {machine_info()}, torch threads {torch.get_num_threads()}\n"
          f"# {args.shape} layer: {mc.num_attention_heads} heads, {mc.num_key_value_heads} KV heads, "
          f"head_dim {mc.head_dim}, {args.dtype} KV, block size {args.block_size}\n"
          f"# GB/s = KV bytes read / median time per call (1e9 bytes/s); copy bandwidth "
          f"(read + write) {copy_gbps:.2f} GB/s")
    print(HEADER, flush=True)
    rows = run(contexts, batches, modes, args.shape, dtype, args.block_size, pool_bytes,
               progress=lambda row: print(format_row(row, copy_gbps), flush=True))
    copy_after = copy_bandwidth_gbps(torch.device("cpu"))     # was the machine steady?
    print(goal_summary(rows, copy_gbps))
    print(f"# copy bandwidth after the run: {copy_after:.2f} GB/s")
    if args.json:
        report = {"command": command, "date": date, "machine": machine_info(),
                  "torch_threads": torch.get_num_threads(), "shape": args.shape,
                  "dtype": args.dtype, "block_size": args.block_size, "copy_gbps": copy_gbps,
                  "copy_gbps_after": copy_after,
                  "rows": [r for r in rows if r["mode"] != "read"],
                  "read_rows": [r for r in rows if r["mode"] == "read"]}
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
