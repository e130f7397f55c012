"""The data the profiler measures and the predictor reads: plain tables, saved as JSON.

A `Profile` holds per-layer times (seconds) measured at a few points; the predictor
interpolates between them. The same class holds tables computed from an analytic hardware
model (the simulator), so the scheduler cannot tell measured from simulated costs.

Tables (x values ascending; times are per decoder layer unless said otherwise):

    linear            [tokens]                 -> QKV + O + MLP for a batch of that many tokens
    prefill_attn      [prompt tokens]          -> causal attention of one prompt chunk
    gpu_decode_attn   [n_seqs, total KV tokens] -> device decode attention (a 2-D grid)
    cpu_decode_attn   [n_seqs, total KV tokens] -> host decode attention (a 2-D grid)
    d2h, h2d          [bytes]                  -> one copy of whole KV blocks between the
                                                  tiers (a swap)
    rows_d2h,         [bytes]                  -> one layer's copies of host rows: q, k and v
    rows_h2d                                      down, the attention output up (measured only:
                                                  without them, d2h and h2d price these too)
    lm_head           [rows]                   -> final norm + LM head + sampling (whole model)
    overhead          scalar                   -> fixed per-iteration cost (scheduling, launch)
    decode_iteration  [n_seqs, total KV tokens] -> a whole decode-only, device-only iteration
                                                  (the runner's static decode step; measured
                                                  only, empty in analytic profiles)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .plan import Plan

PROFILE_VERSION = 5


@dataclass
class Profile:
    key: dict                          # model shape, dtype, device name, host CPU, threads
    num_layers: int
    linear: list[list[float]] = field(default_factory=list)           # [[tokens, s], ...]
    prefill_attn: list[list[float]] = field(default_factory=list)     # [[tokens, s], ...]
    gpu_decode_attn: list[list[float]] = field(default_factory=list)  # [[n_seqs, kv_tokens, s], ...]
    cpu_decode_attn: list[list[float]] = field(default_factory=list)  # [[n_seqs, kv_tokens, s], ...]
    d2h: list[list[float]] = field(default_factory=list)              # [[bytes, s], ...]
    h2d: list[list[float]] = field(default_factory=list)              # [[bytes, s], ...]
    lm_head: list[list[float]] = field(default_factory=list)          # [[rows, s], ...]
    overhead: float = 0.0
    bytes_per_token_row: int = 0       # q + k + v (down) or attention output (up) bytes of one row
    version: int = PROFILE_VERSION
    source: str = "measured"           # "measured" or "analytic:<hardware>"
    # Optional; 0 means "not measured" and the predictor leaves that cost out.
    kv_block_bytes: int = 0            # one KV block, all layers, k and v: what a swap copies
    host_job_s: float = 0.0            # per layer: hand host rows to the CPU worker and join
    decode_iteration: list[list[float]] = field(default_factory=list)  # [[n_seqs, kv_tokens, s], ...]
    rows_d2h: list[list[float]] = field(default_factory=list)         # [[bytes, s], ...]
    rows_h2d: list[list[float]] = field(default_factory=list)         # [[bytes, s], ...]

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> "Profile":
        data = json.loads(Path(path).read_text())
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile {str(path)!r} has version {data.get('version')}, expected "
                             f"{PROFILE_VERSION}; profile again")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"profile {str(path)!r} has fields this version does not know "
                             f"({', '.join(unknown)}); profile again")
        return cls(**data)


@dataclass(frozen=True)
class BatchShape:
    """What the predictor needs to know about one candidate iteration."""

    prefill_tokens: tuple[int, ...] = ()      # tokens fed per prefill chunk
    prefill_context: tuple[int, ...] = ()     # context length (cached + fed) per chunk
    n_gpu_decodes: int = 0
    gpu_decode_kv: int = 0                    # total KV tokens of device-resident decodes
    n_cpu_decodes: int = 0
    cpu_decode_kv: int = 0                    # total KV tokens of host-resident decodes
    n_host_prefill_tokens: int = 0            # prefill rows whose KV goes to the host tier
    host_prefill_prefix: int = 0              # cached tokens of those chunks, brought up per layer
    # Optional (0 = unknown): decode kernels read every row up to the longest context, and
    # swaps copy whole blocks.
    gpu_decode_max_kv: int = 0                # longest device-resident decode context
    cpu_decode_max_kv: int = 0                # longest host-resident decode context
    swap_out_blocks: int = 0                  # device -> host blocks copied before the forward
    swap_in_blocks: int = 0                   # host -> device blocks
    # Prefill chunks that complete their prompt (so make a token and a row of the LM head);
    # None: every chunk does. A chunk of a longer prompt only fills the KV cache.
    prefill_outputs: int | None = None
    # What the chunks are worth: each its share of its prompt (fed / prompt tokens), so a
    # prompt's chunks add up to its first token. None: one token per chunk.
    prefill_credit: float | None = None

    @property
    def num_tokens(self) -> int:
        return sum(self.prefill_tokens) + self.n_gpu_decodes + self.n_cpu_decodes

    @property
    def num_prefill_outputs(self) -> int:
        return len(self.prefill_tokens) if self.prefill_outputs is None else self.prefill_outputs

    @property
    def num_outputs(self) -> int:
        """Rows that produce a token (and a row of the LM head): every decode, and each prefill
        chunk that completes its prompt."""
        return self.num_prefill_outputs + self.n_gpu_decodes + self.n_cpu_decodes

    @property
    def num_prefill_credit(self) -> float:
        return len(self.prefill_tokens) if self.prefill_credit is None else self.prefill_credit

    @property
    def token_credit(self) -> float:
        """The tokens/s numerator the policies compare: every decode, and each prefill chunk's
        share of its prompt. Counting only completed prompts would never run a chunk of a long
        one for its own sake (it makes no token this iteration, however cheap); counting a
        token per chunk would run chunks that cost more than they bring."""
        return self.num_prefill_credit + self.n_gpu_decodes + self.n_cpu_decodes

    @classmethod
    def from_plan(cls, plan: Plan) -> "BatchShape":
        return cls(
            prefill_tokens=tuple(n for _, n in plan.prefills),
            prefill_context=tuple(s.num_computed + n for s, n in plan.prefills),
            n_gpu_decodes=len(plan.gpu_decodes),
            gpu_decode_kv=sum(s.num_computed + 1 for s in plan.gpu_decodes),
            n_cpu_decodes=len(plan.cpu_decodes),
            cpu_decode_kv=sum(s.num_computed + 1 for s in plan.cpu_decodes),
            n_host_prefill_tokens=sum(n for s, n in plan.prefills if s.tier == "cpu"),
            host_prefill_prefix=sum(s.num_computed for s, _ in plan.prefills if s.tier == "cpu"),
            gpu_decode_max_kv=max((s.num_computed + 1 for s in plan.gpu_decodes), default=0),
            cpu_decode_max_kv=max((s.num_computed + 1 for s in plan.cpu_decodes), default=0),
            swap_out_blocks=sum(len(w.src_blocks) for w in plan.swaps if w.dst_tier == "cpu"),
            swap_in_blocks=sum(len(w.src_blocks) for w in plan.swaps if w.dst_tier == "gpu"),
            prefill_outputs=sum(s.num_computed + n == s.num_tokens for s, n in plan.prefills),
            prefill_credit=sum(n / s.num_tokens for s, n in plan.prefills),
        )
