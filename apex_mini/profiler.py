"""The profiler: time each piece of an iteration, per decoder layer, on this machine.

    linear            QKV + RoPE + KV write + O + MLP of one layer (the mean over a pass
                      through every layer), vs batch tokens
    prefill_attn      causal attention of one prompt, vs its length
    gpu_decode_attn   paged decode attention on the device, vs (sequences, KV rows read)
    cpu_decode_attn   the host kernel (append K/V + paged decode attention), timed on the worker
    d2h, h2d          `copy_blocks` between the tiers, vs bytes
    rows_d2h,         one layer's copies of host rows as the runner makes them: q, k and v
    rows_h2d          down until the worker may read them, the output up until the compute
                      stream may use it, vs bytes
    lm_head           final norm + LM head + argmax + the host sync (whole model), vs rows
    host_job_s        one round trip to the CPU worker thread
    decode_iteration  whole decode-only iterations through a real `ModelRunner.execute` (the
                      static decode step, CUDA graphs when on), vs (sequences, KV rows read)
    overhead          calibrated: real `ModelRunner.execute` calls (with prefills, so they run
                      the layer loop) minus the prediction

Every point runs twice as warm-up (the second run sets the time estimate), then `repeats`
times, round robin over the points; the median counts (see `typical`). Device
work is timed with CUDA events, host work with perf_counter, and the host rows' copies with
perf_counter from an idle device until their reader (the worker, the compute stream) may use
them.
Decode grids use contexts that are whole blocks, so a point's KV rows are exactly what the
kernel reads. Profiles are cached as JSON under a hash of their key (model shape, dtype, device,
host CPU, threads, block size, torch version); a profile whose key or version differs is
measured again, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import attention as dev_attn
from .cli import check_output_path
from .cost_tables import PROFILE_VERSION, BatchShape, Profile
from .cpu_attention import DecodeTables, append_kv, attend as host_attend, compile_enabled
from .cpu_worker import CPUAttentionWorker
from .kv_cache import KVPool, copy_blocks
from .metrics import host_cpu_name
from .plan import Plan, Strategy
from .predictor import Predictor
from .runner import copy_to_device, copy_to_host, pin_for_upload
from .streams import Streams, wait_event


@dataclass(frozen=True)
class Grid:
    tokens: tuple[int, ...]          # linear
    prompts: tuple[int, ...]         # prefill attention
    seqs: tuple[int, ...]            # decode attention: sequences
    kv: tuple[int, ...]              # decode attention: total KV rows (kept where a multiple of
                                     # seqs * block_size, so every context is whole blocks)
    rows: tuple[int, ...]            # LM head, and the host rows' copies
    blocks: tuple[int, ...]          # copies, in one-layer KV blocks
    repeats: int


QUICK = Grid(tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), prompts=(16, 64, 256, 1024),
             seqs=(1, 4, 16, 64), kv=(64, 256, 1024, 4096, 16384), rows=(1, 4, 16, 64, 256),
             blocks=(1, 16, 256), repeats=3)
FULL = Grid(tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            prompts=(16, 64, 256, 1024, 4096), seqs=(1, 2, 4, 8, 16, 32, 64, 128),
            kv=(32, 128, 512, 2048, 8192, 32768, 131072), rows=(1, 4, 16, 64, 256, 1024),
            blocks=(1, 16, 256, 1024), repeats=7)


# ------------------------------------------------------------------------------- keys and cache

def profile_key(model_config, dtype: torch.dtype, device: torch.device, block_size: int,
                cpu_threads: int, compiled: bool) -> dict:
    """What a profile depends on; any difference means measuring again."""
    mc = model_config
    device = torch.device(device)
    return {
        "model": {k: getattr(mc, k) for k in ("hidden_size", "intermediate_size",
                                               "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads", "head_dim", "vocab_size")},
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "host_cpu": host_cpu_name(),
        "host_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_threads": cpu_threads,
        "compiled_cpu_attention": bool(compiled),
        "block_size": block_size,
        "torch": torch.__version__,
    }


def engine_key(engine) -> dict:
    """profile_key for this engine, plus the options of its decode step, which the profile's
    whole-iteration decode table (calibrate) measures, and its layer loop's weight layout."""
    cfg = engine.cfg
    key = profile_key(engine.model_config, engine.dtype, engine.device, cfg.block_size,
                      cfg.cpu_threads, cfg.compile_cpu_attention and compile_enabled())
    key["decode_step"] = {name: getattr(cfg, name) for name in
                          ("compile_decode", "prepack_weights", "cuda_graphs", "bucket_decode")}
    # The weight layout the layer loop's products run on (packed_model.py), which the linear
    # and LM-head tables time.
    key["layer_weights"] = engine.decode_step.loop_model.layout
    return key


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """$APEX_MINI_CACHE/profiles, else ~/.cache/apex_mini/profiles."""
    root = os.environ.get("APEX_MINI_CACHE")
    return Path(root) / "profiles" if root else Path.home() / ".cache" / "apex_mini" / "profiles"


