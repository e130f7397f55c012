"""Turn a Plan into the tensors of one forward pass.

Two builders:

- `build_batch`: the general flat, unpadded batch (prefill chunks, device decodes, host
  decodes), for the runner's layer loop. Row order: prefill chunks, then device-tier decodes,
  then host-tier decodes. Everything the forward needs is an explicit field; nothing is
  stashed in module globals.
- `build_decode_inputs`: a decode-only, device-only step for the static decode step
  (decode_step.py), padded to bucketed shapes.

Both keep per-step Python and host->device traffic small: every integer the device needs is
written into ONE int64 tensor, which crosses to the device in ONE copy and is then cut into
views. (Eight small `torch.tensor(...).to(device)` calls cost eight allocations and, on CUDA,
eight transfers, each a few microseconds of fixed cost.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cpu_attention import DecodeTables
from .kv_cache import slots_for
from .plan import Plan, bucket
from .sequence import CPU, GPU, Sequence

Rows = slice | torch.Tensor      # rows of the flat batch: a slice when they are contiguous


def take_rows(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    """t[rows]: a free view for a slice, one gather for an index tensor."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def num_rows(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.shape[0]


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
    host_tables: DecodeTables | None = None   # host tier: the kernels' layout (ModelRunner._build)


@dataclass
class Batch:
    input_ids: torch.Tensor      # [T]
    positions: torch.Tensor      # [T]
    prefills: list[PrefillChunk]
    gpu_decode: DecodeGroup | None
    cpu_decode: DecodeGroup | None
    dev_rows: Rows               # [Nd] rows whose KV goes to the device tier
    dev_slots: torch.Tensor      # [Nd] their slots there
    host_rows: Rows              # [Nh] rows whose KV goes to the host tier (device tensor)
    host_slots: torch.Tensor     # [Nh] their slots there (host tensor)
    logits_rows: Rows            # [N] rows that produce a next token
    num_real_rows: int = 0       # rows before bucket padding

    @property
    def num_host_rows(self) -> int:
        return num_rows(self.host_rows)

    @property
    def num_dev_rows(self) -> int:
        return num_rows(self.dev_rows)


class _Packer:
    """Collects the int lists bound for one device. `add` returns a handle; after `pack()` (one
    tensor, one transfer) `packer[handle]` is that list's view. Slices pass through."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.parts: list[list[int]] = []
        self.tensors: list[torch.Tensor] = []

    def add(self, values: list[int]) -> int:
        self.parts.append(values)
        return len(self.parts) - 1

    def rows(self, rows: list[int]) -> slice | int:
        """A slice when `rows` (increasing) is one contiguous range, else an index list. Without
        host-tier prefills, device rows are one range and host rows another."""
        if not rows:
            return slice(0, 0)
        if rows[-1] - rows[0] == len(rows) - 1:
            return slice(rows[0], rows[-1] + 1)
        return self.add(rows)

    def pack(self) -> None:
        flat = [v for part in self.parts for v in part]
        self.tensors = torch.split(_to(flat, self.device), [len(p) for p in self.parts])

    def __getitem__(self, handle: slice | int) -> Rows:
        return handle if isinstance(handle, slice) else self.tensors[handle]


def _to(values: list[int], device) -> torch.Tensor:
    """Host int64 tensor, staged through pinned memory and copied asynchronously to CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def _table_rows(seqs: list[Sequence], tables: dict[int, list[int]], width: int,
                pad_block: int) -> list[int]:
    """Block tables of `seqs`, each padded to `width` with `pad_block`, flattened row-major."""
    flat: list[int] = []
    for s in seqs:
        table = tables[s.seq_id]
        flat += table
        flat += [pad_block] * (width - len(table))
    return flat


