"""Predict one iteration's time for any candidate plan under each strategy, from a `Profile`.

Per layer, with `pre`/`post` the linear work before and after attention (QKV; O + MLP),
`dev` the device attention (prefill + decode) and `host` the CPU worker's job:

    GPU-only   pre + dev + post
    overlap    pre + max(dev, down + host + up) + post        (one merged batch)
    pipeline   two sub-batches one layer apart, replayed on two timelines (device, CPU worker)
               in the runner's exact order; the weights are read twice

plus, once per iteration, any swaps, and the LM head and the fixed overhead (these two once
per sub-batch when pipelined). A decode-only, device-only iteration does not run the layer loop
at all but the runner's static decode step (decode_step.py, CUDA graphs), whose Python and launch costs differ
from the loop's; when the profile has measured it whole (`decode_iteration`), that table is
the prediction (plus swaps).

When the "device" is the CPU (profile key `device == "cpu"`), device and host work compete for
the same cores, so nothing hides: the host job adds to the time. (Fitting a hidden share from
real iterations was tried; on a 2-core machine it swung between 5% and 170% from run to run,
while the plain sum predicted served throughput within 10-30%: docs/benchmarks.md.)

With `feedback=True` (the engine's default), every prediction is then scaled by how the
engine's last few iterations compared with the tables (feedback.py): one factor for all plans,
so it changes predicted times but no decision. The `table_s` of a breakdown is the profile's
prediction alone.

Tables are first made non-decreasing (`nondecreasing`): more work never predicts less time.
A measured median can dip below its neighbour's from noise (on a busy 2-core machine the
first point of a row was seen 4x slower than the next), and a falling segment would make
the predictor prefer the larger of two plans, or extrapolate upwards below the first point.
2-D tables are fitted along each measured row (more KV tokens); across rows (more requests
for the same KV) cost need not grow, so it is left as measured.

Interpolation: linear in 1-D, bilinear in 2-D (per measured row, then across rows), linear
extrapolation past the ends. A point of a monotone table predicts exactly its own time.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import operator
import statistics

from .cost_tables import BatchShape, Profile
from .feedback import Feedback
from .plan import Strategy, bucket

first = operator.itemgetter(0)


# ------------------------------------------------------------------------------- interpolation

def nondecreasing(ys: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `ys` in absolute error: pool adjacent violators,
    each pool at its median. One noisy point is outvoted by its neighbours instead of spreading
    (a running maximum would carry a slow outlier to every larger point)."""
    pools: list[list[float]] = []
    for y in ys:
        pools.append([y])
        while len(pools) > 1 and statistics.median(pools[-2]) > statistics.median(pools[-1]):
            last = pools.pop()
            pools[-1] += last
    return [statistics.median(pool) for pool in pools for _ in pool]


def monotone_table(table: list[list[float]]) -> list[list[float]]:
    """[[x, y], ...] (x ascending) with y made non-decreasing."""
    return [[x, y] for (x, _), y in zip(table, nondecreasing([y for _, y in table]))]


def monotone_rows(points: list[list[float]]) -> list[list[float]]:
    """[[a, b, y], ...] with y made non-decreasing in b along each a."""
    rows: dict[float, list[list[float]]] = {}
    for a, b, y in sorted(points):
        rows.setdefault(a, []).append([b, y])
    return [[a, b, y] for a, row in rows.items() for b, y in monotone_table(row)]


def monotone_profile(profile: Profile) -> Profile:
    """A copy of `profile` whose tables never predict less time for more work."""
    return dataclasses.replace(
        profile, **{name: monotone_table(getattr(profile, name))
                    for name in ("linear", "prefill_attn", "d2h", "h2d", "lm_head", "rows_d2h",
                                 "rows_h2d")},
        **{name: monotone_rows(getattr(profile, name))
           for name in ("gpu_decode_attn", "cpu_decode_attn", "decode_iteration")})


def interp1(table: list[list[float]], x: float) -> float:
    """Piecewise-linear through [[x, y], ...] (x ascending), extended linearly past the ends."""
    if not table:
        return 0.0
    if len(table) == 1:
        x0, y0 = table[0]
        return y0 * x / x0 if x0 else y0
    i = min(max(bisect.bisect_right(table, x, key=first) - 1, 0), len(table) - 2)
    (x0, y0), (x1, y1) = table[i], table[i + 1]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


