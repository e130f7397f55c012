"""Execute one planned iteration: the layer loop under each strategy.

Per layer, asynchronous overlap (the merged batch) runs

    pre_attention (all rows, device)  ->  rows of host-tier requests go down on the copy stream
                                      ->  CPU worker: append their K/V, attend over the host pool
    device attention (other rows)     ->  meanwhile, on the device
    join: wait for the worker, copy its output up, merge  ->  post_attention (all rows, device)

Asymmetric pipelining runs two such sub-batches a layer apart, so one's CPU attention overlaps
the other's device work. GPU-only is the overlap loop with no host rows. On a machine without
CUDA the "device" is the CPU, every stream call is a no-op, and results are identical.

Decode-only, device-only steps (no prefill, no host rows) skip the layer loop: they run the
static-shape `DecodeStep` (decode_step.py), eagerly, compiled, or replayed as a CUDA graph
(cuda_graphs.py). The host-attention overlap above never enters a graph.

The layer loop runs the decode step's packed copy of the model (packed_model.py: the same
layers on weights stacked and laid out for fewer, faster products), so every step multiplies by
the same weights. With the fast path off (`decode_step=None`) it runs model.py's own layers,
the reference the tests compare against.
"""
from __future__ import annotations

import collections
import time

import torch

from . import attention as dev_attn
from .batch import Batch, build_batch, build_decode_inputs, sampling_tensors, take_rows
from .cpu_attention import DecodeTables, append_kv, attend as host_attend
from .decode_step import DecodeStep
from .kv_cache import KVPool, copy_blocks
from .plan import Plan, Strategy, bucket
from .sampling import sample
from .sequence import CPU, GPU
from .streams import Streams, wait_event


