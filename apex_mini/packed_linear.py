"""The decode step's linear layers, and their prepacked form for the CPU.

`F.linear` on the CPU calls the BLAS torch was built with (MKL in the x86 wheels), which reads
the weight in its plain [out, in] layout on every call. oneDNN can instead reorder a weight once
into the blocked layout its matrix kernels read best ("prepacking"). A decode step is a chain
of small products (batch rows x a few hundred columns) where that per-call work is much of the
cost. On the 2-core AMD EPYC machine of docs/benchmarks.md, one decode step's projections of
the shipped model, stacked and prepacked (below) against one `F.linear` per layer, measured
side by side: 2.0x faster at 1 row, 1.7x at 16 rows, 2.0x at 64 (notebook 08).

Layers that read the same input (q/k/v, gate/up) are stacked into one packed matrix: the packed
copy is new memory anyway, so one larger product costs nothing more than three small ones.

Trade-offs, all of them why this is an option (`prepack_weights`, on by default):
- the packed copy takes as much memory again as the weights (skipped, with a warning, when it
  would not fit in half of the available memory), and it is a snapshot: weights changed in
  place after the engine is built are not seen by the decode step;
- results equal `F.linear`'s up to fp32 rounding (another summation order, ~1e-6 relative),
  not bit for bit;
- oneDNN packs fp32 on any x86 CPU, but bf16 and fp16 only where the CPU has their
  instructions; elsewhere the step quietly keeps `F.linear` (`supports`);
- packed weights are opaque oneDNN tensors that torch.compile cannot trace, so only the eager
  step uses them (`DecodeStep(compile=True)` keeps `F.linear` and lets Inductor choose).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F


def available() -> bool:
    """True when this torch build has oneDNN (mkldnn) and its linear ops."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@functools.lru_cache(maxsize=None)
def supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and multiplies `dtype` on this CPU: fp32 anywhere; bf16 and fp16
    only where the CPU has their instructions (oneDNN refuses fp16 without AVX512-FP16 or
    AVX-NE-CONVERT, for one). Found by trying it once on a tiny matrix."""
    if not available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype), 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8, dtype=dtype), w, None, "none", [], "")
        return True
    except RuntimeError:
        return False


def available_memory_bytes() -> int | None:
    """Memory the OS could give this process now (Linux's MemAvailable, which counts reclaimable
    page cache, e.g. a checkpoint just read), else free pages, else None where it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024                        # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def should_prepack(requested: bool, device: torch.device, dtype: torch.dtype,
                   weight_bytes: int) -> bool:
    """Prepack when asked, on the CPU, where oneDNN supports `dtype`, and with room for the copy
    (warns when there is none)."""
    if not (requested and device.type == "cpu" and supports(dtype)):
        return False
    free = available_memory_bytes()
    if free is not None and weight_bytes > free // 2:
        warnings.warn(f"prepack_weights: a packed copy of {weight_bytes / 2**30:.1f} GiB of "
                      f"weights would not fit in half of the {free / 2**30:.1f} GiB free; the "
                      "decode step uses the weights as they are", RuntimeWarning, stacklevel=3)
        return False
    return True


class StackedLinear:
    """The outputs of linear layers that read the same input, side by side in one tensor:
    `y = x @ [W_1; ...; W_n]^T + [b_1; ...; b_n]`, [rows, sum of out_features]. The decode step
    uses it for q/k/v and gate/up (one layer alone: o_proj, down_proj, lm_head).

    Prepacked: the weights stacked into one oneDNN-packed matrix, one product. Plain: one
    `F.linear` per layer on the module's own weight (no copy), then a concatenation.
    """

    def __init__(self, modules: list[torch.nn.Linear], prepack: bool):
        self.plain: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.packed_weight = self.packed_bias = None
        if not prepack:
            self.plain = [(m.weight, m.bias) for m in modules]
            return
        weight = torch.cat([m.weight.detach() for m in modules])              # [sum(out), in]
        # Rows the layout is tuned for; any number of rows works.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        if any(m.bias is not None for m in modules):
            self.packed_bias = torch.cat([m.bias.detach() if m.bias is not None
                                          else m.weight.new_zeros(m.out_features)
                                          for m in modules])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.packed_bias,
                                                      "none", [], "")        # [rows, sum(out)]
        if len(self.plain) == 1:
            return F.linear(x, *self.plain[0])
        return torch.cat([F.linear(x, w, b) for w, b in self.plain], dim=-1)
