"""kv_cache.py bookkeeping, by property tests: one BlockManager alone, then both tiers together
(two managers, two pools) under direct moves and under the Scheduler's own swaps.

The checks here recount ownership themselves instead of trusting `check_integrity()` alone, and
compare KV bytes (not values), so a swap that rounds, reorders or drops anything fails.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from apex_mini.kv_cache import BlockManager, KVPool, copy_blocks, slots_for
from apex_mini.plan import Plan
from apex_mini.policies import GpuOnlyPolicy, StaticPolicy
from apex_mini.sampling import SamplingParams
from apex_mini.scheduler import Scheduler
from apex_mini.sequence import CPU, GPU, Sequence, Status
from apex_mini.streams import Streams

CPU_STREAMS = Streams(torch.device("cpu"))      # stream and event calls are no-ops on CPU
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
L, KVH, D = 2, 2, 4                             # small pools: layers, KV heads, head_dim
MACHINE_SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])


def owned_blocks(mgr: BlockManager) -> list[int]:
    return [b for table in mgr.tables.values() for b in table]


def assert_accounted(mgr: BlockManager) -> None:
    """Every block is free or owned, never both, never twice; recounted here, independently."""
    owned, free = owned_blocks(mgr), mgr.free_blocks
    assert len(set(owned)) == len(owned), "a block is owned twice"
    assert len(set(free)) == len(free), "a block is free twice"
    assert not set(owned) & set(free), "a block is both owned and free"
    assert set(owned) | set(free) == set(range(mgr.num_blocks)), "a block leaked"
    mgr.check_integrity()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def flat(pool: KVPool) -> torch.Tensor:
    """A copy of the pool seen by slot: [L, 2, num_blocks * block_size, KVH, D]."""
    d = pool.read_blocks(torch.arange(pool.num_blocks))        # [L, 2, num_blocks, bs, KVH, D]
    return d.view(d.shape[0], 2, -1, *d.shape[-2:])


def write_slots(pool: KVPool, slots: list[int], new: torch.Tensor) -> None:
    """new [L, 2, len(slots), KVH, D] into those slots of every layer's K and V."""
    for layer, kv in enumerate(pool.layers):
        for j, cache in enumerate(kv):                     # k, then v
            cache.view(-1, *cache.shape[-2:])[slots] = new[layer, j]


# ------------------------------------------------------------------ one tier


