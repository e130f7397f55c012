"""The engine end to end: identical greedy tokens across policies, tier placements, swaps,
preemption and chunked prefill, on tiny checkpoints in fp32."""
from __future__ import annotations

import re
import time

import pytest
import torch

from apex_mini import LLM, SamplingParams
from apex_mini.config import EngineConfig
from conftest import mixed_prompts, run_greedy
from apex_mini.plan import Strategy
from apex_mini.policies import StaticPolicy
from apex_mini.sequence import CPU, GPU

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def run(path, prompt_ids, params=GREEDY, **options):
    return run_greedy(path, prompt_ids, params, **options)


@pytest.fixture(scope="module")
def reference(gqa_llama3_ckpt):
    tokens, _ = run(gqa_llama3_ckpt, mixed_prompts(), policy="gpu-only")
    return tokens


@pytest.mark.parametrize("options", [
    dict(policy="static", cpu_fraction=0.5),
    dict(policy="static", cpu_fraction=1.0),
    dict(policy="gpu-only", max_num_batched_tokens=16),                  # chunked prefill
    dict(policy="static", cpu_fraction=1.0, max_num_batched_tokens=16),  # chunked, host tier
    dict(policy="gpu-only", bucket_decode=False),
], ids=["static-0.5", "static-1.0", "chunked", "chunked-host", "no-buckets"])
def test_same_tokens_as_gpu_only(gqa_llama3_ckpt, reference, options):
    """Each option changes how the requests run, never their tokens; and it does change how
    they run (host decodes; prefills cut into chunks within the token budget), or the case
    would compare gpu-only with itself."""
    tokens, engine = run(gqa_llama3_ckpt, mixed_prompts(), **options)
    assert tokens == reference
    strategies = {r.plan.strategy for r in engine.records}
    if options.get("max_num_batched_tokens"):               # the budget reached the scheduler
        budget = options["max_num_batched_tokens"]
        assert any(n < seq.prompt_len for r in engine.records for seq, n in r.plan.prefills)
        assert max(sum(n for _, n in r.plan.scheduled) for r in engine.records) <= budget
    if options.get("cpu_fraction"):
        assert Strategy.OVERLAP in strategies
        assert any(r.plan.cpu_decodes for r in engine.records)


def test_static_fraction_places_requests(gqa_llama3_ckpt):
    _, engine = run(gqa_llama3_ckpt, mixed_prompts()[:4], policy="static", cpu_fraction=0.5)
    tiers = [len(r.plan.cpu_decodes) for r in engine.records if r.plan.cpu_decodes or r.plan.gpu_decodes]
    assert max(tiers) == 2                     # half of four requests decode on the CPU


class SwapBackPolicy(StaticPolicy):
    """Static placement, but host requests come back to the device when there is room."""

    def wants_swap_in(self, seq, sched):
        return True


def test_swaps_mid_generation_keep_tokens(gqa_llama3_ckpt, reference):
    llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32", policy="static", cpu_fraction=0.0,
              gpu_kv_blocks=6, max_num_seqs=3)
    engine = llm.engine
    engine.policy = engine.scheduler.policy = SwapBackPolicy(0.0)
    # Different lengths, so requests finish at different times and room frees mid-run.
    lengths = (24, 10, 24, 6, 24, 12)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in lengths]
    outs = llm.generate(mixed_prompts(), params)
    llm.close()
    assert [o.token_ids for o in outs] == [ref[:m] for ref, m in zip(reference, lengths)]
    swaps = [s for r in engine.records for s in r.plan.swaps]
    assert any(s.dst_tier == CPU for s in swaps) and any(s.dst_tier == GPU for s in swaps)
    assert any(o.num_swaps for o in outs)
    engine.scheduler.check_integrity()


def test_preemption_recomputes_without_loss(gqa_llama3_ckpt, reference):
    tokens, engine = run(gqa_llama3_ckpt, mixed_prompts(), policy="gpu-only", gpu_kv_blocks=10)
    assert tokens == reference
    assert engine.scheduler.num_preemptions > 0


def test_every_request_finishes_when_tiers_are_tiny(gqa_llama3_ckpt, reference):
    tokens, engine = run(gqa_llama3_ckpt, mixed_prompts(), policy="static", cpu_fraction=0.5,
                         gpu_kv_blocks=8, cpu_kv_blocks=8)
    assert tokens == reference
    assert engine.scheduler.num_preemptions + engine.scheduler.num_swaps > 0


