"""The predictive policies: `apex` and the NEO-style baseline `neo`.

Both keep a request's KV on the device when it fits. When it does not, `neo` puts it on the host
(as NEO does), and `apex` does so only when host decoding is predicted to pay within its latency
bound (`offload`; else a new request waits, as under GPU-only). A running request evicted from a
full device that `apex` does not offload is parked on the host when copying its KV out and back
is predicted to cost less than recomputing it (`park`), else preempted. Both bring host
requests back when the device has room (the scheduler checks the room). Each iteration they
ask the injected predictor about candidate plans and keep the one with the most predicted
output tokens per second (`BatchShape.token_credit / iteration_time`: a prefill chunk counts
as its share of its prompt's first token):

    apex   GPU-only (host work deferred), asynchronous overlap with the k oldest host decodes,
           or asymmetric pipelining with them; a candidate may not be slower per token than
           the GPU-only plan by more than `latency_margin`.
    neo    GPU-only or asymmetric pipelining (NEO's load-aware rule): the host batch grows
           while the CPU's attention still hides behind the device's work, because past that
           point predicted throughput falls; no latency bound.

Invariant (fresh policy): the chosen plan's predicted throughput is never below the GPU-only
plan's. The one exception is the starvation guard: a host request deferred `PATIENCE`
iterations in a row runs in the next one whatever the prediction, so no request waits forever.
Every chosen plan carries `predicted_s` and a `reason`.
"""
from __future__ import annotations

import dataclasses

from .cost_tables import BatchShape
from .plan import Plan, Strategy
from .predictor import pipelines
from .sequence import CPU, GPU, Sequence

PATIENCE = 8            # iterations a host request may be deferred before it must run
RECHECK = 8             # asks a "host does not pay" verdict stands while nothing else changes
MAX_CANDIDATES = 24     # host-batch sizes tried per strategy (all of them when fewer)


def candidate_sizes(n: int) -> list[int]:
    """Host-batch sizes to try: 1..n when n is small, else every size up to MAX_CANDIDATES / 2
    and then a geometric ladder to n (the best one's neighbourhood is searched afterwards)."""
    if n <= MAX_CANDIDATES:
        return list(range(1, n + 1))
    dense = MAX_CANDIDATES // 2
    ratio = (n / dense) ** (1 / (MAX_CANDIDATES - dense))
    ladder = {round(dense * ratio ** i) for i in range(1, MAX_CANDIDATES - dense + 1)}
    return sorted(set(range(1, dense + 1)) | {min(n, k) for k in ladder} | {n})


