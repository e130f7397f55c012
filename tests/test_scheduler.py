"""The scheduler and the predictive policies (apex, neo), with a FAKE predictor: no model, no
tensors, only `Scheduler`, `BlockManager` and `Sequence` objects.

The fake is the design's cost model: per layer a linear pass of fixed time L (decode is
memory-bound: one weight read whatever the batch), device attention g per device request, host
attention R*g per host request (R = the GPU-to-CPU attention speed ratio), so

    GPU-only   L + G                      G = g * n_gpu
    overlap    L + max(G, C)              C = R * g * n_cpu
    pipeline   max(2L + G, C)             weights read twice; the CPU hides behind both halves

Filling the pipeline's CPU window (C = 2L + G, so n_cpu = (2L + G) / (R g)) gives more tokens/s
than GPU-only, (n_gpu + n_cpu) / (2L + G) > n_gpu / (L + G), only while R < 2L/G + 3 + G/L.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from apex_mini.config import EngineConfig
from apex_mini.cost_tables import BatchShape
from apex_mini.kv_cache import BlockManager
from apex_mini.plan import Plan, Strategy
from apex_mini.policies import GpuOnlyPolicy, StaticPolicy
from apex_mini.predictive_policies import PATIENCE, RECHECK, ApexPolicy, NeoPolicy, make_predictive_policy
from apex_mini.predictor import pipelines
from apex_mini.sampling import SamplingParams
from apex_mini.scheduler import Scheduler
from apex_mini.sequence import CPU, GPU, Sequence, Status

BS = 16


class DesignModel:
    """The fake predictor of the module docstring (times in arbitrary units)."""

    def __init__(self, L=1.0, g=0.1, R=4.0, host_fixed=0.0):
        self.L, self.g, self.R, self.host_fixed = L, g, R, host_fixed
        self.calls = 0

    def iteration_time(self, shape: BatchShape, strategy: Strategy) -> float:
        self.calls += 1
        if shape.num_tokens == 0:
            return 0.0
        G = self.g * shape.n_gpu_decodes
        host = shape.n_cpu_decodes or shape.n_host_prefill_tokens
        C = self.R * self.g * shape.n_cpu_decodes + (self.host_fixed if host else 0.0)
        if strategy is Strategy.PIPELINE and pipelines(shape):
            return max(2 * self.L + G, C)
        return self.L + max(G, C)


class TableModel:
    """A random fake cost table: per layer a + b*tokens linear, decode attention per KV token on
    each side, a host-job cost, per-iteration overhead; overlap = max, pipeline = two halves."""

    def __init__(self, rng: random.Random):
        u = rng.uniform
        self.a, self.b = u(0.1, 2.0), u(0.0, 0.05)
        self.gk, self.ck = u(1e-5, 1e-3), u(1e-5, 1e-2)
        self.job, self.over, self.layers = u(0.0, 0.5), u(0.0, 3.0), rng.randint(1, 8)

    def lin(self, t):
        return self.a + self.b * t if t else 0.0

    def iteration_time(self, s: BatchShape, strategy: Strategy) -> float:
        if s.num_tokens == 0:
            return 0.0
        dev = self.gk * s.gpu_decode_kv + 1e-4 * sum(s.prefill_tokens) ** 2
        host = (self.job + self.ck * s.cpu_decode_kv) if (s.n_cpu_decodes or s.n_host_prefill_tokens) else 0.0
        if strategy is Strategy.PIPELINE and pipelines(s):
            half = s.n_cpu_decodes // 2
            lin = self.lin(s.num_tokens - s.n_cpu_decodes + half) + self.lin(s.n_cpu_decodes - half)
            layer = max(lin + dev, host)
        else:
            layer = self.lin(s.num_tokens) + max(dev, host)
        return self.over + self.layers * layer


# ------------------------------------------------------------------------------- helpers

def cfg(margin=0.1) -> EngineConfig:
    return EngineConfig(device="cpu", latency_margin=margin)


def make_sched(policy, gpu_blocks=64, cpu_blocks=256, max_num_seqs=256, budget=2048):
    return Scheduler(policy, BlockManager(gpu_blocks, BS, GPU), BlockManager(cpu_blocks, BS, CPU),
                     max_num_seqs, budget, max_model_len=100_000)


_ids = iter(range(10**9))


def new_seq(prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(next(_ids), [5] * prompt_len,
                    SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), seed=0)


def decoding(sched, tier: str, ctx: int = 40, max_tokens: int = 1000) -> Sequence:
    """A running request whose `ctx - 1` tokens are cached in `tier`: its next step decodes
    (and needs a new block when ctx - 1 is a multiple of the block size)."""
    s = new_seq(ctx, max_tokens)
    s.status, s.tier, s.num_computed = Status.RUNNING, tier, ctx - 1
    sched.blocks[tier].grow(s.seq_id, ctx - 1)
    sched.running.append(s)
    return s


def fake_tokens(plan: Plan) -> list[int]:
    return [7 for s, n in plan.scheduled if s.num_computed + n == s.num_tokens]


def step(sched) -> Plan:
    plan = sched.schedule()
    sched.finish(plan, fake_tokens(plan))
    sched.check_integrity()
    return plan


def run_to_the_end(sched, seq: Sequence) -> tuple[int, int]:
    """Step until every request has finished: (decodes of `seq` on the device, on the host)."""
    on_device = on_host = 0
    while sched.has_work():
        plan = step(sched)
        on_device += seq in plan.gpu_decodes
        on_host += seq in plan.cpu_decodes
    return on_device, on_host


def threshold(L: float, G: float) -> float:
    return 2 * L / G + 3 + G / L


# ------------------------------------------------------------------------------- strategy choice

@pytest.mark.parametrize("L,G", [(1.0, 1.0), (1.0, 0.25), (0.5, 2.0)])
@pytest.mark.parametrize("side", [0.7, 1.4])
def test_neo_pipelines_only_below_threshold(L, G, side):
    n_gpu = 16
    R = side * threshold(L, G)
    model = DesignModel(L=L, g=G / n_gpu, R=R)
    sched = make_sched(NeoPolicy(cfg(), model), gpu_blocks=64, cpu_blocks=4096)
    for _ in range(n_gpu):
        decoding(sched, GPU)
    for _ in range(200):
        decoding(sched, CPU)
    plan = sched.schedule()
    expected = Strategy.PIPELINE if side < 1 else Strategy.GPU_ONLY
    assert plan.strategy is expected, plan.reason
    assert bool(plan.cpu_decodes) == (side < 1)
    assert plan.predicted_s == pytest.approx(model.iteration_time(BatchShape.from_plan(plan), plan.strategy))


@pytest.mark.parametrize("L,G", [(1.0, 1.0), (1.0, 0.25)])
@pytest.mark.parametrize("side", [0.7, 1.4])
def test_apex_picks_overlap_unless_pipelining_pays(L, G, side):
    """With no latency bound, apex pipelines only where that beats overlap (R < 1 + 2L/G in
    this model) and otherwise overlaps; both beat GPU-only here."""
    n_gpu = 16
    R = side * (1 + 2 * L / G)
    model = DesignModel(L=L, g=G / n_gpu, R=R)
    sched = make_sched(ApexPolicy(cfg(margin=100.0), model), gpu_blocks=64, cpu_blocks=4096)
    for _ in range(n_gpu):
        decoding(sched, GPU)
    for _ in range(200):
        decoding(sched, CPU)
    plan = sched.schedule()
    assert plan.strategy is (Strategy.PIPELINE if side < 1 else Strategy.OVERLAP), plan.reason
    assert plan.cpu_decodes


def test_latency_bound_keeps_apex_from_slow_plans():
    """Pipelining would win on throughput, but its iteration is 2L + G vs L + G: over a 10%
    bound. Apex overlaps instead, within the bound."""
    model = DesignModel(L=1.0, g=1.0 / 16, R=1.0)
    sched = make_sched(ApexPolicy(cfg(margin=0.1), model), cpu_blocks=4096)
    for _ in range(16):
        decoding(sched, GPU)
    for _ in range(200):
        decoding(sched, CPU)
    plan = sched.schedule()
    t_gpu = model.L + 16 * model.g
    assert plan.strategy is Strategy.OVERLAP
    assert plan.predicted_s <= 1.1 * t_gpu + 1e-12


def test_host_work_that_never_pays_is_deferred_then_guarded():
    """A fixed host cost far above the bound: apex runs GPU-only, deferring the host request,
    until the starvation guard lets it run after PATIENCE deferrals."""
    model = DesignModel(L=1.0, g=0.01, R=1.0, host_fixed=50.0)
    sched = make_sched(ApexPolicy(cfg(), model), gpu_blocks=8)
    dev = [decoding(sched, GPU, ctx=20) for _ in range(3)]
    host = decoding(sched, CPU, ctx=20)
    strategies = []
    for _ in range(PATIENCE + 1):
        plan = step(sched)
        strategies.append(plan.strategy)
        assert plan.predicted_s is not None and plan.reason
    assert strategies[:PATIENCE] == [Strategy.GPU_ONLY] * PATIENCE
    assert strategies[PATIENCE] is not Strategy.GPU_ONLY and "starvation" in plan.reason
    assert host.num_output == 1 and all(s.num_output == PATIENCE + 1 for s in dev)


@pytest.mark.parametrize("chunk,fixed,host_runs", [
    (100, 0.5, True), (60, 0.5, True), (20, 0.5, False), (20, 0.0, True)])
def test_a_prefill_chunk_counts_as_its_share_of_the_prompt(chunk, fixed, host_runs):
    """Four device decodes take 1.4; a host prefill with a fixed cost of 0.5 (over device
    attention's 0.4) makes it 1.5. A chunk counts as its share of the prompt's first token:
    the whole prompt (100 of 100) 5/1.5, 60 of 100 4.6/1.5, both above GPU-only's 4/1.4; 20
    of 100 (4.2/1.5) is not, and is deferred (one token per chunk ran it: 5/1.5). A chunk that
    costs nothing runs however small (counting completed prompts only never ran it)."""
    model = DesignModel(L=1.0, g=0.1, R=4.0, host_fixed=fixed)
    policy = ApexPolicy(cfg(margin=0.5), model)
    sched = make_sched(policy)
    dev = [decoding(sched, GPU) for _ in range(4)]
    host = new_seq(100)
    host.status, host.tier = Status.RUNNING, CPU
    plan = Plan(prefills=[(host, chunk)], gpu_decodes=dev)
    shape = BatchShape.from_plan(plan)
    assert shape.num_outputs == 4 + (chunk == 100)          # LM-head rows: real tokens
    assert shape.token_credit == pytest.approx(4 + chunk / 100)
    policy.choose(plan, sched)
    assert (plan.strategy is not Strategy.GPU_ONLY) is host_runs, plan.reason
    assert [s for s, _ in plan.prefills] == ([host] if host_runs else [])


# ------------------------------------------------------------------------------- tier mechanics

def test_new_requests_go_to_device_then_host():
    sched = make_sched(ApexPolicy(cfg(), DesignModel(R=1.0)), gpu_blocks=5, cpu_blocks=64)
    a, b = new_seq(40), new_seq(40)          # 3 blocks each: the second does not fit the device
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert (a.tier, b.tier) == (GPU, CPU)
    assert [s for s, _ in plan.prefills] == [a, b]
    assert plan.strategy is Strategy.OVERLAP       # the host prefill appends KV on the CPU


def test_fcfs_admission_never_skips():
    sched = make_sched(ApexPolicy(cfg(), DesignModel()), gpu_blocks=4, cpu_blocks=4)
    decoding(sched, GPU, ctx=40)                   # 3 of 4 device blocks
    decoding(sched, CPU, ctx=40)                   # 3 of 4 host blocks
    big, small = new_seq(40), new_seq(5)
    sched.add(big)
    sched.add(small)
    plan = sched.schedule()
    assert not plan.prefills                       # `small` would fit, but `big` is first
    assert list(sched.waiting) == [big, small]


@pytest.mark.parametrize("policy_cls", [ApexPolicy, NeoPolicy])
def test_a_request_that_needs_the_whole_device_gets_in_once_it_is_empty(policy_cls):
    """The predictive policies keep one device block spare for the running decodes, but with
    nothing running there a request that needs every device block (and does not fit the
    smaller host) must still be placed, as under GPU-only, and run to its end."""
    sched = make_sched(policy_cls(cfg(), DesignModel()), gpu_blocks=4, cpu_blocks=2)
    seq = new_seq(62, max_tokens=3)                  # 64 KV tokens: exactly the 4 device blocks
    sched.add(seq)
    plan = step(sched)
    assert seq.tier == GPU and [s for s, _ in plan.prefills] == [seq]
    while sched.has_work():
        assert not step(sched).is_empty
    assert seq.num_output == 3 and sched.num_preemptions == 0


def test_new_request_waits_when_the_host_cannot_pay():
    """Host attention 50x slower than the device's: a host plan breaks the latency bound, so
    the request that does not fit the device waits, as under GPU-only, instead of sitting on
    the host."""
    sched = make_sched(ApexPolicy(cfg(), DesignModel(R=50.0)), gpu_blocks=5, cpu_blocks=64)
    a, b = new_seq(40), new_seq(40)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert a.tier == GPU and b.status is Status.WAITING and list(sched.waiting) == [b]
    assert [s for s, _ in plan.prefills] == [a] and not plan.uses_host


def test_a_declined_offload_stands_until_something_changes():
    """The waiting head is asked about every iteration while the device is full. A "no" stands
    for RECHECK asks with the same running requests (no predictor calls), is searched again
    after them, and at once when the running set changes; a "yes" is never remembered."""
    model = DesignModel(R=50.0)
    policy = ApexPolicy(cfg(), model)
    sched = make_sched(policy, gpu_blocks=4, cpu_blocks=64)
    running = [decoding(sched, GPU, ctx=20) for _ in range(2)]
    head = new_seq(40)

    def ask():
        before = model.calls
        verdict = policy.offload(head, sched)
        return verdict, model.calls - before

    assert ask()[0] is False and model.calls > 0
    assert [ask() for _ in range(RECHECK)] == [(False, 0)] * RECHECK
    assert ask()[1] > 0                               # searched again
    sched.running.remove(running[1])                  # one finished: the set changed
    assert ask()[1] > 0
    model.R = 1.0                                     # host work now pays
    sched.running.append(running[1])
    assert ask()[0] is True and ask()[1] > 0          # "yes" is searched every time


@pytest.mark.parametrize("R,moved", [(1.0, True), (50.0, False)])
def test_swap_out_on_overflow(R, moved):
    """The newest device request makes room: it moves to the host when host decoding pays,
    else it is preempted (recomputed later), as under GPU-only."""
    sched = make_sched(ApexPolicy(cfg(), DesignModel(R=R)), gpu_blocks=4, cpu_blocks=64)
    old = decoding(sched, GPU, ctx=33)             # 2 blocks, full
    new = decoding(sched, GPU, ctx=33)             # 2 blocks, full: next token needs a block each
    plan = sched.schedule()
    if moved:
        assert [(s.seq, s.dst_tier) for s in plan.swaps] == [(new, CPU)]
        assert old.tier == GPU and new.tier == CPU and not plan.preempted
        assert not any(s.dst_tier == GPU for s in plan.swaps)      # never both in one iteration
    else:
        assert not plan.swaps and plan.preempted == [new] and new.status is Status.WAITING
        assert old.tier == GPU and plan.gpu_decodes == [old]
    sched.check_integrity()


class CopyModel(DesignModel):
    """The design model with host attention 50x slower (host decoding never pays), plus a
    price for copying KV (`copy` per block moved) and for prefilling (`prefill` per token)."""

    def __init__(self, copy: float, prefill: float = 0.01):
        super().__init__(R=50.0)
        self.copy, self.prefill = copy, prefill

    def iteration_time(self, shape: BatchShape, strategy: Strategy) -> float:
        return (super().iteration_time(shape, strategy)
                + self.copy * (shape.swap_out_blocks + shape.swap_in_blocks)
                + self.prefill * sum(shape.prefill_tokens))


@pytest.mark.parametrize("copy,parked", [(0.01, True), (1.0, False)])
def test_an_evicted_request_is_parked_when_copying_beats_recomputing(copy, parked):
    """Host decoding does not pay, so the evicted request is not offloaded. Its 2 cached blocks
    out and back cost 4 x copy; recomputing its 33 tokens costs 0.33. Cheap copies park it on
    the host (it does not decode there); dear ones preempt it."""
    sched = make_sched(ApexPolicy(cfg(), CopyModel(copy)), gpu_blocks=4, cpu_blocks=64)
    old = decoding(sched, GPU, ctx=33)
    new = decoding(sched, GPU, ctx=33)
    plan = sched.schedule()
    if parked:
        assert [(s.seq, s.dst_tier) for s in plan.swaps] == [(new, CPU)] and not plan.preempted
        assert new.parked and new.tier == CPU and new.status is Status.RUNNING
        assert not plan.uses_host and plan.strategy is Strategy.GPU_ONLY
        assert sched.num_parks == 1
    else:
        assert not plan.swaps and plan.preempted == [new] and not new.parked
    assert plan.gpu_decodes == [old]
    sched.check_integrity()


def test_a_parked_request_waits_without_decoding_then_returns_before_new_ones():
    """Parked, a request neither decodes nor trips the starvation guard; a new request that
    would fit the device waits behind it (first come, first served); when the device empties
    it comes back and finishes. Nothing is preempted or recomputed."""
    sched = make_sched(ApexPolicy(cfg(), CopyModel(0.01)), gpu_blocks=4, cpu_blocks=64)
    old = decoding(sched, GPU, ctx=17, max_tokens=PATIENCE + 4)   # needs a 2nd block, no 3rd
    parked = decoding(sched, GPU, ctx=33, max_tokens=5)           # needs a 3rd: evicted
    late = new_seq(5, max_tokens=3)                               # 1 block: would fit beside old
    order = []
    for i in range(200):
        if not sched.has_work():
            break
        if i == 1:
            sched.add(late)
        plan = step(sched)
        assert "starvation" not in plan.reason and not plan.preempted
        order += [s.seq.seq_id for s in plan.swaps if s.dst_tier == GPU]
        order += [s.seq_id for s, _ in plan.prefills]
        if parked.parked:
            assert parked.num_output == 0 and all(s is not parked for s, _ in plan.scheduled)
    assert order == [parked.seq_id, late.seq_id]
    assert [s.num_output for s in (old, parked, late)] == [PATIENCE + 4, 5, 3]
    assert sched.num_preemptions == 0 and sched.num_parks == 1


def test_a_parked_request_decodes_on_the_host_once_that_pays():
    """Parked while host decoding does not pay; when it does (here the host gets 50x faster),
    the request is asked again (within RECHECK iterations: a "no" stands that long while the
    running requests stay the same) and decodes on the host."""
    model = CopyModel(0.01)
    sched = make_sched(ApexPolicy(cfg(), model), gpu_blocks=4, cpu_blocks=64)
    decoding(sched, GPU, ctx=17)
    parked = decoding(sched, GPU, ctx=33)
    step(sched)
    assert parked.parked
    model.R = 1.0
    for _ in range(RECHECK + 1):
        plan = step(sched)
        if not parked.parked:
            break
    assert not parked.parked and parked.tier == CPU and plan.cpu_decodes == [parked]
    assert parked.num_output == 1 and plan.uses_host


def test_a_request_that_evicts_itself_is_parked_and_does_not_run():
    """The newest device request needs a block for its own next token: it is its own victim.
    Parked, it must not then be grown on the host and planned as a host decode. (Dear copies
    make the iteration that parks it slow, which widens the latency bound enough for `choose`
    to run a host decode that `offload` refused.)"""
    model = CopyModel(copy=2.0, prefill=0.5)
    model.R = 5.0
    sched = make_sched(ApexPolicy(cfg(), model), gpu_blocks=3, cpu_blocks=64)
    old = decoding(sched, GPU, ctx=10)              # 1 block, room for its next token
    new = decoding(sched, GPU, ctx=33)              # 2 blocks, its next token needs a 3rd
    for _ in range(PATIENCE + 2):                   # past the starvation guard's patience
        plan = step(sched)
        assert new.parked and new.tier == CPU and new.num_output == 0
        assert plan.gpu_decodes == [old] and not plan.cpu_decodes and not plan.uses_host


def test_a_parked_request_that_needs_the_whole_device_comes_back_to_it():
    """Parked beside a one-block request, it needs all 4 device blocks. When the device
    empties it must come back there (an empty device keeps no spare block), not be offloaded
    for good to a host 50x slower because "the host is the only place" for it."""
    sched = make_sched(ApexPolicy(cfg(), CopyModel(0.01)), gpu_blocks=4, cpu_blocks=64)
    decoding(sched, GPU, ctx=17, max_tokens=3)      # 1 block, needs a 2nd
    big = decoding(sched, GPU, ctx=49, max_tokens=8)   # 3 blocks; 49 tokens need all 4
    on_device, on_host = run_to_the_end(sched, big)
    assert sched.num_parks >= 1 and on_host == 0 and on_device == 8


@pytest.mark.parametrize("policy_cls", [ApexPolicy, NeoPolicy])
def test_a_host_request_that_needs_the_whole_device_comes_back_to_it_once_empty(policy_cls):
    """Decoding on the host, not parked, it needs all 4 device blocks (49 to 63 tokens) while
    the device stands empty. An empty device keeps no spare block, as for a new admission, so
    it must come back and decode there to its end, not stay on the host for good."""
    sched = make_sched(policy_cls(cfg(), DesignModel(R=1.0)), gpu_blocks=4, cpu_blocks=64)
    h = decoding(sched, CPU, ctx=49, max_tokens=15)
    on_device, on_host = run_to_the_end(sched, h)
    assert (on_device, on_host) == (15, 0) and h.num_output == 15


def test_a_device_emptied_within_one_pass_still_takes_its_parked_request_back():
    """`old` outgrows the 4-block device: its growth parks `p` (3 blocks; 49 tokens need all
    4), later it offloads itself, emptying the device in the middle of a pass. `p` must then
    come back (it fits alone), not be offloaded for good because "the host is its only
    place": its decodes at contexts 49..64 run on the device (16), only 65..68 on the host."""
    sched = make_sched(ApexPolicy(cfg(), CopyModel(0.01)), gpu_blocks=4, cpu_blocks=64)
    decoding(sched, GPU, ctx=17, max_tokens=60)
    p = decoding(sched, GPU, ctx=49, max_tokens=20)
    on_device, on_host = run_to_the_end(sched, p)
    assert sched.num_parks >= 1 and (on_device, on_host) == (16, 4)


def test_a_host_request_too_big_for_the_device_does_not_hold_others_on_the_host():
    """Swap-in goes oldest first and stops at the first that does not fit, so that nobody
    overtakes a request waiting for room; one that could never fit the device waits for
    nothing and must not keep younger ones on the host while the device stands empty."""
    sched = make_sched(ApexPolicy(cfg(), CopyModel(0.01)), gpu_blocks=4, cpu_blocks=64)
    huge = decoding(sched, CPU, ctx=100)                   # 7 blocks
    small = decoding(sched, CPU, ctx=17)                   # 2 blocks
    plan = step(sched)
    assert [(s.seq, s.dst_tier) for s in plan.swaps] == [(small, GPU)] and huge.tier == CPU


def test_a_parked_prefill_returns_ahead_of_a_host_request_too_big_for_the_device():
    """A request parked mid-prefill makes no progress on the host (its prefill is not
    continued there), so it comes back before any other host request: here an older one that
    never fits the device would otherwise hold it out, with the device idle, for good."""
    sched = make_sched(ApexPolicy(cfg(), CopyModel(0.01)), gpu_blocks=4, cpu_blocks=64, budget=64)
    huge = decoding(sched, CPU, ctx=100, max_tokens=150)   # 7 blocks: never fits the device
    short = decoding(sched, GPU, ctx=17, max_tokens=PATIENCE + 4)   # 1 block, needs a 2nd
    half = new_seq(48, max_tokens=4)                        # 16 of 48 prefilled, on the device
    half.status, half.tier, half.num_computed = Status.RUNNING, GPU, 16
    sched.blocks[GPU].grow(half.seq_id, 48)
    sched.running.append(half)                              # the device is full
    step(sched)
    assert half.parked
    for _ in range(PATIENCE + 8):                           # past the guard's patience
        plan = step(sched)
        if not half.parked:                                 # back, and prefilled on the device
            break
        assert half.num_computed == 16 and all(s is not half for s, _ in plan.prefills)
    assert not half.parked and half.tier == GPU
    for _ in range(8):
        step(sched)
    assert short.status is Status.FINISHED and half.status is Status.FINISHED
    assert half.num_output == 4 and huge.status is Status.RUNNING and sched.num_preemptions == 0


def test_a_parked_request_evicted_from_a_full_host_is_preempted_and_finishes():
    """The host fills up under an older host request, whose next token needs the parked
    request's room: the parked one (newest on the host) is preempted, loses its parked state
    and is recomputed later on the device, like any preempted request."""
    model = CopyModel(0.01)
    model.R = 1.5          # one host decode pays within the bound; two (with `parked`) do not
    sched = make_sched(ApexPolicy(cfg(), model), gpu_blocks=4, cpu_blocks=6)
    host = decoding(sched, CPU, ctx=40, max_tokens=40)  # 3 blocks; 4 at token 49, 5 at 65
    old = decoding(sched, GPU, ctx=17, max_tokens=40)   # 1 block, needs a 2nd
    parked = decoding(sched, GPU, ctx=33, max_tokens=4)  # 2 blocks, needs a 3rd: evicted
    step(sched)
    assert parked.parked and parked.tier == CPU
    while parked.num_preemptions == 0:
        step(sched)
        assert host.num_output < 30, "the host request never needed the parked one's room"
    assert not parked.parked and parked.status is Status.WAITING and sched.waiting[0] is parked
    while sched.has_work():
        step(sched)
    assert [s.num_output for s in (host, old, parked)] == [40, 40, 4]


def test_a_park_undone_within_its_own_plan_is_not_counted():
    """`old`'s growth parks `victim` on the host (3 of its 4 free blocks); two newer host
    requests then grow by a block each, and the second one's growth preempts `victim`, whose
    copy is dropped from the plan. No block moved: the counters must say so (serving reports
    print them)."""
    sched = make_sched(ApexPolicy(cfg(), CopyModel(0.01)), gpu_blocks=4, cpu_blocks=8)
    old = decoding(sched, GPU, ctx=17)               # 1 block, needs a 2nd: the device is full
    victim = decoding(sched, GPU, ctx=49)            # 3 blocks
    hosts = [decoding(sched, CPU, ctx=33) for _ in range(2)]   # 2 blocks each, need a 3rd
    plan = sched.schedule()
    assert plan.preempted == [victim] and not plan.swaps and victim.status is Status.WAITING
    assert plan.gpu_decodes == [old] and all(h.tier == CPU for h in hosts)
    assert (sched.num_parks, sched.num_swaps, victim.num_swaps) == (0, 0, 0)
    assert sched.num_preemptions == 1
    sched.check_integrity()


def test_aborting_a_parked_request_frees_it_and_opens_the_device():
    sched = make_sched(ApexPolicy(cfg(), CopyModel(0.01)), gpu_blocks=4, cpu_blocks=64)
    decoding(sched, GPU, ctx=17)
    parked = decoding(sched, GPU, ctx=33)
    step(sched)
    late = new_seq(5)
    sched.add(late)
    assert parked.parked and step(sched).prefills == []       # waits behind the parked one
    sched.abort(parked)
    assert not parked.parked and parked.status is Status.FINISHED
    assert sched.blocks[CPU].num_free == 64
    assert [s for s, _ in step(sched).prefills] == [late] and late.tier == GPU


def test_park_prices_what_preemption_drops():
    """Preempting drops only the cached tokens (`num_computed`); the rest of a prompt is
    prefilled either way. 16 cached tokens of a 2,000-token prompt cost 0.15 to recompute,
    less than their block out and back (0.4): preempted. With copies at 0.01 a block, a
    decoding request's 500 cached tokens (4.99) cost more than 32 blocks out and back (0.64):
    parked."""
    policy = ApexPolicy(cfg(), CopyModel(copy=0.2, prefill=0.01))
    sched = make_sched(policy, gpu_blocks=200, cpu_blocks=400)
    prompt = new_seq(2000)
    prompt.status, prompt.tier, prompt.num_computed = Status.RUNNING, GPU, 16
    sched.blocks[GPU].grow(prompt.seq_id, 2000)
    sched.running.append(prompt)
    assert policy.park(prompt, sched) is False
    prompt.num_computed = 0
    assert policy.park(prompt, sched) is False                 # nothing cached: nothing to save
    policy.predictor.copy = 0.01
    long = decoding(sched, GPU, ctx=501)
    assert policy.park(long, sched) is True


def test_a_parked_request_comes_back_with_the_admission_reserve():
    """A parked request returns as a preempted one would be admitted again: with one spare
    device block, not one per device request (which would keep the device half idle while
    the queue waits behind it)."""
    sched = make_sched(ApexPolicy(cfg(), CopyModel(0.01)), gpu_blocks=6, cpu_blocks=64)
    short = decoding(sched, GPU, ctx=17, max_tokens=1)   # 1 block, needs a 2nd; then done
    other = decoding(sched, GPU, ctx=17)                 # the same, and keeps running
    parked = decoding(sched, GPU, ctx=33)                # 2 blocks, needs a 3rd: evicted
    step(sched)
    assert parked.parked and short.status is Status.FINISHED
    plan = step(sched)                  # 4 blocks free: 3 for `parked` + 1 spare, beside `other`
    assert [(s.seq, s.dst_tier) for s in plan.swaps] == [(parked, GPU)]
    assert not parked.parked and plan.gpu_decodes == [other, parked]


def test_swap_in_when_room_frees():
    sched = make_sched(ApexPolicy(cfg(), DesignModel()), gpu_blocks=16, cpu_blocks=64)
    host = decoding(sched, CPU, ctx=40)
    plan = sched.schedule()
    assert [(s.seq, s.dst_tier) for s in plan.swaps] == [(host, GPU)]
    assert plan.gpu_decodes == [host] and plan.strategy is Strategy.GPU_ONLY
    sched.check_integrity()


def test_preempt_when_both_tiers_full():
    sched = make_sched(ApexPolicy(cfg(), DesignModel()), gpu_blocks=2, cpu_blocks=2)
    a = decoding(sched, GPU, ctx=17)
    b = decoding(sched, GPU, ctx=17)               # device full; both need a new block
    c = decoding(sched, CPU, ctx=32)               # host full (c itself still has room)
    plan = sched.schedule()
    assert plan.preempted and b in plan.preempted and b.status is Status.WAITING
    assert sched.waiting[0] is b and b.num_computed == 0
    assert {a, b, c} <= set(sched.running) | set(sched.waiting)   # nobody lost
    sched.check_integrity()


def test_moved_then_preempted_in_one_plan_copies_nothing():
    """b is moved to the host to make room for a, then evicted from the host for c, in one
    schedule() call: b is preempted, and its planned copy is dropped (its destination blocks
    are free again and may be handed out in the same plan)."""
    sched = make_sched(StaticPolicy(0.0), gpu_blocks=2, cpu_blocks=4)
    a = decoding(sched, GPU, ctx=17)               # both need a second block; the device has 2
    b = decoding(sched, GPU, ctx=17)
    c = decoding(sched, CPU, ctx=33)               # needs a third block on the host
    plan = sched.schedule()
    assert b in plan.preempted and b.status is Status.WAITING
    assert all(s.seq is not b for s in plan.swaps)
    assert plan.gpu_decodes == [a] and plan.cpu_decodes == [c]
    sched.check_integrity()


# ------------------------------------------------------------------------------- properties

class Recording(ApexPolicy):
    """Apex that also remembers, per call, the GPU-only plan it was compared with."""

    def choose(self, plan, sched):
        dev = Plan(prefills=[(s, n) for s, n in plan.prefills if s.tier == GPU],
                   gpu_decodes=list(plan.gpu_decodes), swaps=plan.swaps)
        self.base = BatchShape.from_plan(dev)
        self.had_host = plan.uses_host
        super().choose(plan, sched)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_gpu=st.integers(0, 12), n_cpu=st.integers(0, 40),
       n_wait=st.integers(0, 6), margin=st.sampled_from([0.0, 0.1, 0.5, 10.0]),
       budget=st.sampled_from([8, 64, 2048]))