class ModelRunner:
    def __init__(self, model, device: torch.device, gpu_pool: KVPool, cpu_pool: KVPool,
                 worker, streams: Streams, block_size: int, scratch_block: int,
                 compile_cpu_attention: bool, bucket_decode: bool, decode_step: DecodeStep,
                 graphs=None):
        self.model, self.device = model, device
        self.pools = {GPU: gpu_pool, CPU: cpu_pool}
        self.worker, self.streams = worker, streams
        self.block_size, self.scratch_block = block_size, scratch_block
        self.compile_cpu_attention = compile_cpu_attention
        self.bucket_decode = bucket_decode
        # Decode-only, device-only steps run this instead of the layer loop; None turns the
        # fast path off (every step then takes the layer loop, as a reference).
        self.decode_step: DecodeStep | None = decode_step
        self.graphs = graphs                 # CudaGraphDecoder (replays decode_step) or None
        # (rows, block-table width) -> fast-path steps run with that static shape
        self.decode_shapes: collections.Counter[tuple[int, int]] = collections.Counter()
        cfg = model.config
        self.scale = cfg.head_dim ** -0.5
        # Set to a list to record (event, layer, t) stamps of each step (perf_counter seconds):
        # see `_stamp` and `_stamp_gpu`.
        self.timeline: list | None = None
        self._gpu_stamps: list = []          # (event, layer, torch.cuda.Event), this step
        self._anchor = None                  # (CUDA event, perf_counter) the GPU stamps map to

    @property
    def net(self):
        """What the layer loop runs: the decode step's packed copy of the model (its weights laid
        out for fewer, faster products: packed_model.py), or, with the fast path off, model.py's
        own layers, the reference."""
        return self.decode_step.loop_model if self.decode_step is not None else self.model

    # ------------------------------------------------------------------ entry point

    @torch.inference_mode()
    def execute(self, plan: Plan, tables) -> list[int]:
        """Run `plan` (swaps, then the forward) and return the sampled tokens, in row order."""
        recording_gpu = self.timeline is not None and self.streams.is_cuda
        self._anchor = self._gpu_anchor() if recording_gpu else None
        self._gpu_stamps = []
        tokens = self._execute(plan, tables)
        if self._anchor is not None:
            self._resolve_gpu_stamps()
        return tokens

    def _execute(self, plan: Plan, tables) -> list[int]:
        for swap in plan.swaps:
            copy_blocks(self.pools[swap.src_tier], swap.src_blocks,
                        self.pools[swap.dst_tier], swap.dst_blocks, self.streams)
        if plan.is_empty:
            return []
        decode_only = not plan.prefills and not plan.cpu_decodes
        if decode_only and self.decode_step is not None:
            logits = self._decode(plan, tables)
        elif plan.strategy is Strategy.PIPELINE and len(plan.cpu_decodes) >= 1 and (
                plan.prefills or plan.gpu_decodes or len(plan.cpu_decodes) >= 2):
            parts = split_for_pipeline(plan)
            batches = [self._build(p, tables) for p in parts]
            hidden = self._forward_pipelined(batches)
            logits = torch.cat([self.net.logits(take_rows(h, b.logits_rows))
                                for h, b in zip(hidden, batches)])
        else:
            pad = bucket(len(plan.gpu_decodes)) if decode_only and self.bucket_decode else 0
            batch = self._build(plan, tables, pad_decode_to=pad)
            hidden = self._forward(batch)
            logits = self.net.logits(take_rows(hidden, batch.logits_rows))
        sampling = sampling_tensors(plan, self.device)     # rows in plan order, as the logits
        tokens = logits.argmax(-1) if sampling is None else sample(logits, **sampling)
        return tokens.tolist()                         # the one host sync of the step

    def _decode(self, plan: Plan, tables) -> torch.Tensor:
        """The fast path: logits [num_seqs, vocab] of a decode-only, device-only step."""
        inputs = build_decode_inputs(plan.gpu_decodes, tables[GPU], self.block_size,
                                     self.scratch_block, self.bucket_decode, self.streams.pin)
        self.decode_shapes[inputs.key] += 1
        if self.graphs is not None:
            return self.graphs.run(inputs)
        return self.decode_step(inputs)

    def _build(self, plan: Plan, tables, pad_decode_to: int = 0) -> Batch:
        batch = build_batch(plan, tables, self.block_size, self.device, pad_decode_to,
                            self.scratch_block, bucket_blocks=self.bucket_decode)
        g = batch.cpu_decode
        if g is not None:      # checked and laid out once, for every layer's host attention
            g.host_tables = DecodeTables(g.block_tables, g.context_lens, self.pools[CPU].layer(0)[0])
        return batch

    # ------------------------------------------------------------------ strategies

    def _forward(self, batch: Batch) -> torch.Tensor:
        """The merged batch (GPU-only or asynchronous overlap)."""
        hidden, cos, sin = self.net.embed(batch.input_ids, batch.positions)
        for layer in self.net.layers:
            pending = self._start_layer(layer, hidden, cos, sin, batch)
            hidden = self._finish_layer(layer, hidden, pending, batch)
        return hidden

    def _forward_pipelined(self, batches: list[Batch]) -> list[torch.Tensor]:
        """Two sub-batches offset by one layer: while the CPU attends for one, the device runs
        the other's linear layers. Every layer's weights are read twice per iteration."""
        a, b = batches
        ha, cos_a, sin_a = self.net.embed(a.input_ids, a.positions)
        hb, cos_b, sin_b = self.net.embed(b.input_ids, b.positions)
        layers = self.net.layers
        pending_b = None
        for i, layer in enumerate(layers):
            pending_a = self._start_layer(layer, ha, cos_a, sin_a, a)
            if pending_b is not None:
                hb = self._finish_layer(layers[i - 1], hb, pending_b, b)
            pending_b = self._start_layer(layer, hb, cos_b, sin_b, b)
            ha = self._finish_layer(layer, ha, pending_a, a)
        hb = self._finish_layer(layers[-1], hb, pending_b, b)
        return [ha, hb]

    # ------------------------------------------------------------------ one layer, in two halves

    def _start_layer(self, layer, hidden, cos, sin, batch: Batch):
        """QKV for all rows; send host rows to the CPU worker; device attention for the rest."""
        q, k, v = layer.pre_attention(hidden, cos, sin)   # [T, H, D], [T, KVH, D], [T, KVH, D]
        host_job = self._launch_host(layer.layer_idx, q, k, v, batch) if batch.num_host_rows else None
        out = torch.empty_like(q)                         # [T, H, D]
        self._device_attention(layer.layer_idx, q, k, v, batch, out)
        return out, host_job

    def _finish_layer(self, layer, hidden, pending, batch: Batch) -> torch.Tensor:
        out, host_job = pending
        if host_job is not None:
            self._join_host(layer.layer_idx, host_job, out, batch)
        return layer.post_attention(hidden, out)

    def _device_attention(self, layer_idx, q, k, v, batch: Batch, out) -> None:
        self._stamp("dev_start", layer_idx)
        self._stamp_gpu("gpu_dev_start", layer_idx)
        self._attend_on_device(layer_idx, q, k, v, batch, out)
        self._stamp_gpu("gpu_dev_end", layer_idx)
        self._stamp("dev_end", layer_idx)

    def _attend_on_device(self, layer_idx, q, k, v, batch: Batch, out) -> None:
        k_cache, v_cache = self.pools[GPU].layer(layer_idx)
        if batch.num_dev_rows:
            dev_attn.write_kv(k_cache, v_cache, batch.dev_slots,
                              take_rows(k, batch.dev_rows), take_rows(v, batch.dev_rows))
        for chunk in batch.prefills:
            rows = slice(chunk.start, chunk.start + chunk.length)
            k_ctx, v_ctx = k[rows], v[rows]                # [n, KVH, D]
            if chunk.ctx_start:
                k_prior, v_prior = self._prior_kv(layer_idx, chunk)
                k_ctx, v_ctx = torch.cat([k_prior, k_ctx]), torch.cat([v_prior, v_ctx])
            out[rows] = dev_attn.prefill_attention(q[rows], k_ctx, v_ctx, chunk.ctx_start, self.scale)
        g = batch.gpu_decode
        if g is not None:
            out[g.rows] = dev_attn.paged_decode_attention(
                q[g.rows], k_cache, v_cache, g.block_tables, g.context_lens, self.scale)

    def _prior_kv(self, layer_idx, chunk):
        """K/V of a chunked prefill's cached prefix, brought to the device: [ctx_start, KVH, D]."""
        k_cache, v_cache = self.pools[chunk.tier].layer(layer_idx)
        k = dev_attn.gather_kv(k_cache, chunk.prior_slots)
        v = dev_attn.gather_kv(v_cache, chunk.prior_slots)
        return k.to(self.device), v.to(self.device)

    # ------------------------------------------------------------------ the host side

    def _launch_host(self, layer_idx, q, k, v, batch: Batch):
        """Copy host rows down on the copy stream and hand them to the worker. Returns a future."""
        s = self.streams
        g = batch.cpu_decode
        k_rows = take_rows(k, batch.host_rows)                    # [Nh, KVH, D]
        v_rows = take_rows(v, batch.host_rows)                    # [Nh, KVH, D]
        q_rows = q[g.rows] if g is not None else None             # [Bc, H, D]
        ready = s.record()
        with s.on_copy():
            s.copy_waits_for(ready)
            down = [copy_to_host(t, s) for t in (k_rows, v_rows, q_rows)]
            arrived = s.record(s.copy)
        self._stamp("launch", layer_idx)
        return self.worker.submit(self._host_attention, layer_idx, arrived, *down, batch)

    def _host_attention(self, layer_idx, arrived, k_rows, v_rows, q_rows, batch: Batch):
        """On a worker thread: append K/V to the host pool, then decode attention there."""
        wait_event(arrived)
        self._stamp("cpu_start", layer_idx)
        k_cache, v_cache = self.pools[CPU].layer(layer_idx)
        append_kv(k_cache, v_cache, batch.host_slots, k_rows, v_rows)
        out = None
        g = batch.cpu_decode
        if g is not None:
            out = host_attend(q_rows, k_cache, v_cache, g.host_tables, self.scale,
                              compiled=self.compile_cpu_attention)
            out = pin_for_upload(out, self.streams)
        self._stamp("cpu_end", layer_idx)
        return out

    def _join_host(self, layer_idx, job, out, batch: Batch) -> None:
        """Wait for the worker only now, just before the O projection, and merge its rows."""
        self._stamp("join", layer_idx)              # the main thread arrives; then it waits
        host_out = job.result()
        g = batch.cpu_decode
        if host_out is None:
            return
        out[g.rows] = copy_to_device(host_out, self.device, self.streams)   # [Bc, H, D]

    # ------------------------------------------------------------------ the timeline

    def _stamp(self, what: str, layer_idx: int) -> None:
        """A host-clock stamp: when this thread got here (`launch`, `dev_start`, `dev_end` and
        `join` on the main thread; `cpu_start`, `cpu_end` on the worker)."""
        if self.timeline is not None:
            self.timeline.append((what, layer_idx, time.perf_counter()))

    def _stamp_gpu(self, what: str, layer_idx: int) -> None:
        """On CUDA, a stamp of when the *GPU* gets here: a CUDA event on the compute stream,
        which the GPU records once it has run the kernels queued before it. Mapped to the host
        clock after the step (`_resolve_gpu_stamps`)."""
        if self._anchor is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self._gpu_stamps.append((what, layer_idx, event))

    def _gpu_anchor(self) -> tuple:
        """An idle GPU records an event as soon as it is queued: that event and the host clock
        read right after it are the pair every GPU stamp of this step is measured from (to
        within the launch latency, some microseconds)."""
        torch.cuda.synchronize(self.device)
        anchor = torch.cuda.Event(enable_timing=True)
        anchor.record(torch.cuda.current_stream(self.device))
        return anchor, time.perf_counter()

    def _resolve_gpu_stamps(self) -> None:
        anchor, t0 = self._anchor
        torch.cuda.synchronize(self.device)
        for what, layer_idx, event in self._gpu_stamps:
            self.timeline.append((what, layer_idx, t0 + anchor.elapsed_time(event) / 1e3))
        self._anchor, self._gpu_stamps = None, []