class Grid2D:
    """y(a, b) from [[a, b, y], ...]: linear in b along each measured a, then linear across a.
    On a full rectangular grid this is bilinear interpolation; rows may also cover different
    b ranges (a decode grid where small contexts exist only for few sequences)."""

    def __init__(self, points: list[list[float]]):
        rows: dict[float, list[list[float]]] = {}
        for a, b, y in sorted(points):
            rows.setdefault(a, []).append([b, y])
        self.a = sorted(rows)
        self.rows = [rows[a] for a in self.a]

    def __call__(self, a: float, b: float) -> float:
        if not self.a:
            return 0.0
        if len(self.a) == 1:
            return interp1(self.rows[0], b)
        i = min(max(bisect.bisect_right(self.a, a) - 1, 0), len(self.a) - 2)
        a0, a1 = self.a[i], self.a[i + 1]
        y0, y1 = interp1(self.rows[i], b), interp1(self.rows[i + 1], b)
        return max(0.0, y0 + (y1 - y0) * (a - a0) / (a1 - a0))


def pipelines(shape: BatchShape) -> bool:
    """Mirrors the runner: it splits only with a host decode and something to pair it with."""
    return shape.n_cpu_decodes >= 1 and (bool(shape.prefill_tokens) or shape.n_gpu_decodes > 0
                                         or shape.n_cpu_decodes >= 2)


def _decode_only(shape: BatchShape) -> bool:
    """Mirrors the runner: no prefill and no host rows take the static decode step."""
    return (shape.n_gpu_decodes > 0 and not shape.prefill_tokens and not shape.n_cpu_decodes
            and not shape.n_host_prefill_tokens)


# ------------------------------------------------------------------------------- the predictor