def test_apex_never_below_gpu_only(seed, n_gpu, n_cpu, n_wait, margin, budget):
    """The chosen plan's predicted tokens/s (a prefill chunk counting as its share of its
    prompt) is never below the GPU-only plan's, within the latency bound; small token budgets
    cut prompts into chunks."""
    rng = random.Random(seed)
    model = TableModel(rng)
    policy = Recording(cfg(margin), model)
    sched = make_sched(policy, gpu_blocks=rng.randint(4, 80), cpu_blocks=400, budget=budget)
    for tier, n in ((GPU, n_gpu), (CPU, n_cpu)):
        for _ in range(n):
            if sched.blocks[tier].num_free >= 4:
                decoding(sched, tier, ctx=rng.randint(2, 48))
    for _ in range(n_wait):
        sched.add(new_seq(rng.randint(1, 300)))
    plan = sched.schedule()
    sched.check_integrity()
    shape = BatchShape.from_plan(plan)
    assert plan.reason and plan.predicted_s == pytest.approx(model.iteration_time(shape, plan.strategy))
    if "starvation" in plan.reason or plan.is_empty:
        return
    t_gpu = model.iteration_time(policy.base, Strategy.GPU_ONLY)
    if policy.base.num_tokens:
        gpu_thr = policy.base.token_credit / t_gpu
        assert shape.token_credit / plan.predicted_s >= gpu_thr * (1 - 1e-9)
        assert plan.predicted_s <= (1 + margin) * t_gpu * (1 + 1e-9)       # the latency bound
    if plan.strategy is Strategy.GPU_ONLY:
        assert not plan.uses_host


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), policy_name=st.sampled_from(["apex", "neo"]),
       n=st.integers(1, 14))