class BlockManagerMachine(RuleBasedStateMachine):
    """Random grow / free on one manager against a dict model of token counts."""

    @initialize(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 4, 16]))
    def setup(self, num_blocks, block_size):
        self.mgr = BlockManager(num_blocks, block_size, "test")
        self.tokens: dict[int, int] = {}

    @rule(seq_id=st.integers(0, 6), extra=st.integers(0, 40))
    def grow(self, seq_id, extra):
        mgr = self.mgr
        before = list(mgr.tables.get(seq_id, []))
        had = seq_id in mgr.tables
        target = self.tokens.get(seq_id, 0) + extra
        need = mgr.blocks_needed(target) - len(before)
        free_before = mgr.num_free
        assert mgr.extra_blocks_for(seq_id, target) == need
        assert mgr.can_grow(seq_id, target) == (need <= free_before)
        if need > free_before:
            with pytest.raises(MemoryError):
                mgr.grow(seq_id, target)
            assert mgr.num_free == free_before                  # a failed grow takes nothing
            assert mgr.tables.get(seq_id) == (before if had else None)
            return
        table = mgr.grow(seq_id, target)
        assert table[:len(before)] == before                    # existing blocks never move
        assert len(table) == mgr.blocks_needed(target)
        assert mgr.num_free == free_before - need
        self.tokens[seq_id] = target

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def grow_to_fewer_tokens_is_a_no_op(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        before, free_before = list(self.mgr.tables[seq_id]), self.mgr.num_free
        self.mgr.grow(seq_id, data.draw(st.integers(0, self.tokens[seq_id])))
        assert self.mgr.tables[seq_id] == before and self.mgr.num_free == free_before

    @rule(seq_id=st.integers(0, 6))
    def free(self, seq_id):
        mgr = self.mgr
        before, free_before = list(mgr.tables.get(seq_id, [])), mgr.num_free
        assert mgr.free(seq_id) == before
        assert not mgr.owns(seq_id)
        assert mgr.num_free == free_before + len(before)
        self.tokens.pop(seq_id, None)

    @invariant()
    def accounted(self):
        assert_accounted(self.mgr)
        assert set(self.mgr.tables) == set(self.tokens)
        for seq_id, n in self.tokens.items():
            assert len(self.mgr.tables[seq_id]) == self.mgr.blocks_needed(n)


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = MACHINE_SETTINGS


def test_grow_past_capacity_names_the_tier():
    mgr = BlockManager(2, 4, "gpu")
    mgr.grow(0, 8)
    with pytest.raises(MemoryError, match="gpu"):
        mgr.grow(1, 1)


@given(table=st.lists(st.integers(0, 63), min_size=1, max_size=8, unique=True),
       block_size=st.sampled_from([1, 2, 3, 4, 16]), data=st.data())
def test_slots_for_matches_the_pool_layout(table, block_size, data):
    """A slot names the same cell as (block, offset) indexing of the pool."""
    n = len(table) * block_size
    start = data.draw(st.integers(0, n))
    end = data.draw(st.integers(start, n))
    slots = slots_for(table, start, end, block_size)
    assert slots == [table[t // block_size] * block_size + t % block_size for t in range(start, end)]
    assert len(set(slots)) == len(slots)
    assert all(s // block_size in table for s in slots)
    pool = KVPool(1, 64, block_size, 1, 1, torch.float32, "cpu")
    for t in range(start, end):                              # write by (block, offset)...
        pool.layer(0)[0][table[t // block_size], t % block_size] = t + 1
    read = flat(pool)[0, 0, slots, 0, 0]                     # ...read by slot
    assert read.tolist() == [float(t + 1) for t in range(start, end)]


# ------------------------------------------------------------------ both tiers, direct moves


class TwoTierMachine(RuleBasedStateMachine):
    """Requests in a device pool and a host pool (both CPU tensors here), moved between them
    with `copy_blocks` the way the scheduler moves them. Each request keeps a reference copy of
    the KV it was given; its bytes must survive every move."""

    @initialize(gpu_blocks=st.integers(1, 10), cpu_blocks=st.integers(1, 14),
                block_size=st.sampled_from([1, 3, 4]), dtype=st.sampled_from(DTYPES))
    def setup(self, gpu_blocks, cpu_blocks, block_size, dtype):
        self.bs, self.dtype = block_size, dtype
        self.mgrs = {GPU: BlockManager(gpu_blocks, block_size, GPU),
                     CPU: BlockManager(cpu_blocks, block_size, CPU)}
        self.pools = {tier: KVPool(L, m.num_blocks, block_size, KVH, D, dtype, "cpu")
                      for tier, m in self.mgrs.items()}
        self.tier: dict[int, str] = {}
        self.kv: dict[int, torch.Tensor] = {}       # seq_id -> [L, 2, n, KVH, D] reference
        self.next_id = 0
        self.gen = torch.Generator().manual_seed(0)

    def _write(self, seq_id: int, start: int, end: int) -> None:
        new = torch.randn(L, 2, end - start, KVH, D, generator=self.gen).to(self.dtype)
        slots = slots_for(self.mgrs[self.tier[seq_id]].tables[seq_id], start, end, self.bs)
        write_slots(self.pools[self.tier[seq_id]], slots, new)
        self.kv[seq_id] = torch.cat([self.kv.get(seq_id, new[:, :, :0]), new], dim=2)

    def _move(self, seq_id: int) -> bool:
        src, dst = self.tier[seq_id], (CPU if self.tier[seq_id] == GPU else GPU)
        n = self.kv[seq_id].shape[2]
        if not self.mgrs[dst].can_grow(seq_id, n):
            return False
        src_blocks = list(self.mgrs[src].tables[seq_id])
        dst_blocks = list(self.mgrs[dst].grow(seq_id, n))
        copy_blocks(self.pools[src], src_blocks, self.pools[dst], dst_blocks, CPU_STREAMS)
        # Whole blocks move, so even the unused tail of the last block matches.
        assert torch.equal(as_bytes(self.pools[src].read_blocks(torch.tensor(src_blocks))),
                           as_bytes(self.pools[dst].read_blocks(torch.tensor(dst_blocks))))
        self.mgrs[src].free(seq_id)
        self.tier[seq_id] = dst
        return True

    @rule(tier=st.sampled_from([GPU, CPU]), n=st.integers(1, 12))
    def add(self, tier, n):
        mgr = self.mgrs[tier]
        if not mgr.can_grow(self.next_id, n):
            return
        seq_id, self.next_id = self.next_id, self.next_id + 1
        mgr.grow(seq_id, n)
        self.tier[seq_id] = tier
        self._write(seq_id, 0, n)

    @precondition(lambda self: self.tier)
    @rule(data=st.data(), n=st.integers(1, 5))
    def append(self, data, n):
        seq_id = data.draw(st.sampled_from(sorted(self.tier)))
        old = self.kv[seq_id].shape[2]
        mgr = self.mgrs[self.tier[seq_id]]
        if mgr.can_grow(seq_id, old + n):
            mgr.grow(seq_id, old + n)
            self._write(seq_id, old, old + n)

    @precondition(lambda self: self.tier)
    @rule(data=st.data())
    def move(self, data):
        self._move(data.draw(st.sampled_from(sorted(self.tier))))

    @precondition(lambda self: self.tier)
    @rule(data=st.data())
    def round_trip(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tier)))
        home = self.tier[seq_id]
        if self._move(seq_id):
            self._move(seq_id)                     # its old blocks are free, so this fits
            assert self.tier[seq_id] == home

    @precondition(lambda self: self.tier)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tier)))
        self.mgrs[self.tier.pop(seq_id)].free(seq_id)
        del self.kv[seq_id]

    @invariant()
    def each_request_wholly_in_one_tier(self):
        for mgr in self.mgrs.values():
            assert_accounted(mgr)
        gpu, cpu = set(self.mgrs[GPU].tables), set(self.mgrs[CPU].tables)
        assert not gpu & cpu, "a request holds blocks in both tiers"
        assert gpu | cpu == set(self.tier)
        for seq_id, tier in self.tier.items():
            assert self.mgrs[tier].owns(seq_id)

    @invariant()
    def kv_bytes_exact(self):
        for seq_id, tier in self.tier.items():
            ref = self.kv[seq_id]
            slots = slots_for(self.mgrs[tier].tables[seq_id], 0, ref.shape[2], self.bs)
            assert torch.equal(as_bytes(flat(self.pools[tier])[:, :, slots]), as_bytes(ref))


TestTwoTiers = TwoTierMachine.TestCase
TestTwoTiers.settings = MACHINE_SETTINGS


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swap_round_trip_is_bit_exact(dtype):
    """Out to the host and back into different blocks: every byte of every layer survives,
    including fp16/bf16 values that are subnormal, infinite or NaN."""
    bs = 4
    dev, host = (KVPool(L, 6, bs, KVH, D, dtype, "cpu") for _ in range(2))
    as_int = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    info = torch.iinfo(as_int)
    every = torch.arange(6)
    shape = dev.read_blocks(every).shape                    # [L, 2, 6, bs, KVH, D]
    bits = torch.randint(info.min, info.max, shape, dtype=torch.int64,
                         generator=torch.Generator().manual_seed(1))
    dev.write_blocks(every, bits.to(as_int).view(dtype))    # every bit pattern, NaNs included
    before = dev.read_blocks(every)
    copy_blocks(dev, [4, 1, 2], host, [0, 5, 3], CPU_STREAMS)
    for cache in (c for kv in dev.layers for c in kv):
        cache.zero_()
    copy_blocks(host, [0, 5, 3], dev, [4, 1, 2], CPU_STREAMS)
    after = dev.read_blocks(every)
    assert torch.equal(as_bytes(after[:, :, [4, 1, 2]]), as_bytes(before[:, :, [4, 1, 2]]))
    assert torch.equal(as_bytes(after[:, :, [0, 3, 5]]), torch.zeros_like(as_bytes(after[:, :, [0, 3, 5]])))
    copy_blocks(dev, [], host, [], CPU_STREAMS)             # an empty move is allowed


def test_bytes_per_block_matches_the_pool():
    for dtype in DTYPES:
        pool = KVPool(L, 3, 16, KVH, D, dtype, "cpu")
        per_block = KVPool.bytes_per_block(L, 16, KVH, D, dtype)
        assert per_block * 3 == sum(c.numel() * c.element_size() for kv in pool.layers for c in kv)


# ------------------------------------------------------------------ both tiers, the Scheduler's moves


class SwapBackPolicy(StaticPolicy):
    """Static placement, but host-resident requests return to the device when there is room:
    requests then move both ways mid-run."""

    def wants_swap_in(self, seq, sched):
        return True


class FakeRunner:
    """Executes a plan's KV traffic only: swaps through `copy_blocks`, then each fed token's KV,
    a deterministic function of (request, position), written at its slots. Recomputing a
    preempted request writes the same bytes again."""

    def __init__(self, pools, block_size, dtype):
        self.pools, self.bs, self.dtype = pools, block_size, dtype

    def kv_of(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seq.seq_id)
        full = torch.randn(L, 2, seq.prompt_len + seq.params.max_tokens, KVH, D, generator=g)
        return full[:, :, start:end].to(self.dtype)                       # [L, 2, n, KVH, D]

    def execute(self, plan: Plan, tables) -> list[int]:
        for s in plan.swaps:
            copy_blocks(self.pools[s.src_tier], s.src_blocks, self.pools[s.dst_tier],
                        s.dst_blocks, CPU_STREAMS)
        tokens = []
        for seq, n in plan.scheduled:
            start = seq.num_computed
            slots = slots_for(tables[seq.tier][seq.seq_id], start, start + n, self.bs)
            write_slots(self.pools[seq.tier], slots, self.kv_of(seq, start, start + n))
            if start + n == seq.num_tokens:
                tokens.append(7)                 # any non-stop token
        return tokens

    def check(self, sched: Scheduler) -> None:
        for seq in sched.running:
            table = sched.blocks[seq.tier].tables[seq.seq_id]
            slots = slots_for(table, 0, seq.num_computed, self.bs)
            got = flat(self.pools[seq.tier])[:, :, slots]
            assert torch.equal(as_bytes(got), as_bytes(self.kv_of(seq, 0, seq.num_computed))), \
                f"request {seq.seq_id}'s KV changed in tier {seq.tier}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(["gpu-only", "static", "swap-back"]),
       cpu_fraction=st.sampled_from([0.0, 0.5, 1.0]),
       gpu_blocks=st.integers(3, 10), cpu_blocks=st.integers(3, 12),
       block_size=st.sampled_from([2, 4]), budget=st.sampled_from([4, 9, 64]),
       dtype=st.sampled_from(DTYPES),
       requests=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 8)), min_size=1, max_size=6))