class PredictivePolicy:
    name = "predictive"
    uses_host = True
    strategies: tuple[Strategy, ...] = ()
    latency_bound = False

    def __init__(self, cfg, predictor):
        if predictor is None:
            raise ValueError(f"policy {self.name!r} needs a predictor (a profile of this machine)")
        self.predictor = predictor
        self.margin = cfg.latency_margin
        self.deferred: dict[int, int] = {}      # seq_id -> iterations deferred in a row
        # seq_id -> (running requests when asked, asks the "no" still stands)
        self.declined: dict[int, tuple[tuple, int]] = {}

    # ---------------------------------------------------------------- placement

    def place(self, seq: Sequence, sched) -> str | None:
        # One spare device block, so the running decodes' next step rarely forces a swap-out.
        # None when no request runs there: a request that needs every device block (and does
        # not fit the host) must still get in once the device is empty.
        # A parked request waits for the device ahead of new ones (first come, first served), as
        # a preempted one would wait at the head of the queue.
        parked = any(s.parked for s in sched.tier_seqs(CPU))
        if not parked and sched.fits(seq, GPU, reserve=1 if sched.tier_seqs(GPU) else 0):
            return GPU
        if sched.fits(seq, CPU) and self.offload(seq, sched):
            return CPU
        return None

    def offload(self, seq: Sequence, sched) -> bool:
        """Host placement must pay: decoding `seq` on the host beside every request already
        there, with the device's running requests, must be predicted to beat the GPU-only plan
        of the device's requests (within the latency bound, for apex). Otherwise the request
        would only sit on the host, deferred, until the starvation guard forced it through; it
        waits for the device instead (a new request), or is parked or preempted (an evicted one).

        While the device is full the queue's head, and the oldest parked request, are asked
        about every iteration. A "no" stands for the next `RECHECK` asks about the same request
        with the same running requests in the same tiers (their contexts grow by a token an
        iteration, which moves the prediction little): the search costs a few predictor calls,
        as much as the rest of `schedule()`."""
        running = tuple((s.seq_id, s.tier, s.parked) for s in sched.running)
        last = self.declined.get(seq.seq_id)
        if last is not None and last[0] == running and last[1] > 0:
            self.declined[seq.seq_id] = (running, last[1] - 1)
            return False
        pays = self._host_pays(seq, sched)
        if pays:
            self.declined.pop(seq.seq_id, None)
        else:
            if len(self.declined) > 4 * len(running) + 64:     # forget requests long gone
                alive = {s.seq_id for s in sched.running} | {s.seq_id for s in sched.waiting}
                self.declined = {i: v for i, v in self.declined.items() if i in alive}
            self.declined[seq.seq_id] = (running, RECHECK)
        return pays

    def _host_pays(self, seq: Sequence, sched) -> bool:
        dev = [s for s in sched.running if s.tier == GPU and s is not seq]
        host = [s for s in sched.running if s.tier == CPU and not s.parked and s is not seq]
        host.append(seq)
        base = BatchShape(n_gpu_decodes=len(dev), gpu_decode_kv=sum(s.num_tokens for s in dev),
                          gpu_decode_max_kv=max((s.num_tokens for s in dev), default=0))
        if not dev:
            return True                              # the host is the only place to run it
        t_gpu = self.predictor.iteration_time(base, Strategy.GPU_ONLY)
        search = _Search(self, base, [], host, t_gpu, starving=False, context=lambda s: s.num_tokens)
        search.best = (base.token_credit / t_gpu, Strategy.GPU_ONLY, 0, t_gpu)
        search.run([len(host)])
        return search.best[1] is not Strategy.GPU_ONLY

    def park(self, seq: Sequence, sched) -> bool:
        """Park an evicted request (its KV copied to the host, and back when the device has
        room) rather than preempt it, when the two copies are predicted to cost less than
        recomputing what preemption drops: its `num_computed` cached tokens, prefilled again
        in chunks of the token budget (the rest of a prompt is prefilled either way). Each
        chunk is priced as a prefill-only iteration less one of a single token, the part any
        iteration pays anyway (weights, overhead), so both sides of the difference take the
        same execution path. Nothing cached, nothing to save: preempted."""
        blocks = sched.blocks[GPU].blocks_needed(seq.num_computed)
        t = self.predictor.iteration_time
        copies = (t(BatchShape(swap_out_blocks=blocks), Strategy.GPU_ONLY)
                  + t(BatchShape(swap_in_blocks=blocks), Strategy.GPU_ONLY))
        t_one = t(BatchShape(prefill_tokens=(1,), prefill_context=(1,)), Strategy.GPU_ONLY)
        chunk = max(1, sched.max_num_batched_tokens)
        recompute, done = 0.0, 0
        while done < seq.num_computed and recompute <= copies:      # stop once it is decided
            fed = min(chunk, seq.num_computed - done)
            done += fed
            shape = BatchShape(prefill_tokens=(fed,), prefill_context=(done,))
            recompute += max(0.0, t(shape, Strategy.GPU_ONLY) - t_one)
        return copies < recompute

    def wants_swap_in(self, seq: Sequence, sched) -> bool:
        return True

    # ---------------------------------------------------------------- the choice

    def choose(self, plan: Plan, sched) -> None:
        host_prefills = [(s, n) for s, n in plan.prefills if s.tier == CPU]
        host_seqs = [s for s, _ in host_prefills] + plan.cpu_decodes
        if not host_seqs:                             # the common case: nothing to decide
            self.deferred.clear()
            t_gpu = self.predictor.iteration_time(BatchShape.from_plan(plan), Strategy.GPU_ONLY)
            plan.strategy, plan.predicted_s = Strategy.GPU_ONLY, t_gpu
            plan.reason = f"{self.name}: no host work"
            return
        alive = {s.seq_id for s in host_seqs}
        self.deferred = {i: c for i, c in self.deferred.items() if i in alive}
        dev_plan = Plan(prefills=[(s, n) for s, n in plan.prefills if s.tier == GPU],
                        gpu_decodes=plan.gpu_decodes, swaps=plan.swaps)
        base = BatchShape.from_plan(dev_plan)
        t_gpu = self.predictor.iteration_time(base, Strategy.GPU_ONLY)
        # Longest-deferred first, then oldest: the order in which host decodes get a seat.
        decodes = sorted(plan.cpu_decodes, key=lambda s: -self.deferred.get(s.seq_id, 0))
        starving = [s for s in host_seqs if self.deferred.get(s.seq_id, 0) >= PATIENCE]
        must_k = max((i + 1 for i, s in enumerate(decodes) if s in starving), default=0)
        gpu_thr = base.token_credit / t_gpu if base.token_credit and t_gpu > 0 else 0.0
        search = _Search(self, base, host_prefills, decodes, t_gpu, bool(starving))
        if not starving and base.num_tokens:          # else a host plan must run
            search.best = (gpu_thr, Strategy.GPU_ONLY, 0, t_gpu)
        sizes = [k for k in candidate_sizes(len(decodes)) if k >= must_k]
        search.run(([0] if host_prefills and not must_k else []) + sizes)
        search.refine(sizes)
        thr, strategy, k, t = search.best
        if strategy is Strategy.GPU_ONLY:
            why = (f"host work does not pay: GPU-only {gpu_thr:.0f} tok/s" if not search.over_bound
                   else f"latency bound: {search.over_bound} host plan(s) with more tok/s take "
                        f"over {search.bound * 1e3:.2f} ms")
            self._apply(plan, [], [], Strategy.GPU_ONLY, t_gpu,
                        f"{why}; {len(host_seqs)} host request(s) deferred")
            for s in host_seqs:
                self.deferred[s.seq_id] = self.deferred.get(s.seq_id, 0) + 1
            return
        chosen = decodes[:k]
        why = "starvation guard" if starving else f"{thr:.0f} tok/s vs GPU-only {gpu_thr:.0f} tok/s"
        what = f"{k}/{len(decodes)} host decode(s)" + (
            f" + {len(host_prefills)} host prefill(s)" if host_prefills else "")
        self._apply(plan, host_prefills, chosen, strategy, t, f"{what}: {why}")
        ran = {s.seq_id for s in chosen} | {s.seq_id for s, _ in host_prefills}
        for s in host_seqs:
            self.deferred[s.seq_id] = 0 if s.seq_id in ran else self.deferred.get(s.seq_id, 0) + 1

    def _apply(self, plan: Plan, host_prefills, host_decodes, strategy, predicted_s, why) -> None:
        plan.prefills = [(s, n) for s, n in plan.prefills
                         if s.tier == GPU or any(s is h for h, _ in host_prefills)]
        plan.cpu_decodes = list(host_decodes)
        plan.strategy, plan.predicted_s = strategy, predicted_s
        plan.reason = f"{self.name}: {why}"