def test_every_request_finishes(seed, policy_name, n):
    """Whole runs on random cost tables and tight tiers: swaps, deferrals and preemptions, yet
    every request ends with exactly its max_tokens outputs."""
    rng = random.Random(seed)
    policy = make_predictive_policy(policy_name, cfg(rng.choice([0.0, 0.1, 1.0])), TableModel(rng))
    sched = make_sched(policy, gpu_blocks=rng.randint(6, 24), cpu_blocks=rng.randint(6, 24),
                       max_num_seqs=rng.randint(2, 8), budget=rng.randint(16, 128))
    seqs = [new_seq(rng.randint(1, 40), rng.randint(1, 24)) for _ in range(n)]
    for s in seqs:
        sched.add(s)
    for _ in range(5000):
        if not sched.has_work():
            break
        plan = step(sched)
        assert plan.predicted_s is not None
        assert not plan.is_empty or plan.swaps or plan.preempted
    assert not sched.has_work()
    assert all(s.status is Status.FINISHED and s.num_output == s.params.max_tokens for s in seqs)


def test_the_capacity_check_counts_only_the_kv_a_request_writes():
    """The last output token is sampled, never fed back, so a request's KV peaks at prompt +
    max_tokens - 1 tokens, and at one under the model's context: a request that fills the
    4-block tier exactly is taken and runs to its end there; one token more is refused."""
    sched = make_sched(GpuOnlyPolicy(), gpu_blocks=4, cpu_blocks=4)
    fits = new_seq(60, max_tokens=5)                # 64 KV tokens
    sched.add(fits)
    while sched.has_work():
        step(sched)
    assert fits.num_output == 5 and sched.num_preemptions == 0
    with pytest.raises(ValueError, match="needs 65 tokens of KV cache but the largest tier holds 64"):
        sched.add(new_seq(60, max_tokens=6))
    capped = Scheduler(GpuOnlyPolicy(), BlockManager(4, BS, GPU), BlockManager(4, BS, CPU),
                       256, 2048, max_model_len=65)
    long = new_seq(60, max_tokens=100)              # stops at the context: 64 KV tokens
    capped.add(long)
    while capped.has_work():
        step(capped)
    assert long.num_output == 5 and long.finish_reason == "length"