def test_scheduler_moves_keep_tiers_consistent(policy, cpu_fraction, gpu_blocks, cpu_blocks,
                                               block_size, budget, dtype, requests):
    """Whatever the scheduler does (admit, grow, swap out, swap in, preempt, finish), after each
    iteration: no block leaked or shared in either tier, each running request in exactly one
    tier, its cached KV bytes intact, swaps in one direction only; and every request finishes."""
    pol = {"gpu-only": GpuOnlyPolicy(), "static": StaticPolicy(cpu_fraction),
           "swap-back": SwapBackPolicy(cpu_fraction)}[policy]
    gpu, cpu = BlockManager(gpu_blocks, block_size, GPU), BlockManager(cpu_blocks, block_size, CPU)
    sched = Scheduler(pol, gpu, cpu, max_num_seqs=4, max_num_batched_tokens=budget,
                      max_model_len=64)
    pools = {GPU: KVPool(L, gpu_blocks, block_size, KVH, D, dtype, "cpu"),
             CPU: KVPool(L, cpu_blocks, block_size, KVH, D, dtype, "cpu")}
    runner = FakeRunner(pools, block_size, dtype)
    seqs = []
    for i, (prompt_len, max_tokens) in enumerate(requests):
        seq = Sequence(i, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens,
                                                                       ignore_eos=True), seed=i)
        try:
            sched.add(seq)
        except ValueError:
            continue                                 # larger than a whole tier: refused upfront
        seqs.append(seq)
    assume(seqs)
    for _ in range(500):
        if not sched.has_work():
            break
        plan = sched.schedule()
        tables = {GPU: gpu.tables, CPU: cpu.tables}
        assert not plan.is_empty or plan.swaps, "no progress"
        for s in plan.swaps:
            assert len(s.src_blocks) == len(s.dst_blocks) == gpu.blocks_needed(s.seq.num_computed)
        assert len({s.dst_tier for s in plan.swaps}) <= 1, "swapped out and in in one iteration"
        for s in plan.swaps:
            event(f"swap to {s.dst_tier}")      # see --hypothesis-show-statistics
        if plan.preempted:
            event("preemption")
        sched.finish(plan, runner.execute(plan, tables))
        sched.check_integrity()
        for mgr in (gpu, cpu):
            assert_accounted(mgr)
        assert not set(gpu.tables) & set(cpu.tables)
        for seq in sched.running:
            assert seq.status is Status.RUNNING
            assert sched.blocks[seq.tier].owns(seq.seq_id)
            other = CPU if seq.tier == GPU else GPU
            assert not sched.blocks[other].owns(seq.seq_id)
        runner.check(sched)
    assert not sched.has_work(), "requests left unfinished"
    assert all(s.status is Status.FINISHED and s.num_output == s.params.max_tokens for s in seqs)
    assert gpu.num_free == gpu.num_blocks and cpu.num_free == cpu.num_blocks


