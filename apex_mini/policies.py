"""Scheduling policies: where a new request's KV goes, whether host-resident requests come back
to the device, and which execution strategy an iteration uses.

A policy answers four questions for the `Scheduler`; it never touches tensors:

    uses_host                      may requests live in the host tier at all?
    offload(seq, sched)            may this request's KV go to the host tier now (when it is
                                   admitted, or evicted from a full device), to decode there?
                                   Else it waits, or is parked or preempted
    park(seq, sched)               asked when an evicted request is not offloaded: keep its KV
                                   on the host, waiting for the device without decoding,
                                   instead of preempting it (recomputing it later)?
    place(seq, sched) -> tier      where a newly admitted request's KV goes (None: wait)
    wants_swap_in(seq, sched)      should this host-resident request move to the device?
    choose(plan, sched)            pick plan.strategy; may drop host decodes from this iteration
"""
from __future__ import annotations

from .plan import Plan, Strategy
from .sequence import CPU, GPU, Sequence


class GpuOnlyPolicy:
    """The vLLM-style baseline: every request's KV on the device; when it is full, wait or
    preempt."""

    name = "gpu-only"
    uses_host = False

    def offload(self, seq: Sequence, sched) -> bool:
        return False

    def park(self, seq: Sequence, sched) -> bool:
        return False

    def place(self, seq: Sequence, sched) -> str | None:
        return GPU if sched.fits(seq, GPU) else None

    def wants_swap_in(self, seq: Sequence, sched) -> bool:
        return True

    def choose(self, plan: Plan, sched) -> None:
        plan.strategy, plan.reason = Strategy.GPU_ONLY, "policy"


class StaticPolicy:
    """The llama.cpp-like baseline: a fixed share `cpu_fraction` of running requests keeps its
    KV in host memory and decodes on the CPU, with no prediction. A request that does not fit
    on the device goes to the host instead of waiting."""

    name = "static"
    uses_host = True

    def __init__(self, cpu_fraction: float):
        self.cpu_fraction = cpu_fraction

    def offload(self, seq: Sequence, sched) -> bool:
        return True

    def park(self, seq: Sequence, sched) -> bool:
        return False                                 # never asked: every request is offloaded

    def place(self, seq: Sequence, sched) -> str | None:
        n_host = len(sched.tier_seqs(CPU))
        n_all = len(sched.running) + 1
        # Round so that f = 0.5 alternates device, host, device, host...
        want_host = n_host + 1 <= self.cpu_fraction * n_all + 1e-9
        order = (CPU, GPU) if want_host else (GPU, CPU)
        return next((tier for tier in order if sched.fits(seq, tier)), None)

    def wants_swap_in(self, seq: Sequence, sched) -> bool:
        return False                                 # the split is fixed

    def choose(self, plan: Plan, sched) -> None:
        if plan.uses_host:
            plan.strategy, plan.reason = Strategy.OVERLAP, f"static {self.cpu_fraction:g}"
        else:
            plan.strategy, plan.reason = Strategy.GPU_ONLY, "no host work"


def make_policy(name: str, cfg, predictor=None):
    """Build the policy named by EngineConfig.policy ('auto' resolved by the caller)."""
    if name == "gpu-only":
        return GpuOnlyPolicy()
    if name == "static":
        return StaticPolicy(cfg.cpu_fraction)
    if name in ("neo", "apex"):
        from .predictive_policies import make_predictive_policy
        return make_predictive_policy(name, cfg, predictor)
    raise ValueError(f"unknown policy {name!r}; choose gpu-only, static, neo or apex")
