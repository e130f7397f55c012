"""The decode step: one new token for every request of a decode-only, device-only batch, as one
function of static-shape tensors.

Decode is memory-bound: a step reads every weight once plus the KV of every running request,
and does little arithmetic with them. What else it costs is fixed work per operation: Python,
the dispatcher and, on a GPU, one kernel launch per op. The runner's general layer loop pays
that work for features a pure decode step does not need (prefill chunks, host rows, index
gathers to route rows). So decode-only, device-only steps (the common case in serving) run
this leaner function instead:

- Inputs are five int64 views of one packed tensor (`batch.DecodeInputs`): one host->device
  copy per step, however many requests.
- Everything shared by the layers is computed once per step, not once per layer: RoPE's
  cos/sin, the attention mask, the flattened block tables.
- On the CPU the gathered K/V context goes into two buffers kept from step to step (eager
  step only). A fresh tensor of that size (136 KB per layer at batch 1 here, 2 MB at batch
  16) comes from the OS as new pages, and touching them for the first time can cost more than
  the gather itself: one step repeated on the same inputs ran 2.3x faster at batch 16 with the
  buffers kept (4-7% in the engine, whose allocator state varies from step to step).
- The layers are the engine's packed copy of the model (packed_model.py): weights fetched once
  into plain attributes, q/k/v and gate/up each stacked into one product, oneDNN-packed when
  eager on the CPU, transposed when compiled (`prepack=False` turns the copies off), RoPE as
  one roll. The runner's layer loop runs the same layers. A compiled CPU step runs small
  batches only and hands larger ones to an eager twin.
- Attention is one `scaled_dot_product_attention` call over the gathered context, with the G
  query heads of each KV head laid out as G query positions, so grouped-query attention needs
  no repeated K/V and no `enable_gqa` path. The gather pads every row to the batch's widest
  block table, so B * W blocks can outgrow the pool itself (256 rows padded to one 4k-token
  request: 8 GiB per layer for Llama-2-7B's K alone). Past `GATHER_BYTES` the rows are
  attended in chunks that each gather at most that much: a bound the engine's memory reserve
  can count on (device_memory.py). (Compiled, a shape past the bound fixes its chunk loop in
  its graph: one compilation per such shape, eager past torch.compile's recompile limit.)
- No Python branches on data: for a given (batch, width) shape the same ops run in the same
  order. That is what lets `torch.compile` trace it once and CUDA graphs replay it.

The numerics follow model.py (RMSNorm in fp32, the same RoPE), so greedy tokens equal the
layer loop's, which runs the same packed layers (only the attention's summation order differs:
SDPA instead of einsum), and the reference's, model.py's own layers with the fast path off
(packed_model.py says where those round differently).

Vocabulary: B = rows (padded to a bucket), W = block-table width, ctx = W * block_size,
H = query heads, KVH = key/value heads, G = H // KVH, D = head_dim.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .batch import DecodeInputs
from .compile_fallback import compiled_or_eager
from .kv_cache import GATHER_BYTES, GatherBuffers, KVPool, gather_blocks, rows_per_gather
from .packed_linear import ONEDNN, PLAIN, choose_layout
from .packed_model import PackedModel

# Batch rows up to which a compiled CPU step runs itself; larger batches go to its eager twin
# (see DecodeStep.__init__). On the machine of docs/benchmarks.md the two were level at 4 rows.
COMPILED_CPU_MAX_ROWS = 4


class DecodeStep:
    """`forward(input_ids, positions, slots, context_lens, block_tables) -> logits [B, vocab]`
    (fp32), appending each row's K/V to the device pool at `slots` on the way.

    Invariant: every tensor it touches (weights, the pool) was allocated before construction
    and is never reallocated, so a CUDA graph captured around `forward` stays valid."""

    def __init__(self, model, pool: KVPool, block_size: int, scratch_block: int,
                 compile: bool = False, prepack: bool = True):
        cfg = model.config
        self.device = pool.device
        self.block_size, self.scratch_block = block_size, scratch_block
        self.H, self.KVH, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        # On the CPU the step multiplies by copies of the weights, q/k/v and gate/up stacked:
        # oneDNN-packed when eager, transposed when compiled (Inductor cannot trace oneDNN's).
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        self.weight_layout = choose_layout(prepack, compile, self.device,
                                           model.lm_head.weight.dtype, weight_bytes)
        self.net = PackedModel(model, self.weight_layout)
        # Each layer with its K/V pool: [num_blocks, block_size, KVH, D] each.
        self.layers = [(layer, *pool.layer(layer.layer_idx)) for layer in self.net.layers]
        self.compiled = compile
        # The eager CPU step gathers each layer's context into buffers kept between steps
        # (kv_cache.GatherBuffers). Not on CUDA (its caching allocator already reuses memory,
        # and a captured graph must not see a buffer replaced) nor under Inductor (which plans
        # its own buffers).
        self.buffers = GatherBuffers() if self.device.type == "cpu" and not compile else None
        self.cache_like = pool.layer(0)[0]                 # the block shape the buffers hold
        self.block_bytes = self.cache_like[0].numel() * self.cache_like.element_size()
        self.gather_bytes = GATHER_BYTES
        # The first shape compiles static, a second shape recompiles once with dynamic sizes.
        # On the CPU the generated code's wrapper is C++ too (cpp_wrapper): a Python wrapper
        # costs ~0.2 ms per step, which is a quarter of a small model's whole step.
        # Nothing global is changed.
        options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
        self.run = torch.compile(self.forward, options=options) if compile else self.forward
        # What CUDA graphs capture: the step up to the final norm (cuda_graphs.py). Compiled
        # lazily, on its first call, so only if graphs use it.
        self.run_hidden = (torch.compile(self.hidden_states, options=options) if compile
                           else self.hidden_states)
        # Compiled on the CPU, the step multiplies by the transposed copy, which only beats
        # oneDNN's packed products at a few rows (docs/benchmarks.md: at batch 1 the compiled
        # step is the faster, from batch 8 the eager one). So batches past
        # COMPILED_CPU_MAX_ROWS go to an eager twin with the oneDNN copy, where that copy fits
        # too (as much memory again as the weights).
        self.eager_twin: DecodeStep | None = None
        if compile and prepack and self.device.type == "cpu":
            with warnings.catch_warnings():          # no room: the compiled step serves alone
                warnings.simplefilter("ignore")
                twin = DecodeStep(model, pool, block_size, scratch_block, compile=False,
                                  prepack=True)
            self.eager_twin = twin if twin.weight_layout == ONEDNN else None

    @property
    def loop_model(self) -> PackedModel:
        """The packed model for the runner's layer loop: the eager twin's when there is one (its
        oneDNN products beat the compiled step's transposed copy past a few rows), else this
        step's."""
        return (self.eager_twin or self).net

    @property
    def prepacked(self) -> bool:
        """Whether the step multiplies by a copy of the weights (any layout but PLAIN)."""
        return self.weight_layout != PLAIN

    # ------------------------------------------------------------------ the step

    def __call__(self, inputs: DecodeInputs) -> torch.Tensor:
        """Eager entry: copy the packed ints over, run, return logits of the real rows."""
        if self.eager_twin is not None and inputs.batch_size > COMPILED_CPU_MAX_ROWS:
            return self.eager_twin(inputs)
        packed = inputs.packed.to(self.device, non_blocking=True)
        args = DecodeInputs.views(packed, inputs.batch_size, inputs.width)
        logits = self.run_or_fall_back(self.run, self.forward, args)
        return logits[:inputs.num_seqs]                     # [num_seqs, vocab]

    def run_or_fall_back(self, compiled, eager, args: tuple) -> torch.Tensor:
        """`compiled(*args)`; if compiling fails (no C++ compiler, an unsupported platform),
        `eager(*args)` instead, and the step runs eagerly from then on (warned once). An error
        the eager step raises too (bad input) is raised. (CUDA graphs warm up through this.)"""
        if compiled == eager:                               # not compiled (bound methods: ==)
            return eager(*args)
        # Should the compiled step fail after writing this step's K/V slots, the eager one
        # writes the same values to the same places.
        return compiled_or_eager(compiled, eager, args, "decode step", self._run_eagerly)

    def _run_eagerly(self) -> None:
        self.run, self.run_hidden = self.forward, self.hidden_states

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                context_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_states(input_ids, positions, slots, context_lens, block_tables))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, hidden] -> logits [B, vocab] (fp32)."""
        return self.net.head(hidden)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      context_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """The step up to the LM head: final-normed hidden states [B, hidden]."""
        B, W = block_tables.shape
        H, KVH, D = self.H, self.KVH, self.D
        ctx = W * self.block_size
        hidden, cos, sin = self.net.embed(input_ids, positions)            # [B, hidden], [B, 1, D] x2
        visible = torch.arange(ctx, device=positions.device) < context_lens[:, None]   # [B, ctx]
        # An additive mask (0 / -inf), built once for every layer: PyTorch's CPU attention
        # turns a boolean mask into this on each call (9 us of 29 at batch 1 here).
        mask = torch.where(visible, 0.0, float("-inf")).to(hidden.dtype)
        mask = mask[:, None, None, :]                                      # [B, 1, 1, ctx]
        blocks = block_tables.flatten()                                    # [B * W]
        chunk = rows_per_gather(B, W, self.block_bytes, self.gather_bytes)
        k_out, v_out = (self.buffers.take(self.cache_like, chunk * W) if self.buffers is not None
                        else (None, None))                                 # [chunk * W, block_size, KVH, D]
        for layer, k_cache, v_cache in self.layers:
            q, k, v = layer.pre_attention(hidden, cos, sin)                # [B, H|KVH|KVH, D]
            # Append this step's K/V, then gather each row's whole context (this row included).
            k_cache.view(-1, KVH, D).index_copy_(0, slots, k)
            v_cache.view(-1, KVH, D).index_copy_(0, slots, v)
            q = q.reshape(B, KVH, H // KVH, D)                             # [B, KVH, G, D]
            if chunk == B:
                out = self.attend(q, k_cache, v_cache, blocks, mask, k_out, v_out)
            else:                                                          # bounded gathers
                out = torch.cat([self.attend(q[r:r + chunk], k_cache, v_cache,
                                             blocks[r * W:(r + chunk) * W], mask[r:r + chunk],
                                             k_out, v_out)
                                 for r in range(0, B, chunk)])             # [B, KVH, G, D]
            hidden = layer.post_attention(hidden, out)                     # [B, hidden]
        return self.net.final_norm(hidden)                                 # [B, hidden]

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               blocks: torch.Tensor, mask: torch.Tensor, k_out, v_out) -> torch.Tensor:
        """Decode attention of b rows: q [b, KVH, G, D], blocks [b * W] (their block tables),
        mask [b, 1, 1, ctx]; gathers into k_out/v_out when given. -> [b, KVH, G, D]."""
        b, KVH, _, D = q.shape
        n = blocks.shape[0]
        k_out, v_out = (k_out[:n], v_out[:n]) if k_out is not None else (None, None)
        k_ctx = gather_blocks(k_cache, blocks, k_out).view(b, -1, KVH, D).transpose(1, 2)  # [b, KVH, ctx, D]
        v_ctx = gather_blocks(v_cache, blocks, v_out).view(b, -1, KVH, D).transpose(1, 2)  # [b, KVH, ctx, D]
        # The G query heads that share a KV head act as G query positions of one head.
        return F.scaled_dot_product_attention(q, k_ctx, v_ctx, attn_mask=mask, scale=self.scale)