def test_seeded_sampling_is_independent_of_the_batch(mha_ckpt):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=16, seed=123,
                            ignore_eos=True)
    alone, _ = run(mha_ckpt, mixed_prompts()[:1], params)
    mixed, _ = run(mha_ckpt, mixed_prompts(), [params] + [SamplingParams(temperature=1.0, seed=i, max_tokens=8)
                                                      for i in range(5)])
    assert alone[0] == mixed[0]
    other, _ = run(mha_ckpt, mixed_prompts()[:1], SamplingParams(temperature=0.9, top_p=0.9, top_k=50,
                                                              max_tokens=16, seed=124, ignore_eos=True))
    assert other[0] != alone[0]


def test_a_greedy_request_beside_sampled_ones(mha_ckpt):
    """Greedy and sampled requests in one batch: each gives the tokens it gives alone (one
    request's temperature 0 must not make its batch greedy, nor a sampled neighbour make a
    greedy request sample)."""
    prompts = mixed_prompts()[:4]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.5, max_tokens=12, seed=7, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.5, top_k=50, max_tokens=12, seed=8, ignore_eos=True)]
    together, engine = run(mha_ckpt, prompts, params)
    assert any(len(r.plan.gpu_decodes) == 4 for r in engine.records)      # one batch
    alone = [run(mha_ckpt, [p], q)[0][0] for p, q in zip(prompts, params)]
    assert together == alone
    greedy = [run(mha_ckpt, [p], GREEDY)[0][0][:12] for p in prompts[1::2]]
    assert together[1] != greedy[0] and together[3] != greedy[1]            # they do sample


def test_iteration_records_stay_bounded(mha_ckpt):
    """A long-lived engine keeps at most max_records records (each holds its requests), the
    newest ones, and the older half goes at once when full."""
    llm = LLM(mha_ckpt, device="cpu", dtype="float32", policy="gpu-only", max_records=8)
    engine = llm.engine
    engine.add_request([1, 5, 6], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    lengths, last = [], None
    while engine.has_work():
        last, _ = engine.step()
        lengths.append(len(engine.records))
    llm.close()
    assert max(lengths) == 8 and lengths[:8] == list(range(1, 9)) and lengths[8] == 4
    assert engine.records[-1].plan is last


def test_one_record_kept_is_the_last_one(mha_ckpt):
    llm = LLM(mha_ckpt, device="cpu", dtype="float32", policy="gpu-only", max_records=1)
    engine = llm.engine
    engine.add_request([1, 5, 6], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    while engine.has_work():
        last, _ = engine.step()
        assert len(engine.records) == 1 and engine.records[0].plan is last
    llm.close()


def test_an_eos_id_from_generation_config_stops_generation(mha_ckpt, tmp_path):
    """generation_config.json may list several EOS ids: the tokenizer takes them all, and the
    engine stops a request at any of them ("stop", the EOS its last token), unless it ignores
    EOS. Here the second id is the 4th token this prompt generates greedily."""
    import json
    import shutil
    from apex_mini.tokenizer import Tokenizer
    prompt = [1, 5, 6]
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = run(mha_ckpt, [prompt], free)[0][0]
    eos = tokens[3]
    assert 2 not in tokens[:4] and eos not in tokens[:3]
    ckpt = shutil.copytree(mha_ckpt, tmp_path / "ckpt")
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=[2, eos])))
    assert Tokenizer.from_dir(ckpt).eos_ids == (2, eos)
    llm = LLM(ckpt, device="cpu", dtype="float32")
    assert llm.engine.scheduler.eos_ids == (2, eos)
    stopped, ignoring = llm.generate([prompt, prompt], [
        SamplingParams(temperature=0.0, max_tokens=12), free])
    llm.close()
    assert (stopped.token_ids, stopped.finish_reason) == (tokens[:4], "stop")
    assert (ignoring.token_ids, ignoring.finish_reason) == (tokens, "length")


def test_eos_stops_and_max_tokens_limits(mha_ckpt):
    """max_tokens ends a request with "length", a stop token with "stop"; the model's EOS id is
    its config's (that an EOS id stops a request: the test above, and the scheduler's tests)."""
    llm = LLM(mha_ckpt, device="cpu", dtype="float32")
    out = llm.generate([[1, 5, 6]], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    eos = llm.engine.scheduler.eos_ids[0]
    out = llm.generate([[1, 5, 6]], SamplingParams(temperature=0.0, max_tokens=7,
                                                   stop_token_ids=(out.token_ids[2],)))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) <= 3
    assert eos == 2
    llm.close()