def test_pool_tensors_share_no_memory():
    """Every layer's K and V is its own allocation. A compiled decode step writes them in place
    only then (Inductor copies a whole tensor that aliases another input before writing to it)."""
    pool = KVPool(L, 5, 4, KVH, D, torch.float32, "cpu")
    caches = [c for kv in pool.layers for c in kv]
    assert len(caches) == 2 * L
    assert len({c.untyped_storage().data_ptr() for c in caches}) == 2 * L
    caches[0].fill_(1.0)
    assert all(c.abs().sum() == 0 for c in caches[1:])


# ------------------------------------------------------------------ the pinned host pool

class FakeCudart:
    """Stands in for `torch.cuda.cudart()`: records what is page-locked; the `fail_at`-th
    register call returns an error code."""

    def __init__(self, fail_at: int | None = None):
        self.registered: dict[int, int] = {}          # data pointer -> bytes
        self.calls, self.fail_at = 0, fail_at

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.calls += 1
        if self.calls == self.fail_at:
            return 2                                   # cudaErrorMemoryAllocation
        assert flags == 1                              # cudaHostRegisterPortable
        self.registered[ptr] = nbytes
        return 0

    def cudaHostUnregister(self, ptr):
        return 0 if self.registered.pop(ptr, None) is not None else 1