def cache_path(key: dict) -> Path:
    return cache_dir() / f"{key_hash(key)}.json"


def load_profile(path: str | Path, key: dict) -> tuple[Profile | None, str]:
    """(profile, "") when `path` holds a current profile for `key`, else (None, why not)."""
    path = Path(path)
    if not path.is_file():
        return None, f"no profile at {path}"
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        return None, f"profile file {path} cannot be read ({e.strerror})"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"profile file {path} is not a profile JSON ({e})"
    if not isinstance(data, dict):
        return None, f"profile file {path} holds a JSON {type(data).__name__}, not a profile"
    if data.get("version") != PROFILE_VERSION:
        return None, f"profile {path} has version {data.get('version')}, expected {PROFILE_VERSION}"
    if data.get("key") != key:
        stored = data.get("key") or {}
        diff = sorted(k for k in set(key) | set(stored) if key.get(k) != stored.get(k))
        return None, f"profile {path} was measured for a different {', '.join(diff)}"
    try:
        profile = Profile.from_json(path)
    except ValueError as e:                      # fields of another apex_mini version
        return None, str(e)
    if profile.source == "measured" and key.get("device") != "cpu" and not profile.rows_d2h:
        # Its host rows would be priced with the block-copy tables (predictor._host).
        return None, f"profile {path} was measured before the host rows' copies were timed"
    return profile, ""


# ------------------------------------------------------------------------------- timing

def typical(times: list[float]) -> float:
    """The statistic every point keeps: the median. The predictor is judged against single
    iterations as the engine meets them, noise included, and the median is the estimate that
    makes the median relative error smallest. (A low quantile, the "cost without noise", was
    more stable between runs but predicted 10% to 15% short on this noisy machine's decodes.)"""
    return statistics.median(times)


KV_COPIES_BYTES = 256 << 20   # per-layer KV copies are capped at this much memory per tier
DECODE_POOL_BYTES = 2 << 30   # `python -m apex_mini.profile`'s device pool, for decode_iteration


