"""A request's state as the scheduler sees it: plain Python, no tensors."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"      # queued, or preempted and waiting to be recomputed
    RUNNING = "running"      # holds KV blocks in exactly one tier
    FINISHED = "finished"


GPU, CPU = "gpu", "cpu"      # the two KV tiers


def peak_kv_tokens(prompt_len: int, max_tokens: int, max_model_len: int | None = None) -> int:
    """KV slots a request fills at its peak: its prompt and every output but the last (that one
    is sampled, never fed back), and one under the context at most (the request stops there)."""
    total = prompt_len + max_tokens
    if max_model_len is not None:
        total = min(total, max_model_len)
    return max(prompt_len, total - 1)


@dataclass(eq=False)
class Sequence:
    """One request. `token_ids` is prompt + output; `num_computed` of them have KV in the cache.

    The next forward feeds `token_ids[num_computed:num_computed + n]`; when that reaches the end
    of `token_ids`, the last row's logits give the next token.
    """

    seq_id: int
    token_ids: list[int]
    params: SamplingParams
    seed: int
    arrival_time: float = field(default_factory=time.perf_counter)
    prompt_len: int = 0
    status: Status = Status.WAITING
    tier: str | None = None
    num_computed: int = 0
    finish_reason: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_swaps: int = 0
    # Evicted from a full device to the host tier, where its KV waits for room on the device
    # without decoding (copying it out and back costs less than recomputing it).
    parked: bool = False

    def __post_init__(self) -> None:
        self.prompt_len = self.prompt_len or len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def is_decoding(self) -> bool:
        """All but the newest token are cached: the next step feeds one token."""
        return self.num_computed == self.num_tokens - 1

    @property
    def remaining_prefill(self) -> int:
        return self.num_tokens - self.num_computed