class RaisingPredictor:
    """A predictor no policy may ask: any question fails the test."""

    def iteration_time(self, shape: BatchShape, strategy: Strategy) -> float:
        raise AssertionError("the gpu-only policy asked a predictor")

    def __getattr__(self, name):
        raise AssertionError(f"the gpu-only policy asked a predictor for {name!r}")


def test_gpu_only_policy_unchanged():
    """The baseline never uses the host tier and never asks a predictor, even with a host
    roomy enough for every request: a request that does not fit the device waits for it (it is
    not placed on the host), and the run ends with no host decode, no swap and the host's
    blocks all free. Built the way the engine builds it, around a predictor that raises."""
    from apex_mini.policies import make_policy
    policy = make_policy("gpu-only", cfg(), RaisingPredictor())
    assert isinstance(policy, GpuOnlyPolicy)
    sched = make_sched(policy, gpu_blocks=4, cpu_blocks=64)
    a, b = new_seq(40), new_seq(40)          # 3 blocks each: the second does not fit the device
    sched.add(a)
    sched.add(b)
    plan = step(sched)
    assert a.tier == GPU and plan.strategy is Strategy.GPU_ONLY and not plan.uses_host
    assert b.status is Status.WAITING and b.tier is None and list(sched.waiting) == [b]
    plans = [plan]
    while sched.has_work():
        plans.append(step(sched))
        assert sched.blocks[CPU].num_free == 64
    assert not any(p.cpu_decodes or p.swaps or p.uses_host for p in plans)
    assert {p.strategy for p in plans} == {Strategy.GPU_ONLY}
    assert a.num_output == b.num_output == 8 and b.tier == GPU