# The host rows' copies, one layer's: down before the worker attends, up after. (The profiler
# times these same functions for the predictor: `Profile.rows_d2h`, `rows_h2d`.)

def copy_to_host(t: torch.Tensor | None, s: Streams) -> torch.Tensor | None:
    """Queue a copy of device rows into pinned host memory; call on the copy stream, after it
    waits for the rows to be written. No-op for host tensors (the "device" is the CPU)."""
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=s.pin)
    host.copy_(t, non_blocking=True)
    t.record_stream(s.copy)                # t was made on the compute stream, read on the copy one
    return host


def pin_for_upload(t: torch.Tensor, s: Streams) -> torch.Tensor:
    """On the worker: its output rows into pinned memory, so the copy up can be asynchronous."""
    return t.pin_memory() if s.pin else t


def copy_to_device(t: torch.Tensor, device: torch.device, s: Streams) -> torch.Tensor:
    """Host rows to the device on the copy stream; the compute stream waits for them."""
    with s.on_copy():
        up = t.to(device, non_blocking=s.is_cuda)
        arrived = s.record(s.copy)
    s.compute_waits_for(arrived)
    if s.is_cuda:          # made on the copy stream, read on the compute one: not reused before
        up.record_stream(torch.cuda.current_stream(device))
    return up


def split_for_pipeline(plan: Plan) -> list[Plan]:
    """Two sub-batches, NEO-style: (prefills, device decodes, a share of host decodes) and the
    rest of the host decodes, balanced by host decode count."""
    half = len(plan.cpu_decodes) // 2
    a = Plan(prefills=plan.prefills, gpu_decodes=plan.gpu_decodes, cpu_decodes=plan.cpu_decodes[:half],
             strategy=plan.strategy)
    b = Plan(cpu_decodes=plan.cpu_decodes[half:], strategy=plan.strategy)
    return [a, b]