class Timer:
    """Adds up the time of the calls it runs: CUDA events around device work, perf_counter
    otherwise. `total()` syncs once and returns the sum."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.seconds = 0.0

    def __call__(self, fn, *args):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(self.device)   # the model's device, even cuda:1
            start.record(stream)
            out = fn(*args)
            end.record(stream)
            self.events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds += time.perf_counter() - t0
        return out

    def total(self) -> float:
        if self.events:
            self.events[-1][1].synchronize()
        return self.seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1e3


class Profiler:
    """Measures one model's tables. Every piece is timed inside a pass over all the model's
    layers, as in a real iteration: one layer timed in a loop keeps its weights in cache and
    reads several times faster than the real thing. The engine's pools and runner are used
    only for calibration (`profile_engine`)."""

    def __init__(self, model, block_size: int, cpu_threads: int, compiled: bool,
                 progress: bool = True, net=None):
        self.model = model
        # The layers and LM head to time: the engine's runner runs its decode step's packed
        # copy of the model (packed_model.py); model.py's own by default.
        self.net = net if net is not None else model
        self.mc = mc = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size, self.cpu_threads, self.compiled = block_size, cpu_threads, compiled
        self.progress = progress
        self.layers = list(self.net.layers)
        self.scale = mc.head_dim ** -0.5
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def _randn(self, *shape, device=None) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(device or self.device, self.dtype)

    def _pass(self, T: int, middle=None) -> tuple[float, float]:
        """One forward over every layer with T rows: (linear seconds per layer, seconds per layer
        of `middle(layer_idx, q, k, v, timer)`, which runs where attention goes and times its
        own work on `timer`; without it the attention output is q itself)."""
        mc = self.mc
        hidden = self._randn(T, mc.hidden_size)                              # [T, hidden]
        positions = torch.arange(T, device=self.device) % mc.max_position_embeddings
        cos, sin = self.net.rope_tables(positions, self.dtype)
        scratch = torch.zeros(2, -(-T // self.block_size), self.block_size,
                              mc.num_key_value_heads, mc.head_dim, dtype=self.dtype, device=self.device)
        rows = torch.arange(T, device=self.device)                           # [T] = slots too
        lin, mid = Timer(self.device), Timer(self.device)
        for i, layer in enumerate(self.layers):
            q, k, v = lin(layer.pre_attention, hidden, cos, sin)            # [T, H, D], [T, KVH, D]
            lin(lambda: dev_attn.write_kv(scratch[0], scratch[1], rows, k.index_select(0, rows),
                                          v.index_select(0, rows)))
            out = q if middle is None else middle(i, q, k, v, mid)
            lin(layer.post_attention, hidden, out)
        L = len(self.layers)
        return lin.total() / L, mid.total() / L

    # ---------------------------------------------------------------- the pieces (-> seconds)

    def _linear(self, T: int):
        return lambda: self._pass(T)[0]

    def _prefill(self, n: int):
        def middle(i, q, k, v, timer):                 # causal attention on the real q, k, v
            return timer(dev_attn.prefill_attention, q, k, v, 0, self.scale)
        return lambda: self._pass(n, middle)[1]

    def _decode_caches(self, n: int, total: int, device):
        """Per-layer KV copies (as many as KV_COPIES_BYTES allows), block tables, lengths."""
        mc, bs = self.mc, self.block_size
        width = total // n // bs                                            # blocks per sequence
        shape = (n * width, bs, mc.num_key_value_heads, mc.head_dim)
        copies = max(1, min(len(self.layers), KV_COPIES_BYTES // (2 * total * shape[2] * shape[3]
                                                                  * self.dtype.itemsize)))
        caches = [(self._randn(*shape, device=device), self._randn(*shape, device=device))
                  for _ in range(copies)]
        tables = torch.arange(n * width, device=device).view(n, width)    # [n, width]
        lens = torch.full((n,), width * bs, dtype=torch.long, device=device)
        return caches, tables, lens

    def _gpu_decode(self, n: int, total: int):
        caches, tables, lens = self._decode_caches(n, total, self.device)

        def middle(i, q, k, v, timer):
            k_cache, v_cache = caches[i % len(caches)]
            out = torch.empty_like(q)

            def attend():
                out[0:n] = dev_attn.paged_decode_attention(q, k_cache, v_cache, tables, lens, self.scale)
            timer(attend)
            return out
        return lambda: self._pass(n, middle)[1]

    def _cpu_decode(self, n: int, total: int, worker):
        caches, tables, lens = self._decode_caches(n, total, "cpu")
        slots = (tables[:, -1] * self.block_size + self.block_size - 1).contiguous()  # [n]
        streams = Streams(self.device)
        with torch.inference_mode():         # built once per step, as the runner does
            host_tables = DecodeTables(tables, lens, caches[0][0])

        @torch.inference_mode()
        def job(i, q, k, v):                 # on the worker thread; times itself
            t0 = time.perf_counter()
            k_cache, v_cache = caches[i % len(caches)]
            append_kv(k_cache, v_cache, slots, k, v)
            out = host_attend(q, k_cache, v_cache, host_tables, self.scale, compiled=self.compiled)
            out = pin_for_upload(out, streams)           # as the runner's worker does
            return out, time.perf_counter() - t0

        def middle(i, q, k, v, timer):
            q, k, v = (t.to("cpu") for t in (q, k, v))
            out, seconds = worker.submit(job, i, q, k, v).result()
            timer.seconds += seconds
            return out.to(self.device)
        return lambda: self._pass(n, middle)[1]

    def _host_job(self, worker):
        def run():
            t0 = time.perf_counter()
            worker.submit(lambda: None).result()
            return time.perf_counter() - t0
        return run

    def _copy(self, blocks: int, down: bool):
        mc = self.mc
        streams = Streams(self.device)
        shape = (1, blocks, self.block_size, mc.num_key_value_heads, mc.head_dim, self.dtype)
        dev = KVPool(*shape, device=self.device)
        host = KVPool(*shape, device="cpu", pin=streams.pin, cuda_device=self.device)
        src, dst = (dev, host) if down else (host, dev)
        ids = list(range(blocks))

        def run():
            timer = Timer(self.device)
            timer(copy_blocks, src, ids, dst, ids, streams)
            return timer.total()
        return run

    def _rows_down(self, rows: int):
        """One layer's q, k and v rows of `rows` host requests, copied down as the runner does
        (`runner.copy_to_host` on the copy stream), until the worker could read them."""
        mc, streams = self.mc, Streams(self.device)
        parts = [self._randn(rows, n, mc.head_dim)                    # k, v, q: [rows, n, D]
                 for n in (mc.num_key_value_heads, mc.num_key_value_heads, mc.num_attention_heads)]

        def run():
            if streams.is_cuda:
                torch.cuda.synchronize(self.device)      # an idle device: the copies alone
            t0 = time.perf_counter()
            with streams.on_copy():
                for t in parts:
                    copy_to_host(t, streams)
                arrived = streams.record(streams.copy)
            wait_event(arrived)                          # where the worker waits
            return time.perf_counter() - t0
        return run

    def _rows_up(self, rows: int):
        """One layer's attention output of `rows` host requests, copied up as the runner does
        (`runner.copy_to_device`), until the compute stream may use it. Pinned beforehand: the
        worker pins it inside its job, which `cpu_decode_attn` times."""
        mc, streams = self.mc, Streams(self.device)
        out = pin_for_upload(self._randn(rows, mc.num_attention_heads, mc.head_dim, device="cpu"),
                             streams)                                  # [rows, H, D]

        def run():
            if streams.is_cuda:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            copy_to_device(out, self.device, streams)
            if streams.is_cuda:
                torch.cuda.current_stream(self.device).synchronize()
            return time.perf_counter() - t0
        return run

    def _lm_head(self, rows: int):
        hidden = self._randn(rows, self.mc.hidden_size)

        def run():
            self._pass(1)                              # evict as a real iteration would
            timer = Timer(self.device)
            timer(lambda: self.net.logits(hidden).argmax(-1).tolist())
            return timer.total()
        return run

    # ---------------------------------------------------------------- the run

    def run(self, grid: Grid = QUICK) -> Profile:
        bs = self.block_size
        worker = CPUAttentionWorker(self.cpu_threads, device=self.device)
        one_block = KVPool.bytes_per_block(1, bs, self.mc.num_key_value_heads, self.mc.head_dim,
                                           self.dtype)
        decode = [(n, kv) for n in grid.seqs for kv in grid.kv if kv % (n * bs) == 0]
        mc, size = self.mc, self.dtype.itemsize
        row = (mc.num_attention_heads + 2 * mc.num_key_value_heads) * mc.head_dim * size  # q+k+v
        up_row = mc.num_attention_heads * mc.head_dim * size                              # out
        points = (
            [("linear", (t,), self._linear, (t,)) for t in grid.tokens]
            + [("prefill_attn", (n,), self._prefill, (n,)) for n in grid.prompts]
            + [("gpu_decode_attn", d, self._gpu_decode, d) for d in decode]
            + [("cpu_decode_attn", d, self._cpu_decode, (*d, worker)) for d in decode]
            + [("d2h", (b * one_block,), self._copy, (b, True)) for b in grid.blocks]
            + [("h2d", (b * one_block,), self._copy, (b, False)) for b in grid.blocks]
            + [("rows_d2h", (r * row,), self._rows_down, (r,)) for r in grid.rows]
            + [("rows_h2d", (r * up_row,), self._rows_up, (r,)) for r in grid.rows]
            + [("lm_head", (r,), self._lm_head, (r,)) for r in grid.rows]
            + [("host_job", (), self._host_job, (worker,))])
        tables: dict[str, list] = {}
        try:
            with torch.inference_mode():
                calls, estimate = [], 0.0
                for name, x, make, args in tqdm(points, desc="profile warm-up", unit="pt",
                                                disable=not self.progress, leave=False):
                    call = make(*args)
                    call()
                    t0 = time.perf_counter()
                    call()
                    estimate += (time.perf_counter() - t0) * grid.repeats
                    calls.append((name, x, call))
                self._say(f"profiling {len(points)} points x {grid.repeats} runs; about "
                          f"{estimate:.1f} s")
                # Round robin: a burst of load then spoils one run of many points, which the
                # median drops, not every run of one point.
                times: list[list[float]] = [[] for _ in calls]
                bar = tqdm(total=len(calls) * grid.repeats, desc="profiling", unit="run",
                           disable=not self.progress, leave=False)
                for _ in range(grid.repeats):
                    for i, (_, _, call) in enumerate(calls):
                        times[i].append(call())
                        bar.update()
                bar.close()
                for (name, x, _), ts in zip(calls, times):
                    tables.setdefault(name, []).append([*x, typical(ts)])
        finally:
            worker.close()
        return Profile(
            key=profile_key(mc, self.dtype, self.device, bs, self.cpu_threads, self.compiled),
            num_layers=mc.num_hidden_layers,
            linear=tables["linear"], prefill_attn=tables["prefill_attn"],
            gpu_decode_attn=tables["gpu_decode_attn"], cpu_decode_attn=tables["cpu_decode_attn"],
            d2h=tables["d2h"], h2d=tables["h2d"], lm_head=tables["lm_head"],
            rows_d2h=tables["rows_d2h"], rows_h2d=tables["rows_h2d"],
            bytes_per_token_row=row,
            kv_block_bytes=one_block * mc.num_hidden_layers,
            host_job_s=tables["host_job"][0][0],
            source="measured")

    def _say(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr)


# ------------------------------------------------------------------------------- calibration

def _fake_seq(ids, ctx: int, tier: str, decoding: bool):
    """A running request of `ctx` tokens whose KV (all but the newest token, when decoding)
    is cached in `tier`."""
    from .sampling import SamplingParams
    from .sequence import Sequence, Status
    s = Sequence(next(ids), [1] * ctx, SamplingParams(temperature=0.0, max_tokens=1), seed=0)
    s.status, s.tier, s.num_computed = Status.RUNNING, tier, ctx - 1 if decoding else 0
    return s


def _time_plans(runner, plans, tables, repeats: int) -> list[float]:
    """Median seconds of `runner.execute` per plan, round robin after two warm-up
    rounds (which also compile and capture CUDA graphs)."""
    times: list[list[float]] = [[] for _ in plans]
    for r in range(repeats + 2):
        for p, ts in zip(plans, times):
            t0 = time.perf_counter()
            runner.execute(p, tables)
            if r >= 2:
                ts.append(time.perf_counter() - t0)
    return [typical(ts) for ts in times]


def decode_iteration_table(engine, grid: Grid) -> list[list[float]]:
    """[[n_seqs, kv_tokens, s], ...]: whole decode-only iterations, timed as the engine times
    them (`runner.execute`), on the engine's device pool, still empty (profiling comes before
    any request; the profile command sizes that pool at `DECODE_POOL_BYTES`). Every sequence
    holds kv_tokens / n_seqs tokens (whole blocks); past the pool's size block ids repeat, so
    a big point reads some memory twice, where a pool of its size would not."""
    from .sequence import GPU
    bs = engine.cfg.block_size
    points = [(n, kv) for n in grid.seqs for kv in grid.kv if kv % (n * bs) == 0]
    blocks = engine.gpu_blocks.num_blocks
    ids = iter(range(1 << 30))
    plans, tables = [], {GPU: {}}
    for n, kv in points:
        ctx, width = kv // n, kv // n // bs
        seqs = [_fake_seq(ids, ctx, GPU, decoding=True) for _ in range(n)]
        for i, s in enumerate(seqs):
            tables[GPU][s.seq_id] = [(i * width + j) % blocks for j in range(width)]
        plans.append(Plan(gpu_decodes=seqs))
    worker = CPUAttentionWorker(engine.cfg.cpu_threads, device=engine.device)
    try:
        runner = engine.make_runner(worker)
        times = _time_plans(runner, plans, tables, grid.repeats)
    finally:
        worker.close()
    return [[n, kv, t] for (n, kv), t in zip(points, times)]


PROMPT_CALIBRATION_BLOCKS = 16  # the longest calibration prompt, in blocks


def calibration_runs(engine, repeats: int = 7) -> list[tuple[BatchShape, Strategy, float]]:
    """Time a few real iterations that run the layer loop (with a prefill: decode-only ones
    take the static decode step, which `decode_iteration_table` measures whole) through a
    `ModelRunner` on the engine's (still empty) device pool: prompts from a few tokens to
    `PROMPT_CALIBRATION_BLOCKS` blocks, beside decodes of a few tokens in block 0. Returns
    (shape, strategy, median measured seconds) per plan."""
    from .sequence import GPU

    bs = engine.cfg.block_size
    small, longest = min(8, bs), PROMPT_CALIBRATION_BLOCKS * bs
    ids = iter(range(1 << 30))

    def plan(n_prefill=1, n_gpu=0, prompt=small) -> Plan:
        return Plan(prefills=[(_fake_seq(ids, prompt, GPU, False), prompt) for _ in range(n_prefill)],
                    gpu_decodes=[_fake_seq(ids, small, GPU, True) for _ in range(n_gpu)])

    plans = [plan(), plan(n_prefill=2), plan(n_gpu=2), plan(n_gpu=8), plan(n_prefill=4, n_gpu=4),
             plan(prompt=longest), plan(n_prefill=2, n_gpu=4, prompt=longest // 4)]
    prompt_blocks = [b % engine.gpu_blocks.num_blocks for b in range(PROMPT_CALIBRATION_BLOCKS)]
    tables = {GPU: {**{s.seq_id: [0] for p in plans for s in p.gpu_decodes},
                    **{s.seq_id: prompt_blocks for p in plans for s, _ in p.prefills}}}
    worker = CPUAttentionWorker(engine.cfg.cpu_threads, device=engine.device)
    try:
        runner = engine.make_runner(worker)
        times = _time_plans(runner, plans, tables, repeats)
    finally:
        worker.close()
    return [(BatchShape.from_plan(p), p.strategy, t) for p, t in zip(plans, times)]


def calibrate(profile: Profile, engine, grid: Grid = QUICK, repeats: int = 7) -> Profile:
    """Measure whole decode-only iterations, then the layer loop's fixed per-iteration
    overhead: the median of (measured - predicted) over real iterations, at least 0."""
    profile.decode_iteration = decode_iteration_table(engine, grid)
    runs = calibration_runs(engine, repeats)
    bare = Predictor(profile, bucket_decode=engine.cfg.bucket_decode)
    residuals = [m - bare.iteration_time(shape, strategy) for shape, strategy, m in runs]
    profile.overhead = max(0.0, statistics.median(residuals))
    return profile


def profile_engine(engine, grid: Grid = QUICK, progress: bool = True) -> Profile:
    compiled = engine.cfg.compile_cpu_attention and compile_enabled()
    profiler = Profiler(engine.model, engine.cfg.block_size, engine.cfg.cpu_threads, compiled,
                        progress, net=engine.decode_step.loop_model)
    start = time.perf_counter()
    profile = calibrate(profiler.run(grid), engine, grid)
    profile.key = engine_key(engine)           # the decode table measured this engine's step
    profiler._say(f"profiled in {time.perf_counter() - start:.1f} s")
    return profile


def is_a_profile(path: Path) -> bool:
    """Does `path` hold a profile, of any version or key (and not some other file)?"""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "version" in data and "key" in data


def predictor_for_engine(engine, grid: Grid = QUICK, progress: bool = True) -> Predictor:
    """The engine's predictor: the cached profile for this model and machine if it is current,
    else a fresh one (measured now and saved)."""
    key = engine_key(engine)
    given = engine.cfg.profile_path
    path = Path(given) if given else cache_path(key)
    profile, why = load_profile(path, key)
    if profile is None and given and path.is_dir():
        raise ValueError(f"--profile-path {given} is a folder; give a file path (a profile is "
                         "measured and saved there if there is none)")
    if profile is None and given and path.exists():
        # A file the user named is theirs: never replaced behind their back. Only an old
        # profile is worth deleting; any other file was named by mistake.
        fix = "delete it or name another file" if is_a_profile(path) else "name another file"
        raise ValueError(f"--profile-path: {why}; {fix} (a new profile is then measured and "
                         "saved there)")
    if profile is None:
        check_output_path(str(path), "--profile-path")     # before minutes of profiling
        if progress:
            print(f"{why}; profiling this machine (once)", file=sys.stderr)
        profile = profile_engine(engine, grid, progress)
        profile.to_json(path)
    return Predictor(profile, bucket_decode=engine.cfg.bucket_decode,
                     feedback=engine.cfg.predictor_feedback)
