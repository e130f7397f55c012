"""Turn a Plan into the tensors of one flat, unpadded forward pass.

Row order: prefill chunks, then device-tier decodes, then host-tier decodes. Everything the
forward needs is an explicit field here; nothing is stashed in module globals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_cache import slots_for
from .plan import Plan
from .sequence import CPU, GPU, Sequence


def bucket(n: int) -> int:
    """Smallest power of two >= n: decode shapes come from a short list, so static buffers and
    captured graphs can be reused."""
    return 1 << max(0, n - 1).bit_length()


@dataclass
class PrefillChunk:
    start: int                   # first row in the flat batch
    length: int                  # rows (tokens fed this step)
    ctx_start: int               # tokens already cached before this chunk
    tier: str
    prior_slots: torch.Tensor | None   # slots of the cached prefix, on the tier's device


@dataclass
class DecodeGroup:
    rows: slice                  # rows of the flat batch
    block_tables: torch.Tensor   # [B, max_blocks] on the tier's device
    context_lens: torch.Tensor   # [B], counting this step's token


@dataclass
class Batch:
    input_ids: torch.Tensor      # [T]
    positions: torch.Tensor      # [T]
    prefills: list[PrefillChunk]
    gpu_decode: DecodeGroup | None
    cpu_decode: DecodeGroup | None
    dev_rows: torch.Tensor       # [Nd] rows whose KV goes to the device tier
    dev_slots: torch.Tensor      # [Nd] their slots there
    host_rows: torch.Tensor      # [Nh] rows whose KV goes to the host tier (device tensor)
    host_slots: torch.Tensor     # [Nh] their slots there (host tensor)
    logits_rows: torch.Tensor    # [N] rows that produce a next token
    num_real_rows: int = 0       # rows before bucket padding
    meta: dict = field(default_factory=dict)

    @property
    def num_host_rows(self) -> int:
        return self.host_rows.shape[0]


def _decode_group(seqs: list[Sequence], first_row: int, tables: dict[int, list[int]],
                  device, pad_to: int = 0, pad_block: int = 0, bucket_blocks: bool = False):
    width = max(len(tables[s.seq_id]) for s in seqs)
    width = bucket(width) if bucket_blocks else width
    rows = [tables[s.seq_id] + [pad_block] * (width - len(tables[s.seq_id])) for s in seqs]
    lens = [s.num_computed + 1 for s in seqs]
    rows += [[pad_block] * width] * (pad_to - len(seqs))
    lens += [1] * (pad_to - len(seqs))
    return DecodeGroup(slice(first_row, first_row + max(len(seqs), pad_to)),
                       _to(rows, device), _to(lens, device))


def _to(values, device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.long)
    if t.device != torch.device(device):
        t = t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)
    return t


def build_batch(plan: Plan, tables: dict[str, dict[int, list[int]]], block_size: int,
                device: torch.device, pad_decode_to: int = 0, pad_block: int = 0,
                bucket_blocks: bool = False) -> Batch:
    """`tables[tier][seq_id]` are the block tables. `pad_decode_to` pads a decode-only, device-only
    batch with dummy rows that read and write only block `pad_block`."""
    ids, pos, dev_rows, dev_slots, host_rows, host_slots, logits_rows = [], [], [], [], [], [], []
    prefills = []
    row = 0
    for seq, n in plan.prefills:
        start, end = seq.num_computed, seq.num_computed + n
        table = tables[seq.tier][seq.seq_id]
        ids += seq.token_ids[start:end]
        pos += range(start, end)
        rows, slots = (dev_rows, dev_slots) if seq.tier == GPU else (host_rows, host_slots)
        rows += range(row, row + n)
        slots += slots_for(table, start, end, block_size)
        prior = None
        if start > 0:
            prior_device = device if seq.tier == GPU else "cpu"
            prior = _to(slots_for(table, 0, start, block_size), prior_device)
        prefills.append(PrefillChunk(row, n, start, seq.tier, prior))
        row += n
        if end == seq.num_tokens:
            logits_rows.append(row - 1)

    groups = {}
    for tier, seqs, rows, slots in ((GPU, plan.gpu_decodes, dev_rows, dev_slots),
                                    (CPU, plan.cpu_decodes, host_rows, host_slots)):
        if not seqs:
            groups[tier] = None
            continue
        for s in seqs:
            ids.append(s.token_ids[-1])
            pos.append(s.num_computed)
            slots += slots_for(tables[tier][s.seq_id], s.num_computed, s.num_computed + 1, block_size)
        rows += range(row, row + len(seqs))
        logits_rows += range(row, row + len(seqs))
        pad = pad_decode_to if tier == GPU else 0
        tier_device = device if tier == GPU else "cpu"
        tier_pad_block = pad_block if tier == GPU else 0      # any valid block; masked anyway
        groups[tier] = _decode_group(seqs, row, tables[tier], tier_device, pad, tier_pad_block,
                                     bucket_blocks)
        row += len(seqs)

    num_real = row
    n_pad = max(0, pad_decode_to - len(plan.gpu_decodes)) if pad_decode_to else 0
    if n_pad:   # dummy rows write their KV into the scratch block and are never sampled
        ids += [0] * n_pad
        pos += [0] * n_pad
        dev_rows += range(row, row + n_pad)
        dev_slots += [pad_block * block_size] * n_pad
    return Batch(
        input_ids=_to(ids, device), positions=_to(pos, device), prefills=prefills,
        gpu_decode=groups[GPU], cpu_decode=groups[CPU],
        dev_rows=_to(dev_rows, device), dev_slots=_to(dev_slots, device),
        host_rows=_to(host_rows, device), host_slots=_to(host_slots, "cpu"),
        logits_rows=_to(logits_rows, device),
        num_real_rows=num_real,
    )


def sampling_tensors(plan: Plan, device) -> dict[str, torch.Tensor] | None:
    """Per-row sampling settings of the requests that get a token; None when all are greedy."""
    seqs = [s for s, n in plan.scheduled if s.num_computed + n == s.num_tokens]
    if all(s.params.temperature == 0 for s in seqs):
        return None
    return {
        "temperature": torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=device),
        "top_k": _to([s.params.top_k for s in seqs], device),
        "top_p": torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=device),
        "seeds": _to([s.seed for s in seqs], device),
        "steps": _to([s.num_output for s in seqs], device),
    }