def test_bad_inputs_raise_value_error(mha_ckpt):
    llm = LLM(mha_ckpt, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="context"):
        llm.generate([[5] * 300])
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[5, 100000]])
    for not_ids in ([5, 1.0], [5, True], ["a", "b"]):                # True is not token 1
        with pytest.raises(ValueError, match="among its token ids, which must be integers"):
            llm.generate([not_ids])
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate([[5], [6]], [GREEDY])
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(mha_ckpt, device="cpu", no_such_option=1)
    with pytest.raises(ValueError, match="--max-model-len 100000 is longer than the model's "
                                         r"context \(256 tokens"):
        LLM(mha_ckpt, device="cpu", max_model_len=100_000)
    # Requests added to the engine directly (arriving mid-run) get the same checks.
    for ids, match in (([], "empty"), ([5, 100000], "vocabulary"), ([5] * 300, "context")):
        with pytest.raises(ValueError, match=match):
            llm.engine.add_request(ids, GREEDY)
    assert not llm.engine.has_work()
    llm.close()


def test_a_rejected_prompt_queues_none_of_its_call(mha_ckpt):
    """Every prompt of a call is checked, KV capacity included, before any is queued: a bad
    last prompt must not leave the first ones to run, unreturned, in the next call."""
    llm = LLM(mha_ckpt, device="cpu", dtype="float32", block_size=16, gpu_kv_blocks=2)
    fits = SamplingParams(temperature=0.0, max_tokens=4)
    too_long = SamplingParams(temperature=0.0, max_tokens=100)     # 104 KV tokens > 2 blocks of 16
    with pytest.raises(ValueError, match="prompt 1 needs 104 tokens of KV cache"):
        llm.generate([[5, 6, 7], [5] * 5], [fits, too_long])
    assert not llm.engine.has_work()
    assert len(llm.generate([[8, 9]], fits)) == 1
    llm.close()


def test_pools_larger_than_the_memory_are_refused_before_they_are_allocated(mha_ckpt, monkeypatch):
    """A billion blocks (terabytes) is a ValueError naming the flags, not an allocator error;
    so is a host pool past the memory this process could get now."""
    with pytest.raises(ValueError, match="KV pools need .* GB of host memory .* lower "
                                         r"--gpu-kv-blocks \(on a CPU that pool is host memory "
                                         r"too\)$"):          # gpu-only: no host flag to lower
        LLM(mha_ckpt, device="cpu", gpu_kv_blocks=10**9)
    import apex_mini.engine as engine_module
    monkeypatch.setattr(engine_module, "available_memory_bytes", lambda: 1 << 20)    # 1 MiB
    with pytest.raises(ValueError, match="lower --gpu-kv-blocks .*--cpu-kv-gb or --cpu-kv-blocks"):
        LLM(mha_ckpt, device="cpu", policy="static", cpu_kv_blocks=64)
    monkeypatch.setattr(engine_module, "available_memory_bytes", lambda: None)     # cannot tell
    LLM(mha_ckpt, device="cpu", gpu_kv_blocks=4).close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_device_pool_larger_than_the_free_device_memory_is_refused(mha_ckpt):
    with pytest.raises(ValueError, match="device KV pool needs .* lower --gpu-kv-blocks"):
        LLM(mha_ckpt, device="cuda", dtype="float32", gpu_kv_blocks=10**8)


def test_a_host_tier_of_no_blocks_is_a_clear_error(mha_ckpt):
    with pytest.raises(ValueError, match="--cpu-kv-gb 0.0 holds no KV block"):
        LLM(mha_ckpt, device="cpu", policy="static", cpu_kv_gb=0.0)
    with pytest.raises(ValueError, match="cpu_kv_gb=-1"):
        LLM(mha_ckpt, device="cpu", cpu_kv_gb=-1)
    LLM(mha_ckpt, device="cpu", policy="gpu-only", cpu_kv_gb=0.0).close()   # no host tier used


