"""CUDA graphs for the decode step: capture once per static shape, then replay.

A decode step of a 7B model is ~30 launches per layer, about a thousand per step. Launching one
costs a few microseconds of CPU time, which at batch 1 is comparable to the kernels themselves:
the GPU idles between them. A CUDA graph records the whole sequence once; a replay submits it
with one call, and the GPU runs the kernels back to back.

A graph replays fixed pointers and fixed shapes. So:

- every input lives in a static device buffer owned by the graph: one int64 tensor per shape
  (`batch.DecodeInputs`); before a replay the step's packed ints are copied into it (one
  host->device copy), and the graph reads them from there;
- one graph per (batch bucket, block-table width bucket); bucketing keeps that set small.
  Padded rows write their K/V into the engine's scratch block and are never sampled;
- graphs are captured lazily, the first time a shape is seen, after a warm-up on a side stream
  (cuBLAS workspaces, torch.compile, the allocator's first allocations must not happen inside
  a capture);
- all graphs allocate from one shared memory pool. That is safe because a graph's output
  is read before the next replay, and replays never overlap;
- a graph stops at the final norm: its output, kept for as long as the graph, is the hidden
  states [B, hidden], and the LM head runs after the replay, on the real rows only. Graphs
  holding [B, vocab] fp32 logits would keep 2.2 GB for Llama-3's vocabulary over the
  (batch, width) buckets of 256 requests of 4k tokens; two launches more per step.

The KV pool and the weights are read and written in place, never reallocated, so their
addresses stay valid for every captured graph. Only decode-only, device-only steps are
replayed; the hybrid path's CPU attention runs outside any graph, joined by events.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import DecodeInputs
from .decode_step import DecodeStep

WARMUP_RUNS = 2


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    packed: torch.Tensor          # [B * (4 + W)] static device input, read by the graph
    hidden: torch.Tensor          # [B, hidden] static output (final-normed), rewritten by replays


class CudaGraphDecoder:
    """`run(inputs) -> logits [num_seqs, vocab]`, replaying a graph captured per
    `inputs.key` = (batch size, block-table width)."""

    def __init__(self, step: DecodeStep):
        if step.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.step = step
        self.captured: dict[tuple[int, int], CapturedStep] = {}
        self.pool = None                                 # memory pool shared by all graphs
        # One warm-up and one capture stream for every graph: libraries may keep a workspace
        # per stream they ran on (cuBLAS's is 32 MiB on Hopper), so new ones per graph add up.
        self.warmup_stream = torch.cuda.Stream(step.device)
        self.capture_stream = torch.cuda.Stream(step.device)

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        entry = self.captured.get(inputs.key)
        if entry is None:
            entry = self.captured[inputs.key] = self.capture(*inputs.key)
        entry.packed.copy_(inputs.packed, non_blocking=True)   # pinned host -> static buffer
        entry.graph.replay()
        return self.step.head(entry.hidden[:inputs.num_seqs])     # [num_seqs, vocab]

    def capture(self, batch_size: int, width: int) -> CapturedStep:
        # On the step's device: a capture stream on another device (the current one, cuda:0,
        # for a model on cuda:1) would record nothing of the step's kernels.
        with torch.cuda.device(self.step.device):
            return self._capture(batch_size, width)

    def _capture(self, batch_size: int, width: int) -> CapturedStep:
        step = self.step
        packed = torch.empty(batch_size * (4 + width), dtype=torch.long, device=step.device)
        ids, positions, slots, context_lens, tables = DecodeInputs.views(packed, batch_size, width)
        # Placeholder inputs that touch only the scratch block: the warm-up runs really execute.
        ids.zero_()
        positions.zero_()
        slots.fill_(step.scratch_block * step.block_size)
        context_lens.fill_(1)
        tables.fill_(step.scratch_block)
        args = (ids, positions, slots, context_lens, tables)

        side = self.warmup_stream
        side.wait_stream(torch.cuda.current_stream(step.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):                  # compiles, or falls back to eager
                step.run_or_fall_back(step.run_hidden, step.hidden_states, args)
        torch.cuda.current_stream(step.device).wait_stream(side)

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream):
            hidden = step.run_hidden(*args)              # [B, hidden]
        if self.pool is None:
            self.pool = graph.pool()
        return CapturedStep(graph, packed, hidden)

    @property
    def num_graphs(self) -> int:
        return len(self.captured)
