"""The scheduler: a pure planner, one call per iteration.

It owns the queues and the two tiers' block managers and changes nothing else; tensors never
appear here. Each `schedule()`:

1. keeps running decodes going, growing their KV by one token. When the device tier would
   overflow, the newest device-resident request moves to the host tier (swap out): to decode
   there if the policy offloads it, or parked there (its KV waits, without decoding, for room
   on the device) if the policy finds that cheaper than recomputing it; else it is preempted.
   A parked request starts decoding on the host once the policy would offload it. When the
   device has room, host-resident requests come back (swap in): parked ones first, then the
   others, oldest first (one that could never fit the device waits for nothing and is passed
   over). Never both in one iteration.
2. continues chunked prefills, then admits waiting requests first come first served, each
   placed by the policy, within the token budget.
3. lets the policy pick the strategy and how many host-resident decodes run.
4. when both tiers are full, preempts the newest request; it is recomputed later. A request
   is never dropped.

`finish(plan, tokens)` then records what the engine computed.
"""
from __future__ import annotations

import collections
import time

from .kv_cache import BlockManager
from .plan import Plan, Swap
from .sequence import CPU, GPU, Sequence, Status, peak_kv_tokens


class Scheduler:
    def __init__(self, policy, gpu_blocks: BlockManager, cpu_blocks: BlockManager,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 eos_ids: tuple[int, ...] = ()):
        self.policy = policy
        self.blocks = {GPU: gpu_blocks, CPU: cpu_blocks}
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_ids = eos_ids
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []          # admission order: newest last
        self.num_preemptions = 0
        self.num_swaps = 0                           # moves between tiers, either way
        self.num_parks = 0                           # swap-outs that parked their request

    # ---------------------------------------------------------------- queues

    def add(self, seq: Sequence) -> None:
        self.check_capacity(seq.num_tokens, seq.params.max_tokens, f"request {seq.seq_id}")
        self.waiting.append(seq)

    def check_capacity(self, prompt_len: int, max_tokens: int, what: str,
                       hint: str = "raise --gpu-kv-blocks/--cpu-kv-blocks or lower "
                                   "--max-new-tokens") -> None:
        """Raise ValueError unless a request's whole KV (prompt plus output, up to the model's
        context) fits in one tier this policy uses: else it could never run (`peak_kv_tokens`:
        the last output takes no KV slot). `hint`: what to change, in the caller's own words
        (a tool's flags)."""
        need = peak_kv_tokens(prompt_len, max_tokens, self.max_model_len)
        biggest = max(m.num_blocks for m in self.blocks.values() if self.usable(m))
        if self.blocks[GPU].blocks_needed(need) > biggest:
            raise ValueError(
                f"{what} needs {need} tokens of KV cache but the largest tier holds "
                f"{biggest * self.blocks[GPU].block_size}; {hint}")

    def abort(self, seq: Sequence) -> None:
        """Drop an unfinished request: out of its queue, its KV blocks freed. A finished one is
        left as it is."""
        if seq.status is Status.FINISHED:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.blocks[seq.tier].free(seq.seq_id)
            self.running.remove(seq)
        seq.status, seq.tier, seq.finish_reason, seq.parked = Status.FINISHED, None, "abort", False

    def usable(self, manager: BlockManager) -> bool:
        return manager is self.blocks[GPU] or self.policy.uses_host

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def tier_seqs(self, tier: str) -> list[Sequence]:
        return [s for s in self.running if s.tier == tier]

    # ---------------------------------------------------------------- planning

    def schedule(self) -> Plan:
        plan = Plan()
        self._grow_decodes(plan)
        if not any(s.src_tier == GPU for s in plan.swaps):
            self._swap_in(plan)
        self._admit(plan)
        self.policy.choose(plan, self)
        return plan

    def _grow_decodes(self, plan: Plan) -> None:
        # A parked request waits for the device (`_swap_in`), unless decoding it on the host
        # now pays: while the device is busy the oldest is asked; after a "no" the younger
        # ones wait too. An empty device (now: this pass may have emptied it) takes it back.
        ask = True
        decoding = [(s, s.parked) for s in self.running if s.is_decoding]     # oldest first
        for seq, was_parked in decoding:
            if seq.parked:
                if not was_parked or (not self.tier_seqs(GPU) and self.fits(seq, GPU)):
                    continue                         # parked by this pass, or coming back
                ask = ask and self.policy.offload(seq, self)
                if not ask:
                    continue
                seq.parked = False
            while seq.status is Status.RUNNING and not self.blocks[seq.tier].can_grow(seq.seq_id, seq.num_tokens):
                self._evict_newest(seq.tier, plan)
            if seq.status is Status.RUNNING and not seq.parked:     # parked: it evicted itself
                self.blocks[seq.tier].grow(seq.seq_id, seq.num_tokens)
                (plan.gpu_decodes if seq.tier == GPU else plan.cpu_decodes).append(seq)
        # A request evicted after it was planned must not run this iteration.
        plan.gpu_decodes = [s for s in plan.gpu_decodes if s.tier == GPU and s.status is Status.RUNNING]
        plan.cpu_decodes = [s for s in plan.cpu_decodes if s.tier == CPU and s.status is Status.RUNNING]

    def _evict_newest(self, tier: str, plan: Plan) -> None:
        """Free room in `tier`: move its newest request to the host tier (to decode there, or
        parked), or preempt it."""
        victim = self.tier_seqs(tier)[-1]
        host = self.blocks[CPU]
        if tier == GPU and self.policy.uses_host and host.can_grow(victim.seq_id, victim.num_tokens):
            if self.policy.offload(victim, self):
                self._move(victim, CPU, plan)
                return
            # Parked, it can always come back: it ran beside an older device request (alone,
            # `offload` takes it, the host being its only place), so it fits the device alone.
            if self.policy.park(victim, self):
                self._move(victim, CPU, plan)
                victim.parked = True
                self.num_parks += 1
                return
        self._preempt(victim, plan)

    def _move(self, seq: Sequence, dst: str, plan: Plan) -> None:
        src_mgr, dst_mgr = self.blocks[seq.tier], self.blocks[dst]
        n_cached = src_mgr.blocks_needed(seq.num_computed)
        src_blocks = src_mgr.tables[seq.seq_id][:n_cached]
        dst_blocks = dst_mgr.grow(seq.seq_id, seq.num_computed)[:n_cached]
        plan.swaps.append(Swap(seq, seq.tier, dst, list(src_blocks), list(dst_blocks)))
        src_mgr.free(seq.seq_id)
        seq.tier = dst
        seq.num_swaps += 1
        self.num_swaps += 1
        # Keep admission order within the tier: a moved request counts as newest there.
        self.running.remove(seq)
        self.running.append(seq)

    def _preempt(self, seq: Sequence, plan: Plan) -> None:
        self.blocks[seq.tier].free(seq.seq_id)
        # Moved to the host earlier in this plan, then evicted from there too: its KV is
        # dropped, so the copy must not run (its destination blocks are free again), and the
        # move, or park, it made is not counted.
        undone = sum(s.seq is seq for s in plan.swaps)
        if undone:
            plan.swaps = [s for s in plan.swaps if s.seq is not seq]
            seq.num_swaps -= undone
            self.num_swaps -= undone
            if seq.parked:
                self.num_parks -= 1
        seq.parked = False
        self.running.remove(seq)
        seq.status, seq.tier, seq.num_computed = Status.WAITING, None, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)                 # first in line when room frees
        plan.preempted.append(seq)

    def _swap_in(self, plan: Plan) -> None:
        gpu = self.blocks[GPU]
        # Parked requests first (they make no progress on the host), then the others; oldest
        # first within each.
        for seq in sorted(self.tier_seqs(CPU), key=lambda s: not s.parked):
            if not self.policy.wants_swap_in(seq, self):
                break
            # Keep one free block per device-resident request so the next decode step fits. A
            # parked request keeps only the spare block a new admission keeps (`place`), as
            # a preempted one would be admitted again: it waits for the device, and the
            # device's waiting requests wait behind it. An empty device keeps none, as for a
            # new admission: a request that needs every device block still comes back.
            n_dev = len(self.tier_seqs(GPU))
            headroom = 0 if not n_dev else 1 if seq.parked else n_dev + 1
            need = gpu.blocks_needed(seq.num_tokens)
            if need + headroom > gpu.num_free:
                if need > gpu.num_blocks:
                    continue                         # could never come back: no one waits on it
                break
            self._move(seq, GPU, plan)
            seq.parked = False
            if seq.is_decoding:
                gpu.grow(seq.seq_id, seq.num_tokens)
                if seq in plan.cpu_decodes:          # a parked request was not planned
                    plan.cpu_decodes.remove(seq)
                plan.gpu_decodes.append(seq)

    def _admit(self, plan: Plan) -> None:
        budget = self.max_num_batched_tokens - len(plan.gpu_decodes) - len(plan.cpu_decodes)
        prefilling = [s for s in self.running if not s.is_decoding and not s.parked]
        for seq in prefilling:                       # unfinished chunked prefills
            n = min(seq.remaining_prefill, budget)
            if n <= 0 or not self.blocks[seq.tier].can_grow(seq.seq_id, seq.num_computed + n):
                continue
            self.blocks[seq.tier].grow(seq.seq_id, seq.num_computed + n)
            plan.prefills.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            tier = self.policy.place(seq, self)
            if tier is None:
                break                                # first come, first served: no skipping
            self.waiting.popleft()
            self.blocks[tier].grow(seq.seq_id, seq.num_tokens)
            seq.status, seq.tier = Status.RUNNING, tier
            self.running.append(seq)
            n = min(seq.remaining_prefill, budget)
            plan.prefills.append((seq, n))
            budget -= n

    def fits(self, seq: Sequence, tier: str, reserve: int = 0) -> bool:
        """Could `seq`'s whole current context be placed in `tier`, leaving `reserve` blocks?"""
        mgr = self.blocks[tier]
        return mgr.blocks_needed(seq.num_tokens) + reserve <= mgr.num_free

    # ---------------------------------------------------------------- results

    def finish(self, plan: Plan, new_tokens: list[int]) -> list[Sequence]:
        """Record one executed iteration; `new_tokens` has one id per request that completed its
        context this step, in row order. Returns the requests that finished."""
        now = time.perf_counter()
        tokens = iter(new_tokens)
        done = []
        for seq, n in plan.scheduled:
            seq.num_computed += n
            if seq.num_computed < seq.num_tokens:
                continue                             # a chunk of a longer prefill
            token = next(tokens)
            seq.token_ids.append(token)
            seq.first_token_time = seq.first_token_time or now
            reason = self._stop_reason(seq, token)
            if reason:
                seq.status, seq.finish_reason, seq.finish_time = Status.FINISHED, reason, now
                self.blocks[seq.tier].free(seq.seq_id)
                self.running.remove(seq)
                done.append(seq)
        return done

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if seq.num_output >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def check_integrity(self) -> None:
        for tier, mgr in self.blocks.items():
            mgr.check_integrity()
            assert set(mgr.tables) == {s.seq_id for s in self.running if s.tier == tier}
