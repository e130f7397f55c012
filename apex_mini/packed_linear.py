"""The decode step's linear layers, and the copies of their weights laid out for the CPU.

`F.linear` on the CPU calls the BLAS torch was built with (MKL in the x86 wheels) on the weight
in its plain [out, in] layout, read transposed, on every call. A decode step is a chain of small
products (batch rows x a few hundred columns) where how the weight is laid out is much of the
cost. Two copies do better, one for each way the step runs (`choose_layout`):

- ONEDNN, for the eager step: oneDNN reorders a weight once into the blocked layout its matrix
  kernels read best ("prepacking"). On the 2-core AMD EPYC machine of docs/benchmarks.md, one
  decode step's projections of the shipped model, stacked and prepacked against one `F.linear`
  per layer, side by side: 2.0x faster at 1 row, 1.7x at 16 rows, 2.0x at 64 (notebook 08).
- TRANSPOSED, for the compiled step: a packed oneDNN weight is an opaque tensor that
  torch.compile cannot trace, but a plain [in, out] copy is an ordinary tensor, and Inductor
  calls the same BLAS `mm` on it, reading it untransposed. The 17 products of a batch-1
  step of the shipped model, one after another: 0.6 ms this way (as fast as prepacked), 1.3 to
  1.7 ms through `F.linear` (scratch timings, 2026-12-03).
- PLAIN: `F.linear` on the module's own weight, no copy: on CUDA (cuBLAS reads the transposed
  weight itself), and on the CPU whenever the copy is turned off or would not fit.

Layers that read the same input (q/k/v, gate/up) are stacked into one copy: the copy is new
memory anyway, so one larger product costs nothing more than three small ones.

Trade-offs, all of them why the copy is an option (`prepack_weights`, on by default):
- it takes as much memory again as the weights, twice that for a compiled CPU step with its
  eager twin (decode_step.py; skipped, with a warning, when it would not fit in half of the
  available memory), and it is a snapshot: weights changed in place after the engine is built
  are not seen by the decode step;
- results equal `F.linear`'s up to fp32 rounding (another summation order, ~1e-6 relative),
  not bit for bit;
- oneDNN packs fp32 on any x86 CPU, but bf16 and fp16 only where the CPU has their
  instructions; elsewhere the eager step quietly keeps PLAIN (`supports`).
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


PLAIN, ONEDNN, TRANSPOSED = "plain", "onednn", "transposed"


def choose_layout(requested: bool, compiled: bool, device: torch.device, dtype: torch.dtype,
                  weight_bytes: int) -> str:
    """The decode step's weight layout: on the CPU when a copy is `requested`, TRANSPOSED for a
    `compiled` step and ONEDNN for an eager one where oneDNN supports `dtype`; else, or when the
    copy would not fit in half of the available memory (warns), PLAIN."""
    if not (requested and device.type == "cpu"):
        return PLAIN
    layout = TRANSPOSED if compiled else ONEDNN
    if layout == ONEDNN and not supports(dtype):
        return PLAIN
    free = available_memory_bytes()
    if free is not None and weight_bytes > free // 2:
        what = "oneDNN-packed" if layout == ONEDNN else "transposed"
        warnings.warn(f"prepack_weights: a {what} copy of {weight_bytes / 2**30:.1f} GiB of "
                      f"weights would not fit in half of the {free / 2**30:.1f} GiB free; the "
                      "decode step uses the weights as they are", RuntimeWarning, stacklevel=3)
        return PLAIN
    return layout


class StackedLinear:
    """The outputs of linear layers that read the same input, side by side in one tensor:
    `y = x @ [W_1; ...; W_n]^T + [b_1; ...; b_n]`, [rows, sum of out_features]. The decode step
    uses it for q/k/v and gate/up (one layer alone: o_proj, down_proj, lm_head).

    `layout` (see the module docstring): ONEDNN, the weights stacked into one packed matrix;
    TRANSPOSED, stacked into one [in, sum(out)] matrix; both one product. PLAIN: one `F.linear`
    per layer on the module's own weight (no copy), then a concatenation.
    """

    def __init__(self, modules: list[torch.nn.Linear], layout: str):
        if layout not in (PLAIN, ONEDNN, TRANSPOSED):
            raise ValueError(f"layout {layout!r} is not one of {PLAIN!r}, {ONEDNN!r}, {TRANSPOSED!r}")
        self.layout = layout
        self.plain: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.weight = self.bias = None
        if layout == PLAIN:
            self.plain = [(m.weight, m.bias) for m in modules]
            return
        weight = torch.cat([m.weight.detach() for m in modules])              # [sum(out), in]
        if layout == ONEDNN:
            # Rows the layout is tuned for; any number of rows works.
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        else:
            self.weight = weight.t().contiguous()                             # [in, sum(out)]
        if any(m.bias is not None for m in modules):
            self.bias = torch.cat([m.bias.detach() if m.bias is not None
                                   else m.weight.new_zeros(m.out_features) for m in modules])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == ONEDNN:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias,
                                                      "none", [], "")        # [rows, sum(out)]
        if self.layout == TRANSPOSED:
            y = x @ self.weight                                                # [rows, sum(out)]
            return y if self.bias is None else y + self.bias
        if len(self.plain) == 1:
            return F.linear(x, *self.plain[0])
        return torch.cat([F.linear(x, w, b) for w, b in self.plain], dim=-1)