def eos_run(eos_ids, emitted, params):
    """Requests `params` (one each) on a roomy gpu-only scheduler whose EOS ids are `eos_ids`;
    request i's k-th output token is emitted[i][k] (7 once the list runs out). Steps to the end
    and returns the requests, checking after every step that a finished one holds no block."""
    sched = Scheduler(GpuOnlyPolicy(), BlockManager(64, BS, GPU), BlockManager(64, BS, CPU),
                      256, 2048, max_model_len=100_000, eos_ids=eos_ids)
    seqs = [Sequence(next(_ids), [5] * 20, p, seed=0) for p in params]
    for s in seqs:
        sched.add(s)
    while sched.has_work():
        plan = sched.schedule()
        tokens = [(emitted[seqs.index(s)] + [7] * 100)[s.num_output]
                  for s, n in plan.scheduled if s.num_computed + n == s.num_tokens]
        sched.finish(plan, tokens)
        sched.check_integrity()
        for s in seqs:
            if s.status is Status.FINISHED:
                assert s.seq_id not in sched.blocks[GPU].tables
    assert sched.blocks[GPU].num_free == 64
    return seqs


def test_eos_stops_a_request_unless_it_ignores_eos():
    """An EOS token ends its request at once ("stop", the EOS kept as its last output, its
    blocks freed), whichever of the scheduler's EOS ids it is; a request with ignore_eos runs
    on to max_tokens ("length"), and one that never meets an EOS does too."""
    params = [SamplingParams(temperature=0.0, max_tokens=10),
              SamplingParams(temperature=0.0, max_tokens=10),
              SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=10)]
    emitted = [[7, 7, 2], [7, 9], [2, 9, 2], [7, 8, 3]]   # EOS ids are 2 and 9
    first, second, ignoring, never = eos_run((2, 9), emitted, params)
    assert (first.finish_reason, first.output_ids) == ("stop", [7, 7, 2])
    assert (second.finish_reason, second.output_ids) == ("stop", [7, 9])
    assert (ignoring.finish_reason, ignoring.num_output) == ("length", 10)
    assert (never.finish_reason, never.num_output) == ("length", 10)