def test_host_pool_is_page_locked_at_its_exact_size_for_its_lifetime(monkeypatch):
    """Each layer's K and V is registered where it lies, at exactly its bytes (torch's pinned
    allocator would round each up to a power of two), and unregistered when the pool goes."""
    import gc
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    pool = KVPool(L, 5, 4, KVH, D, torch.float16, "cpu", pin=True)
    caches = [c for kv in pool.layers for c in kv]
    assert cudart.registered == {c.data_ptr(): 5 * 4 * KVH * D * 2 for c in caches}
    assert sum(cudart.registered.values()) == 5 * KVPool.bytes_per_block(L, 4, KVH, D, torch.float16)
    del pool, caches
    gc.collect()
    assert cudart.registered == {}


class FakeRuntimeLibrary:
    """Stands in for the loaded libcudart: counts the reads of its last error."""

    def __init__(self):
        self.resets = 0

    def cudaGetLastError(self):
        self.resets += 1
        return 2


def test_host_pool_that_cannot_be_page_locked_says_so_and_releases_what_it_locked(monkeypatch):
    """The error names the flags to lower, what was locked is let go, and CUDA's last error is
    cleared (torch's next checked launch would report it as its own)."""
    import apex_mini.kv_cache as kv_cache
    cudart, runtime = FakeCudart(fail_at=3), FakeRuntimeLibrary()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(kv_cache, "cuda_runtime_library", lambda: runtime)
    with pytest.raises(OSError, match="could not page-lock .* lower --cpu-kv-gb"):
        KVPool(L, 5, 4, KVH, D, torch.float16, "cpu", pin=True)
    assert cudart.registered == {}
    assert runtime.resets == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stays_usable_after_memory_fails_to_page_lock():
    """On a real GPU: a refused cudaHostRegister (here: memory registered already) raises, and
    the next kernel launch, which torch checks with cudaGetLastError, still succeeds."""
    from apex_mini.kv_cache import cuda_runtime_library, pin_in_place, unpin
    assert cuda_runtime_library() is not None, "the CUDA runtime library torch loaded was not found"
    t = torch.zeros(1024)
    pin_in_place(t, torch.device("cuda"))
    try:
        with pytest.raises(OSError, match="could not page-lock"):
            pin_in_place(t, torch.device("cuda"))
        x = torch.ones(8, device="cuda") * 2
        assert x.sum().item() == 16
    finally:
        unpin([t.data_ptr()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_host_pool_is_pinned_and_moves_exactly():
    """On a real GPU: the registered host pool counts as pinned, and blocks go down and up
    through it (asynchronous copies on the copy stream) bit for bit."""
    streams = Streams(torch.device("cuda"))
    dev = KVPool(L, 6, 4, KVH, D, torch.float16, "cuda")
    host = KVPool(L, 6, 4, KVH, D, torch.float16, "cpu", pin=True)
    assert all(c.is_pinned() for kv in host.layers for c in kv)
    for kv in dev.layers:
        for c in kv:
            c.copy_(torch.randn(c.shape, dtype=c.dtype, device="cuda"))
    before = dev.read_blocks(torch.arange(6, device="cuda")).cpu()
    copy_blocks(dev, [0, 3, 5], host, [2, 1, 4], streams)
    copy_blocks(host, [2, 1, 4], dev, [1, 2, 0], streams)
    after = dev.read_blocks(torch.arange(6, device="cuda")).cpu()
    assert torch.equal(after[:, :, [1, 2, 0]], before[:, :, [0, 3, 5]])
