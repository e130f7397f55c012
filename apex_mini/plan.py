"""What the scheduler decides for one iteration, and what the engine executes."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sequence import Sequence


def bucket(n: int) -> int:
    """Smallest power of two >= n: decode batches and block-table widths are padded to these,
    so static buffers and captured graphs are reused (and the predictor prices the padding)."""
    return 1 << max(0, n - 1).bit_length()


class Strategy(str, enum.Enum):
    GPU_ONLY = "gpu-only"    # every scheduled request's KV is on the device
    OVERLAP = "overlap"      # one merged batch; host attention overlaps device attention
    PIPELINE = "pipeline"    # two sub-batches one layer apart (asymmetric pipelining)


@dataclass
class Swap:
    seq: Sequence
    src_tier: str
    dst_tier: str
    src_blocks: list[int]
    dst_blocks: list[int]


@dataclass
class Plan:
    """One iteration. Rows of the flat batch come in this order: prefills, device decodes,
    host decodes. Swaps run before the forward; preempted requests went back to the queue."""

    prefills: list[tuple[Sequence, int]] = field(default_factory=list)   # (request, tokens fed)
    gpu_decodes: list[Sequence] = field(default_factory=list)
    cpu_decodes: list[Sequence] = field(default_factory=list)
    swaps: list[Swap] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    strategy: Strategy = Strategy.GPU_ONLY
    predicted_s: float | None = None     # the predictor's iteration time, when one was asked
    reason: str = ""                     # why this strategy, for logs and notebooks

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefills)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + len(self.gpu_decodes) + len(self.cpu_decodes)

    @property
    def is_empty(self) -> bool:
        return self.num_tokens == 0

    @property
    def scheduled(self) -> list[tuple[Sequence, int]]:
        """(request, tokens fed) in row order."""
        return (self.prefills + [(s, 1) for s in self.gpu_decodes]
                + [(s, 1) for s in self.cpu_decodes])

    @property
    def uses_host(self) -> bool:
        return bool(self.cpu_decodes) or any(s.tier == "cpu" for s, _ in self.prefills)

    def summary(self) -> str:
        return (f"{self.strategy.value}: {len(self.prefills)} prefill ({self.num_prefill_tokens} tok), "
                f"{len(self.gpu_decodes)} gpu decode, {len(self.cpu_decodes)} cpu decode, "
                f"{len(self.swaps)} swap, {len(self.preempted)} preempt")