class Predictor:
    """Iteration time (seconds) of a `BatchShape` under a `Strategy`. Pure arithmetic; cheap
    enough for the scheduler to ask about dozens of candidates per iteration."""

    def __init__(self, profile: Profile, bucket_decode: bool = False, feedback: bool = False):
        self.profile = profile                 # as measured (or computed), and saved
        self.tables = p = monotone_profile(profile)   # what predictions read
        self.bucket_decode = bucket_decode
        self.feedback = Feedback() if feedback else None
        key = p.key or {}
        self.on_cpu = key.get("device", "cuda") == "cpu"
        self.block_size = int(key.get("block_size", 16))
        self.layers = p.num_layers
        self.gpu_attn = Grid2D(p.gpu_decode_attn)
        self.cpu_attn = Grid2D(p.cpu_decode_attn)
        self.decode_iteration = Grid2D(p.decode_iteration) if p.decode_iteration else None
        model = key.get("model", {})
        h, kvh = model.get("num_attention_heads", 1), model.get("num_key_value_heads", 1)
        hidden, inter = model.get("hidden_size", 1), model.get("intermediate_size", 0)
        d = model.get("head_dim", hidden // max(h, 1))
        qkv = (h + 2 * kvh) * d * hidden
        # Share of the linear work before attention (QKV) vs after it (O + MLP), by weight bytes.
        self.pre_share = qkv / (qkv + h * d * hidden + 3 * hidden * inter) if hidden > 1 else 0.3
        self.up_share = h / (h + 2 * kvh)                  # output row bytes / q+k+v row bytes
        self.kv_share = 1.0 - self.up_share                # k+v bytes / q+k+v row bytes

    # ---------------------------------------------------------------- pieces

    def _decode_kv(self, n: int, total: float, longest: int, device: bool = True) -> float:
        """KV rows a decode kernel reads: every sequence up to the block-rounded longest one
        (on the device, to the power-of-two table width when decode shapes are bucketed; the
        host kernel trims its tables to the longest context)."""
        if not longest:
            return total
        blocks = -(-longest // self.block_size)
        blocks = bucket(blocks) if self.bucket_decode and device else blocks
        return max(total, n * blocks * self.block_size)

    def _prefill_attn(self, shape: BatchShape) -> float:
        t = 0.0
        for n, ctx in zip(shape.prefill_tokens, shape.prefill_context or shape.prefill_tokens):
            full = interp1(self.tables.prefill_attn, ctx)
            # A chunk after a cached prefix does the last rows of the causal triangle.
            t += full * (1.0 - ((ctx - n) / ctx) ** 2) if ctx > n else full
        return t

    def _host(self, n_cpu: int, kv: float, host_prefill: int) -> tuple[float, float, float]:
        """(down, host job, up) per layer for a host sub-batch."""
        if not n_cpu and not host_prefill:
            return 0.0, 0.0, 0.0
        job = self.tables.host_job_s + (self.cpu_attn(n_cpu, kv) if n_cpu else 0.0)
        if self.on_cpu:                                   # the runner copies nothing
            return 0.0, job, 0.0
        p = self.tables
        row = p.bytes_per_token_row
        # A decode row sends q, k and v down; a host prefill row only k and v (its attention
        # runs on the device). Priced by the runner's own row copies where measured: a swap's
        # block copies cost 1.1 ms at their smallest on an H200 (one block, 256 KB: about 11
        # rows of Llama-2-7B's q, k and v), which priced a few KB of rows as that.
        down = interp1(p.rows_d2h or p.d2h, (n_cpu + host_prefill * self.kv_share) * row)
        up = interp1(p.rows_h2d or p.h2d, n_cpu * row * self.up_share) if n_cpu else 0.0
        return down, job, up

    def _prefix_up(self, shape: BatchShape) -> float:
        """Per layer: a host-tier prefill chunk after the first attends on the device to its
        cached prefix, whose K and V the main thread copies up from the host pool first
        (`runner._prior_kv`; the gather on the host before it is not priced)."""
        if self.on_cpu or not shape.host_prefill_prefix:
            return 0.0
        kv_row = self.tables.bytes_per_token_row * self.kv_share
        return interp1(self.tables.h2d, shape.host_prefill_prefix * kv_row)

    def _per_iteration(self, shape: BatchShape, split: int = 0) -> dict[str, float]:
        """LM head, overhead and swaps. A pipelined iteration (`split` = rows of sub-batch B)
        builds, embeds and runs the LM head for each sub-batch: its fixed cost counts twice."""
        p = self.tables
        swap = 0.0
        if p.kv_block_bytes:
            if shape.swap_out_blocks:
                swap += interp1(p.d2h, shape.swap_out_blocks * p.kv_block_bytes)
            if shape.swap_in_blocks:
                swap += interp1(p.h2d, shape.swap_in_blocks * p.kv_block_bytes)
        outs = [shape.num_outputs - split, split] if split else [shape.num_outputs]
        return {"lm_head_s": sum(interp1(p.lm_head, n) for n in outs if n),
                "overhead_s": p.overhead * len(outs), "swap_s": swap}

    # ---------------------------------------------------------------- strategies

    def path(self, shape: BatchShape, strategy: Strategy) -> str:
        """How the runner will execute the plan: decode step, layer loop, overlap or pipeline."""
        if self.decode_iteration is not None and _decode_only(shape):
            return "decode step"
        if strategy is Strategy.PIPELINE and pipelines(shape):
            return "pipeline"
        if shape.n_cpu_decodes or shape.n_host_prefill_tokens:
            return "overlap"
        return "layer loop"

    def breakdown(self, shape: BatchShape, strategy: Strategy) -> dict[str, float]:
        """Every component in seconds (per-layer pieces already multiplied by the layer count),
        `layers_s` the critical path of the layer loop, `table_s` their sum, `correction` the
        feedback factor and `total_s` == iteration_time == table_s * correction."""
        path = self.path(shape, strategy) if shape.num_tokens else None
        if path is None:                                      # an empty plan only runs its swaps
            out = {"layers_s": 0.0, **self._per_iteration(shape), "lm_head_s": 0.0,
                   "overhead_s": 0.0}
        elif path == "decode step":
            out = self._decode_step(shape)
            out.update(self._per_iteration(shape), lm_head_s=0.0, overhead_s=0.0)
        elif path == "pipeline":
            out = self._pipeline(shape)
            out.update(self._per_iteration(shape, split=shape.n_cpu_decodes - shape.n_cpu_decodes // 2))
        else:
            out = self._merged(shape)
            out.update(self._per_iteration(shape))
        out["table_s"] = out["layers_s"] + out["lm_head_s"] + out["overhead_s"] + out["swap_s"]
        # One factor for every plan, copies alone too: a decision that sets one plan against
        # another (apex's choice, park or preempt) is then the same with feedback as without.
        out["correction"] = self.feedback.correction() if self.feedback else 1.0
        out["total_s"] = out["table_s"] * out["correction"]
        return out

    def iteration_time(self, shape: BatchShape, strategy: Strategy) -> float:
        return self.breakdown(shape, strategy)["total_s"]

    def scored(self, shape: BatchShape, plan) -> tuple[float, dict[str, float]]:
        """(the prediction a run `plan` is scored by, this predictor's breakdown of `shape`):
        the plan's own `predicted_s`, made before it ran, when it has one."""
        b = self.breakdown(shape, plan.strategy)
        return (b["total_s"] if plan.predicted_s is None else plan.predicted_s), b

    def observe(self, shape: BatchShape, strategy: Strategy, measured_s: float) -> None:
        """The engine ran this plan in `measured_s`: update the feedback (no-op without it)."""
        if self.feedback is not None and shape.num_tokens:
            self.feedback.observe(self.breakdown(shape, strategy)["table_s"], measured_s)

    def _decode_step(self, shape: BatchShape) -> dict[str, float]:
        """The whole decode-only iteration from its measured table, at the padded batch size
        and the KV rows the step reads."""
        n = shape.n_gpu_decodes
        kv = self._decode_kv(n, shape.gpu_decode_kv, shape.gpu_decode_max_kv)
        rows = bucket(n) if self.bucket_decode else n
        t = self.decode_iteration(rows, kv)
        return {"layers_s": t, "decode_step_s": t}

    def _merged(self, shape: BatchShape) -> dict[str, float]:
        """GPU-only and overlap: one batch. (A GPU_ONLY plan that still holds host rows runs as
        overlap in the runner, so it is predicted as overlap.)"""
        L = self.layers
        rows = shape.num_tokens
        n_g = shape.n_gpu_decodes
        if self.bucket_decode and not shape.prefill_tokens and not shape.n_cpu_decodes:
            rows = n_g = bucket(n_g)                        # padded decode-only batch
        lin = interp1(self.tables.linear, rows)
        gkv = self._decode_kv(n_g, shape.gpu_decode_kv, shape.gpu_decode_max_kv)
        gatt = self.gpu_attn(n_g, gkv) if n_g else 0.0
        prefill = self._prefill_attn(shape)
        ckv = self._decode_kv(shape.n_cpu_decodes, shape.cpu_decode_kv, shape.cpu_decode_max_kv,
                              device=False)
        down, host, up = self._host(shape.n_cpu_decodes, ckv, shape.n_host_prefill_tokens)
        prefix_up = self._prefix_up(shape)
        dev, side = prefill + gatt + prefix_up, down + host + up
        if self.on_cpu:
            layer = lin + dev + side
        else:
            layer = lin + max(dev, side)
        return {"layers_s": L * layer, "linear_s": L * lin, "prefill_attn_s": L * prefill,
                "gpu_decode_attn_s": L * gatt, "cpu_decode_attn_s": L * host,
                "xfer_s": L * (down + up + prefix_up)}

    def _pipeline(self, shape: BatchShape) -> dict[str, float]:
        """Replay the runner's pipelined loop: per layer start A, finish B (previous layer),
        start B, finish A. Sub-batch A = prefills + device decodes + half the host decodes."""
        L = self.layers
        half = shape.n_cpu_decodes // 2
        n_b = shape.n_cpu_decodes - half
        per_seq = shape.cpu_decode_kv / shape.n_cpu_decodes
        kv_a = self._decode_kv(half, per_seq * half, shape.cpu_decode_max_kv, device=False)
        kv_b = self._decode_kv(n_b, per_seq * n_b, shape.cpu_decode_max_kv, device=False)
        lin_a = interp1(self.tables.linear, sum(shape.prefill_tokens) + shape.n_gpu_decodes + half)
        lin_b = interp1(self.tables.linear, n_b)
        gkv = self._decode_kv(shape.n_gpu_decodes, shape.gpu_decode_kv, shape.gpu_decode_max_kv)
        prefix_up = self._prefix_up(shape)                     # prefills are in A
        dev_a = self._prefill_attn(shape) + prefix_up + (self.gpu_attn(shape.n_gpu_decodes, gkv)
                                                         if shape.n_gpu_decodes else 0.0)
        host_a = self._host(half, kv_a, shape.n_host_prefill_tokens)
        host_b = self._host(n_b, kv_b, 0)
        pre, post = self.pre_share, 1.0 - self.pre_share
        if self.on_cpu:       # one set of cores: everything is serial
            layer = lin_a + lin_b + dev_a + sum(host_a) + sum(host_b)
            layers_s = L * layer
        else:
            layers_s = _replay(L, pre * lin_a, dev_a, post * lin_a, host_a,
                               pre * lin_b, post * lin_b, host_b)
        return {"layers_s": layers_s, "linear_s": L * (lin_a + lin_b),
                "prefill_attn_s": L * self._prefill_attn(shape),
                "gpu_decode_attn_s": L * (dev_a - self._prefill_attn(shape) - prefix_up),
                "cpu_decode_attn_s": L * (host_a[1] + host_b[1]),
                "xfer_s": L * (host_a[0] + host_a[2] + host_b[0] + host_b[2] + prefix_up)}

    # ---------------------------------------------------------------- accuracy

    def error_report(self, records) -> dict:
        """Relative error |predicted - measured| / measured over the engine's IterationRecords
        (each needs `.plan` and `.measured_s`; `.shape` is used when present, as a plan's
        sequences have moved on since it ran). The prediction scored is the plan's
        `predicted_s`, made before the iteration ran, when it has one; else this predictor's now.
        `tables_only` scores the profile's tables without the feedback correction. A record
        whose measured time is not a finite positive number, or whose prediction is not finite,
        is skipped: one NaN or inf would poison every statistic. An iteration that captured a
        CUDA graph (`captured_graph`) is counted apart, under `graph_captures`: its time is a
        one-time cost no table predicts (a capture took 7x to 14x a replay on an H200)."""
        errors: dict[str, list[float]] = {}
        tables_only: list[float] = []
        captures: list[float] = []
        for r in records:
            if not (math.isfinite(r.measured_s) and r.measured_s > 0):
                continue
            if getattr(r, "captured_graph", False):
                captures.append(r.measured_s)
                continue
            shape = getattr(r, "shape", None) or BatchShape.from_plan(r.plan)
            predicted, b = self.scored(shape, r.plan)
            if not (math.isfinite(predicted) and math.isfinite(b["table_s"])):
                continue
            name = r.plan.strategy.value
            if r.plan.strategy is Strategy.PIPELINE and not pipelines(shape):
                name = Strategy.OVERLAP.value                  # what the runner actually ran
            errors.setdefault(name, []).append(abs(predicted - r.measured_s) / r.measured_s)
            tables_only.append(abs(b["table_s"] - r.measured_s) / r.measured_s)
        everything = [e for errs in errors.values() for e in errs]
        report = _summary(everything)
        report["by_strategy"] = {name: _summary(errs) for name, errs in sorted(errors.items())}
        report["tables_only"] = _summary(tables_only)
        report["graph_captures"] = {"n": len(captures), "measured_s": sum(captures)}
        return report


def _summary(errors: list[float]) -> dict:
    if not errors:
        return {"n": 0, "median_rel_error": None, "p90_rel_error": None}
    ordered = sorted(errors)
    rank = (9 * len(ordered) + 9) // 10            # ceil(0.9 n) in integers: the nearest rank
    p90 = ordered[rank - 1]                          # 90% of the errors are at most this
    return {"n": len(errors), "median_rel_error": statistics.median(ordered), "p90_rel_error": p90}


def _replay(layers, pre_a, dev_a, post_a, host_a, pre_b, post_b, host_b,
            extrapolate: bool = True) -> float:
    """Critical path of the pipelined loop: the device (main) timeline `g` and one CPU worker
    `c`, which runs host jobs in submission order. host_* = (down, job, up) per layer.

    Layer by layer until the loop is periodic: once the worker's and sub-batch B's times stand
    where they stood, relative to the device's, one layer earlier, every further layer adds
    the same time, and the rest is extrapolated exactly. (A fixed few layers, then the last
    period, was up to 7% off when the worker's backlog was still growing.) `extrapolate=False`
    simulates every layer: what the extrapolation must equal."""
    g = c = 0.0
    done_b = 0.0
    seen = None
    for i in range(layers):
        start = g
        g += pre_a
        done_a = g
        if host_a[1]:
            c = max(c, g + host_a[0]) + host_a[1]
            done_a = c + host_a[2]
        g += dev_a
        if i > 0:
            g = max(g, done_b) + post_b
        g += pre_b
        c = max(c, g + host_b[0]) + host_b[1]
        done_b = c + host_b[2]
        g = max(g, done_a) + post_a
        state = (c - g, done_b - g, g - start)         # where things stand, and this layer's time
        if extrapolate and i > 0 and _same(state, seen):
            shift = (layers - 1 - i) * state[2]
            g, done_b = g + shift, done_b + shift
            break
        seen = state
    return max(g, done_b) + post_b


def _same(a: tuple, b: tuple) -> bool:
    return all(abs(x - y) <= 1e-12 * (1.0 + abs(x) + abs(y)) for x, y in zip(a, b))