def build_batch(plan: Plan, tables: dict[str, dict[int, list[int]]], block_size: int,
                device: torch.device, pad_decode_to: int = 0, pad_block: int = 0,
                bucket_blocks: bool = False) -> Batch:
    """`tables[tier][seq_id]` are the block tables. `pad_decode_to` pads a decode-only, device-only
    batch with dummy rows that read and write only block `pad_block`."""
    ids, pos, dev_rows, dev_slots, host_rows, host_slots, logits_rows = [], [], [], [], [], [], []
    on = {GPU: _Packer(device), CPU: _Packer("cpu")}       # ints bound for each tier's device
    prefills, priors, groups = [], [], {}
    row = 0
    for seq, n in plan.prefills:
        start, end = seq.num_computed, seq.num_computed + n
        table = tables[seq.tier][seq.seq_id]
        ids += seq.token_ids[start:end]
        pos += range(start, end)
        rows, slots = (dev_rows, dev_slots) if seq.tier == GPU else (host_rows, host_slots)
        rows += range(row, row + n)
        slots += slots_for(table, start, end, block_size)
        if start > 0:
            priors.append((len(prefills), on[seq.tier].add(slots_for(table, 0, start, block_size))))
        prefills.append(PrefillChunk(row, n, start, seq.tier, None))
        row += n
        if end == seq.num_tokens:
            logits_rows.append(row - 1)

    for tier, seqs, rows, slots in ((GPU, plan.gpu_decodes, dev_rows, dev_slots),
                                    (CPU, plan.cpu_decodes, host_rows, host_slots)):
        if not seqs:
            continue
        for s in seqs:
            ids.append(s.token_ids[-1])
            pos.append(s.num_computed)
            slots += slots_for(tables[tier][s.seq_id], s.num_computed, s.num_computed + 1, block_size)
        n = len(seqs)
        rows += range(row, row + n)
        logits_rows += range(row, row + n)
        pad = max(0, pad_decode_to - n) if tier == GPU else 0
        tier_pad_block = pad_block if tier == GPU else 0      # any valid block; masked anyway
        width = max(len(tables[tier][s.seq_id]) for s in seqs)
        width = bucket(width) if bucket_blocks else width
        flat_tables = _table_rows(seqs, tables[tier], width, tier_pad_block)
        flat_tables += [tier_pad_block] * (width * pad)
        lens = [s.num_computed + 1 for s in seqs] + [1] * pad
        groups[tier] = (slice(row, row + n + pad), width, on[tier].add(flat_tables),
                        on[tier].add(lens))
        row += n

    num_real = row
    n_pad = max(0, pad_decode_to - len(plan.gpu_decodes)) if pad_decode_to else 0
    if n_pad:   # dummy rows write their KV into the scratch block and are never sampled
        ids += [0] * n_pad
        pos += [0] * n_pad
        dev_rows += range(row, row + n_pad)
        dev_slots += [pad_block * block_size] * n_pad

    dev, host = on[GPU], on[CPU]
    handles = (dev.add(ids), dev.add(pos), dev.rows(dev_rows), dev.add(dev_slots),
               dev.rows(host_rows), dev.rows(logits_rows), host.add(host_slots))
    dev.pack()
    host.pack()
    for i, handle in priors:
        prefills[i].prior_slots = on[prefills[i].tier][handle]
    decode = {GPU: None, CPU: None}
    for tier, (rows, width, table_h, lens_h) in groups.items():
        decode[tier] = DecodeGroup(rows, on[tier][table_h].view(-1, width), on[tier][lens_h])
    ids_t, pos_t, dev_rows_t, dev_slots_t, host_rows_t, logits_t = (dev[h] for h in handles[:6])
    return Batch(input_ids=ids_t, positions=pos_t, prefills=prefills,
                 gpu_decode=decode[GPU], cpu_decode=decode[CPU],
                 dev_rows=dev_rows_t, dev_slots=dev_slots_t, host_rows=host_rows_t,
                 host_slots=host[handles[6]], logits_rows=logits_t, num_real_rows=num_real)


# ------------------------------------------------------------------ the decode-only fast path

@dataclass
class DecodeInputs:
    """One decode-only, device-only step, padded to `batch_size` rows and `width` block-table
    columns (both powers of two when bucketing). All its integers live in one int64 tensor:

        packed = [input_ids | positions | slots | context_lens | block_tables (row-major)]
                   B           B           B       B              B * width

    Padded rows feed token 0 at position 0, write their KV into the scratch block and attend
    only to it; their logits are never sampled."""

    packed: torch.Tensor         # [B * (4 + width)] on the host (pinned when CUDA is present)
    num_seqs: int                # real rows; rows past them are padding
    batch_size: int              # B
    width: int                   # blocks per block-table row
    kv_tokens: int = 0           # context tokens the real rows attend over (for GB/s figures)

    @property
    def key(self) -> tuple[int, int]:
        """The static shape: one captured CUDA graph per key."""
        return self.batch_size, self.width

    @staticmethod
    def views(packed: torch.Tensor, batch_size: int, width: int):
        """(input_ids [B], positions [B], slots [B], context_lens [B], block_tables [B, width])
        as views of `packed`, wherever it lives."""
        B = batch_size
        ids, positions, slots, context_lens = packed[:4 * B].view(4, B)
        return ids, positions, slots, context_lens, packed[4 * B:].view(B, width)


def build_decode_inputs(seqs: list[Sequence], tables: dict[int, list[int]], block_size: int,
                        pad_block: int, bucketed: bool, pin: bool) -> DecodeInputs:
    """Pack the device tier's decodes `seqs`; pad rows and block-table width to powers of two
    when `bucketed`."""
    n = len(seqs)
    B = bucket(n) if bucketed else n
    width = max(len(tables[s.seq_id]) for s in seqs)
    width = bucket(width) if bucketed else width
    pad = B - n
    pos = [s.num_computed for s in seqs]                 # the new token's position
    flat = [s.token_ids[-1] for s in seqs] + [0] * pad
    flat += pos + [0] * pad
    flat += [tables[s.seq_id][p // block_size] * block_size + p % block_size
             for s, p in zip(seqs, pos)] + [pad_block * block_size] * pad
    flat += [p + 1 for p in pos] + [1] * pad
    flat += _table_rows(seqs, tables, width, pad_block)
    flat += [pad_block] * (width * pad)
    packed = torch.tensor(flat, dtype=torch.long, pin_memory=pin)
    return DecodeInputs(packed, n, B, width, kv_tokens=sum(pos) + n)


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