def test_candidate_sizes_thin_out():
    from apex_mini.predictive_policies import MAX_CANDIDATES, candidate_sizes
    assert candidate_sizes(5) == [1, 2, 3, 4, 5]
    big = candidate_sizes(500)
    assert big[0] == 1 and big[-1] == 500 and len(big) <= MAX_CANDIDATES + 1


def test_the_feedback_factor_changes_no_park_verdict():
    """The predictor's feedback factor (measured over predicted) scales every prediction alike,
    a plan of copies alone too, so whether an evicted request is parked or preempted does not
    depend on it: here a machine measured 5x slower, then 5x faster, than its profile."""
    from apex_mini.cost_tables import Profile
    from apex_mini.predictor import Predictor

    profile = Profile(key={"device": "cuda", "block_size": BS}, num_layers=4,
                      linear=[[1, 1e-3], [128, 1e-3], [2048, 0.2]],
                      prefill_attn=[[16, 1e-4], [2048, 0.05]],
                      gpu_decode_attn=[[1, 64, 1e-4], [8, 8192, 3e-3]],
                      cpu_decode_attn=[[1, 64, 1e-2], [8, 8192, 4e-1]],
                      d2h=[[1024, 1e-5], [1 << 20, 1e-3]], h2d=[[1024, 1e-5], [1 << 20, 2e-3]],
                      lm_head=[[1, 1e-4], [64, 1e-3]], overhead=2e-3, bytes_per_token_row=512,
                      kv_block_bytes=1 << 20, host_job_s=2e-5)
    predictor = Predictor(profile, feedback=True)
    policy = ApexPolicy(cfg(), predictor)
    sched = make_sched(policy, gpu_blocks=8192, cpu_blocks=64)
    seqs = [decoding(sched, GPU, ctx=ctx) for ctx in range(17, 4000, 97)]
    plain = [policy.park(s, sched) for s in seqs]
    assert True in plain and False in plain          # the verdict turns within the range
    for factor in (5.0, 0.2):
        for _ in range(3):
            predictor.feedback.observe(1.0, factor)
        assert predictor.feedback.correction() == factor
        assert [policy.park(s, sched) for s in seqs] == plain
        b = predictor.breakdown(BatchShape(swap_out_blocks=3), Strategy.GPU_ONLY)
        assert b["total_s"] == pytest.approx(b["table_s"] * factor)