class _Search:
    """The best (tokens/s, strategy, k, seconds) over host plans: base rows + every host
    prefill + the first k host decodes, under each of the policy's strategies."""

    def __init__(self, policy, base: BatchShape, host_prefills, decodes, t_gpu: float,
                 starving: bool, context=lambda s: s.num_computed + 1):
        self.predictor, self.strategies = policy.predictor, policy.strategies
        self.base, self.hp = base, BatchShape.from_plan(Plan(prefills=host_prefills))
        self.bound = ((1.0 + policy.margin) * t_gpu
                      if policy.latency_bound and base.num_tokens and not starving else None)
        self.kv, self.longest = [0], [0]
        for s in decodes:                         # `context`: KV tokens its decode reads
            self.kv.append(self.kv[-1] + context(s))
            self.longest.append(max(self.longest[-1], context(s)))
        self.best = (-1.0, Strategy.GPU_ONLY, 0, t_gpu)
        self.over_bound = 0                       # faster plans the latency bound ruled out
        self.seen: set[int] = set()

    def shape(self, k: int) -> BatchShape:
        b, hp = self.base, self.hp
        return dataclasses.replace(
            b, prefill_tokens=b.prefill_tokens + hp.prefill_tokens,
            prefill_context=b.prefill_context + hp.prefill_context,
            prefill_outputs=b.num_prefill_outputs + hp.num_prefill_outputs,
            prefill_credit=b.num_prefill_credit + hp.num_prefill_credit,
            n_host_prefill_tokens=hp.n_host_prefill_tokens,
            host_prefill_prefix=hp.host_prefill_prefix,
            n_cpu_decodes=k, cpu_decode_kv=self.kv[k], cpu_decode_max_kv=self.longest[k])

    def run(self, sizes) -> None:
        for k in sizes:
            if k in self.seen:
                continue
            self.seen.add(k)
            shape = self.shape(k)
            for strategy in self.strategies:
                if strategy is Strategy.PIPELINE and not pipelines(shape):
                    if Strategy.OVERLAP in self.strategies:
                        continue                  # the runner would overlap: already tried
                    strategy = Strategy.OVERLAP
                t = self.predictor.iteration_time(shape, strategy)
                thr = shape.token_credit / t if t > 0 else 0.0
                if self.bound is not None and t > self.bound:
                    self.over_bound += thr > self.best[0]
                    continue
                if thr > self.best[0]:
                    self.best = (thr, strategy, k, t)

    def refine(self, sizes: list[int]) -> None:
        """Try the sizes between the best one's neighbours in the thinned list."""
        k = self.best[2]
        if k not in sizes:
            return
        i = sizes.index(k)
        lo, hi = sizes[max(i - 1, 0)], sizes[min(i + 1, len(sizes) - 1)]
        step = max(1, (hi - lo) // 16)
        self.run(range(lo, hi + 1, step))


class ApexPolicy(PredictivePolicy):
    name = "apex"
    strategies = (Strategy.OVERLAP, Strategy.PIPELINE)
    latency_bound = True


class NeoPolicy(PredictivePolicy):
    name = "neo"
    strategies = (Strategy.PIPELINE,)
    latency_bound = False

    def offload(self, seq: Sequence, sched) -> bool:
        # NEO moves KV to the host whenever the device is full, and balances the load per
        # iteration; one pipelined host request rarely pays, a hundred do.
        return True


class ForcedStrategyPolicy(PredictivePolicy):
    """Apex's placement, but every host request runs every iteration under one fixed strategy:
    for measuring the predictor on each strategy, not for serving."""

    latency_bound = False

    def __init__(self, cfg, predictor, strategy: Strategy):
        super().__init__(cfg, predictor)
        self.strategy = strategy
        self.name = f"forced-{strategy.value}"

    def offload(self, seq: Sequence, sched) -> bool:
        return True                                   # the host tier is what is measured

    def choose(self, plan: Plan, sched) -> None:
        strategy = self.strategy if plan.uses_host else Strategy.GPU_ONLY
        shape = BatchShape.from_plan(plan)
        plan.strategy = strategy
        plan.predicted_s = self.predictor.iteration_time(shape, strategy)
        plan.reason = f"{self.name}: forced"


def make_predictive_policy(name: str, cfg, predictor):
    if name == "apex":
        return ApexPolicy(cfg, predictor)
    if name == "neo":
        return NeoPolicy(cfg, predictor)
    raise ValueError(f"unknown predictive policy {name!r}; choose neo or apex")