@pytest.mark.slow
def test_host_engine_compiles_its_host_kernel_when_built(gqa_llama3_ckpt, monkeypatch):
    """With the compiled host kernel on, a host-policy engine compiles its graphs when it is
    built: decoding on the host afterwards (three requests, then two, then one; contexts of one
    superblock and of two) compiles nothing more, and the tokens equal gpu-only's."""
    from torch._dynamo.utils import counters
    monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", "0")
    prompts = mixed_prompts(lengths=(150, 5, 40))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (30, 8, 16)]
    expected, _ = run(gqa_llama3_ckpt, prompts, params, policy="gpu-only")
    llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32", policy="static", cpu_fraction=1.0)
    assert llm.engine.runner.compile_cpu_attention
    graphs = counters["stats"]["unique_graphs"]
    tokens = [o.token_ids for o in llm.generate(prompts, params)]
    host_rows = {len(r.plan.cpu_decodes) for r in llm.engine.records}
    llm.close()
    assert counters["stats"]["unique_graphs"] == graphs
    assert {1, 2, 3} <= host_rows and tokens == expected


@pytest.mark.parametrize("options, words", [
    (dict(block_size="16"), "block_size='16' must be an integer"),
    (dict(block_size=1.5), "block_size=1.5 must be an integer"),
    (dict(gpu_kv_blocks=True), "gpu_kv_blocks=True must be an integer"),
    (dict(cpu_fraction="0.5"), "cpu_fraction='0.5' must be a finite number"),
    (dict(latency_margin=float("nan")), "latency_margin=nan must be a finite number"),
    (dict(gpu_memory_gb=0), "gpu_memory_gb=0 must be > 0"),
    (dict(max_model_len=-5), "max_model_len=-5 must be > 0"),
    (dict(cuda_graphs="no"), "cuda_graphs='no' must be True or False"),
    (dict(profile_path=5), "profile_path=5 must be a string"),
    (dict(device="tpu"), "device='tpu' is not one of auto, cpu, cuda, cuda:N"),
])
def test_engine_options_of_the_wrong_kind_are_value_errors(options, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        EngineConfig(**options)


def test_engine_options_accept_what_they_mean():
    from pathlib import Path
    cfg = EngineConfig(device="cuda:1", cpu_kv_gb=2, gpu_memory_gb=15, profile_path=Path("p.json"))
    assert (cfg.device, cfg.cpu_kv_gb, cfg.profile_path) == ("cuda:1", 2, "p.json")


@pytest.mark.parametrize("prompts, params, words", [
    (None, GREEDY, "prompts must be text, a list of token ids, or a list of those; got NoneType"),
    (5, GREEDY, "got int"),
    (b"hello", GREEDY, "got bytes"),
    (["a", None], GREEDY, "prompt 1 is NoneType"),
    ("a", "greedy", "sampling_params must be a SamplingParams or a list of them"),
    ("a", {"temperature": 0}, "sampling_params must be a SamplingParams"),
    (["a"], [None], "sampling_params must be a SamplingParams"),
])
def test_prompts_and_params_of_the_wrong_kind_are_value_errors(mha_ckpt, prompts, params, words):
    llm = LLM(mha_ckpt, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=re.escape(words)):
        llm.generate(prompts, params)
    assert not llm.engine.has_work()
    llm.close()


def test_token_ids_may_come_as_tensors_or_numpy_ints(mha_ckpt):
    np = pytest.importorskip("numpy")
    llm = LLM(mha_ckpt, device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    expected = llm.generate([[1, 5, 6]], params)[0].token_ids
    for prompt in (torch.tensor([1, 5, 6]), torch.tensor([[1, 5, 6]]), np.array([1, 5, 6]),
                   [np.int64(1), np.int64(5), np.int64(6)], (1, 5, 6)):
        assert llm.generate(prompt, params)[0].token_ids == expected
    llm.close()


def test_a_failed_call_or_an_abandoned_stream_leaves_nothing_behind(mha_ckpt, monkeypatch):
    """An exception in the middle of generate() (here: the third iteration), or a stream its
    caller stops reading, drops its requests and frees their blocks: the next call runs alone
    and gives the tokens it gives on a fresh engine."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(mha_ckpt, device="cpu", dtype="float32")
    expected = llm.generate([[1, 7, 8]], params)[0].token_ids
    execute, calls = llm.engine.runner.execute, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return execute(*args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "execute", failing)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate([[1, 5, 6], [1, 9]], params)
    monkeypatch.setattr(llm.engine.runner, "execute", execute)
    stream = llm.stream([1, 5, 6], params)
    next(stream), next(stream)
    stream.close()
    engine = llm.engine
    assert not engine.has_work() and engine.gpu_blocks.num_free == engine.gpu_blocks.num_blocks
    engine.scheduler.check_integrity()
    assert llm.generate([[1, 7, 8]], params)[0].token_ids == expected
    llm.close()


def test_a_paused_stream_keeps_every_token_while_other_calls_step_the_engine(mha_ckpt):
    """A stream read in part, then a generate() and a whole second stream in between: those
    calls step the paused request along with theirs, and its tokens wait for its reader, who
    gets all 10, the same as a stream read alone."""
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    llm = LLM(mha_ckpt, device="cpu", dtype="float32")
    alone = [t for t, _ in llm.stream([1, 5, 6], params) if t is not None]
    paused = llm.stream([1, 5, 6], params)
    got = [next(paused)[0], next(paused)[0]]
    assert len(llm.generate([[1, 9]], SamplingParams(temperature=0.0, max_tokens=3))) == 1
    assert len([t for t, _ in llm.stream([1, 7, 8], params) if t is not None]) == 10
    got += [t for t, _ in paused if t is not None]
    assert len(alone) == 10 and got == alone
    assert not llm.engine.has_work()
    llm.close()


def test_a_failed_step_waits_for_the_host_attention_it_handed_over(mha_ckpt, monkeypatch):
    """Device attention fails while host attention runs on the worker: the step re-raises only
    after the host task has ended, so the blocks it writes are not freed (and reused by the next
    call) under it. The next call then gives the tokens a fresh engine gives."""
    import apex_mini.runner as runner_module
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 10], [1, 11, 12]]
    expected = [o.token_ids for o in LLM(mha_ckpt, device="cpu", dtype="float32").generate(
        prompts, params)]
    llm = LLM(mha_ckpt, device="cpu", dtype="float32", policy="static", cpu_fraction=0.5,
              cpu_threads=2, compile_cpu_attention=False)
    host_attention, state = runner_module.host_attend, {"started": 0, "ended": 0}

    def slow_host_attention(*args, **kwargs):
        state["started"] += 1
        time.sleep(0.3)
        out = host_attention(*args, **kwargs)
        state["ended"] += 1
        return out

    runner = llm.engine.runner
    device_attention = runner._device_attention

    def failing_device_attention(*args):
        time.sleep(0.05)                              # the host task has started by now
        if state["started"]:
            raise RuntimeError("injected")
        device_attention(*args)

    monkeypatch.setattr(runner_module, "host_attend", slow_host_attention)
    monkeypatch.setattr(runner, "_device_attention", failing_device_attention)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(prompts, params)
    assert state["started"] >= 1 and state["ended"] == state["started"]
    monkeypatch.undo()
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    llm.close()


def test_host_block_tables_are_laid_out_once_per_step_for_every_layer(hf_checkpoint, monkeypatch):
    """The runner builds each step's DecodeTables once and every layer's host attention reads
    that one object (building it per layer was 13-23% of a small model's host call)."""
    import apex_mini.runner as runner_module
    ckpt = hf_checkpoint("sharded")                       # 3 layers
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm = LLM(ckpt, device="cpu", dtype="float32", policy="static", cpu_fraction=0.5,
              compile_cpu_attention=False)
    real, used = runner_module.host_attend, {}

    def counting(q, k_cache, v_cache, tables, *args, **kwargs):
        used.setdefault(id(tables), [tables, 0])[1] += 1     # the object is kept: ids stay unique
        return real(q, k_cache, v_cache, tables, *args, **kwargs)
    monkeypatch.setattr(runner_module, "host_attend", counting)
    llm.generate([[1, 5, 6, 7], [1, 8, 9], [1, 10], [1, 11, 12]], params)
    llm.close()
    assert len(used) >= 5                                   # one per step with host decodes
    assert {uses for _, uses in used.values()} == {3}


def test_a_closed_engine_takes_no_steps(mha_ckpt):
    llm = LLM(mha_ckpt, device="cpu", dtype="float32")
    llm.close()
    llm.close()
    with pytest.raises(RuntimeError, match="engine is closed"):
        llm.generate([[1, 5]], GREEDY)


# ------------------------------------------------------------------ the device memory reserve

def test_activation_reserve_adds_up_its_worst_cases():
    """device_memory.activation_reserve, term by term, for Llama-2-7B in fp16 and the default
    options (256 requests, 2048 tokens an iteration, 4k context, blocks of 16)."""
    from apex_mini.device_memory import RUNTIME_BYTES, activation_reserve
    from apex_mini.kv_cache import GATHER_BYTES
    from apex_mini.sampling import SAMPLE_BYTES
    from apex_mini.weights import MODEL_SHAPES
    mc = MODEL_SHAPES["llama2-7b"]
    r = activation_reserve(mc, 256, 2048, 4096, 16, 2, cuda_graphs=True)
    # 256 rows x 256 blocks of 16 x 32 heads x 128 x 2 bytes is 8 GiB of K: bounded.
    assert r["attention"] == 4 * GATHER_BYTES
    per_row = (3 * 4096 + 2 * 96 * 128 + 3 * 64 * 128 + 32 * 128 + 4 * 11008) * 2
    assert r["tokens"] == 2048 * per_row
    assert r["logits"] == 256 * 32000 * (2 + 4) + SAMPLE_BYTES
    assert r["graphs"] == (2 * GATHER_BYTES + 256 * per_row
                           + (1 + 2 + 4 + 8 + 16 + 32 + 64 + 128 + 256) * 9 * 4096 * 2)
    assert r["total"] == sum(v for k, v in r.items() if k != "total")
    assert 1 << 30 < r["total"] < 2 << 30
    # Fewer requests and tokens, no graphs: less; the whole gather when under the bound.
    small = activation_reserve(mc, 8, 256, 1024, 16, 2, cuda_graphs=False)
    assert small["graphs"] == 0 and small["attention"] == 4 * 8 * 64 * 16 * 32 * 128 * 2
    assert RUNTIME_BYTES < small["total"] < r["total"]
    # A long context: the prefill path's fp32, head-repeated K and V of the whole context.
    long = activation_reserve(mc, 256, 2048, 32768, 16, 2, cuda_graphs=False)
    assert long["attention"] == GATHER_BYTES + 2 * 32768 * 32 * 128 * 4 + 4 * 32768 * 32 * 128 * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_iterations_fit_in_the_reserve():
    """Llama-3.2-1B's shape (random weights, fp16), long prompts and sampling: what the first
    run keeps (the captured graphs' private pool, counted as reserved memory since it is not
    returned, and library workspaces) fits in the graphs and runtime terms, and what a second
    run allocates and frees again fits in the rest of the reserve."""
    from apex_mini.engine import Engine
    from apex_mini.weights import random_model
    model = random_model("llama3.2-1b", torch.float16, "cuda", seed=0)
    cfg = EngineConfig(device="cuda", policy="gpu-only", max_num_seqs=16,
                       max_num_batched_tokens=512, max_model_len=1024, cuda_graphs=True)
    engine = Engine(model, cfg)
    llm = LLM.from_engine(engine)
    reserve = engine.reserve
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128000, (n,), generator=g).tolist()
               for n in (700, 300, 90, 520, 33, 610, 250, 12)]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, ignore_eos=True, seed=1)
    device = engine.device
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved(device)
    start = torch.cuda.memory_allocated(device)
    llm.generate(prompts, params)                      # captures graphs, makes workspaces
    torch.cuda.synchronize()
    torch.cuda.empty_cache()          # the graphs' private pool stays, free blocks and all
    kept = torch.cuda.memory_reserved(device) - held
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    llm.generate(prompts, params)
    transient = torch.cuda.max_memory_allocated(device) - before
    llm.close()
    assert engine.runner.graphs.num_graphs >= 2 and before >= start
    assert kept <= reserve["graphs"] + reserve["runtime"], (kept, reserve)
    assert 0 < transient <= reserve["total"] - reserve["graphs"] - reserve["runtime"], \
        (transient, reserve)


def test_progress_false_reaches_the_profiler(mha_ckpt, monkeypatch):
    """An engine that must profile shows the profiler's bars unless told not to (bench serve's
    --no-progress)."""
    from apex_mini import profiler
    from apex_mini.cost_tables import Profile
    from apex_mini.engine import load_engine
    from apex_mini.predictor import Predictor
    seen = []

    def fake(engine, progress=True):
        seen.append(progress)
        return Predictor(Profile(key={"device": "cpu"}, num_layers=1))
    monkeypatch.setattr(profiler, "predictor_for_engine", fake)
    cfg = EngineConfig(device="cpu", policy="apex", compile_cpu_attention=False)
    engine = load_engine(str(mha_ckpt), cfg)
    engine.close()
    from apex_mini.engine import Engine
    quiet = Engine(engine.model, cfg, progress=False)
    quiet.close()
    assert seen == [True, False]
