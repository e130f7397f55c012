"""The decode fast path (decode_step.py, cuda_graphs.py, batch.build_decode_inputs): identical
greedy tokens with every option on and off, across bucket boundaries, with requests joining and
leaving, beside the hybrid policies; on CPU, and on CUDA when present."""
from __future__ import annotations

import json
import os

import pytest
import torch

from apex_mini import LLM, SamplingParams, decode_step, packed_linear
from conftest import mixed_prompts, run_greedy
from apex_mini.batch import DecodeInputs, build_decode_inputs
from apex_mini.kv_cache import GATHER_BYTES, rows_per_gather
from apex_mini.sequence import GPU, Sequence

os.environ.setdefault("APEX_MINI_EAGER_CPU_ATTENTION", "1")   # compile time is not under test here

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


# Different lengths: requests finish at different steps, so the decode batch shrinks 6 -> 1 and
# crosses the buckets 8 -> 4 -> 2 -> 1; contexts cross block-width buckets too. Under the
# static policy (f = 0.5) the longest request is on the device: its last steps are device-only.
PARAMS = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (30, 6, 17, 24, 3, 12)]


def generate(path, device="cpu", fast=True, **options):
    return run_greedy(path, mixed_prompts(), PARAMS, fast=fast, device=device, **options)


@pytest.fixture(scope="module")
def reference(gqa_llama3_ckpt):
    tokens, engine = generate(gqa_llama3_ckpt, fast=False, policy="gpu-only", bucket_decode=False)
    assert not engine.runner.decode_shapes
    return tokens


@pytest.mark.parametrize("options", [
    dict(bucket_decode=True),
    dict(bucket_decode=False),
    dict(bucket_decode=True, prepack_weights=False),
    dict(policy="static", cpu_fraction=0.5, bucket_decode=True),
], ids=["buckets", "no-buckets", "no-prepack", "static-0.5"])
def test_fast_path_same_tokens(gqa_llama3_ckpt, reference, options):
    options.setdefault("policy", "gpu-only")
    tokens, engine = generate(gqa_llama3_ckpt, **options)
    assert tokens == reference
    prepack = options.get("prepack_weights", True) and packed_linear.available()
    assert engine.runner.decode_step.prepacked == prepack
    shapes = engine.runner.decode_shapes
    assert shapes, "the fast path never ran"
    rows = {b for b, _ in shapes}
    if options["policy"] == "gpu-only" and options["bucket_decode"]:
        assert rows == {1, 2, 4, 8}
    elif options["policy"] == "gpu-only":
        assert {3, 5} <= rows                         # exact sizes, no padding
    else:                                             # mixed steps took the layer loop
        assert sum(shapes.values()) < sum(1 for r in engine.records if not r.plan.prefills)
        assert any(r.plan.cpu_decodes for r in engine.records)


@pytest.mark.parametrize("prepack", [True, False], ids=["prepacked", "plain"])
def test_decode_step_matches_layer_loop(gqa_llama3_ckpt, prepack):
    """Logits of one decode step, fast path vs the general loop, on the same cache."""
    llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32", policy="gpu-only",
              prepack_weights=prepack)
    engine, runner = llm.engine, llm.engine.runner
    for ids in mixed_prompts(384, (7, 20, 40)):
        engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    plan, _ = engine.step()                            # the prefills
    plan = engine.scheduler.schedule()                 # three decodes
    assert len(plan.gpu_decodes) == 3 and not plan.prefills
    fast = runner._decode(plan, engine.block_tables())  # [3, vocab]; both write the same K/V
    batch = runner._build(plan, engine.block_tables())
    slow = runner.model.logits(runner._forward(batch))
    llm.close()
    assert fast.shape == slow.shape == (3, 384)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_rows_per_gather_bounds_the_gathered_bytes():
    assert rows_per_gather(8, 4, 100, limit=4000) == 8               # all fit: one call
    assert rows_per_gather(16, 4, 100, limit=4000) == 8              # 10 fit: a power of two
    assert rows_per_gather(5, 4, 100, limit=1200) == 2
    assert rows_per_gather(4, 64, 100, limit=10) == 1                # never below one row
    for batch, width, block in ((256, 256, 128 << 10), (64, 512, 32 << 10), (3, 7, 1000)):
        rows = rows_per_gather(batch, width, block)
        assert 1 <= rows <= batch and (rows == 1 or rows * width * block <= GATHER_BYTES)


def test_decode_attention_in_row_chunks_matches_one_call(gqa_llama3_ckpt):
    """Past GATHER_BYTES the step attends in row chunks: the same logits as one call, down to
    one row per chunk, and the same tokens over a whole mixed run."""
    llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32", policy="gpu-only")
    engine, step = llm.engine, llm.engine.decode_step
    for ids in mixed_prompts(384, (7, 20, 40)):
        engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    engine.step()                                      # the prefills
    plan = engine.scheduler.schedule()
    inputs = build_decode_inputs(plan.gpu_decodes, engine.block_tables()[GPU],
                                 engine.cfg.block_size, engine.scratch_block, True, pin=False)
    B, W = inputs.key
    with torch.inference_mode():
        whole = step(inputs).clone()
        chunked = {}
        for rows in (2, 1):
            step.gather_bytes = rows * W * step.block_bytes
            assert rows_per_gather(B, W, step.block_bytes, step.gather_bytes) == rows
            chunked[rows] = step(inputs).clone()
    llm.close()
    for logits in chunked.values():
        torch.testing.assert_close(logits, whole, rtol=1e-6, atol=1e-6)


def test_chunked_decode_same_tokens(gqa_llama3_ckpt, reference, monkeypatch):
    monkeypatch.setattr(decode_step, "GATHER_BYTES", 1)           # one row per chunk
    tokens, engine = generate(gqa_llama3_ckpt, policy="gpu-only", bucket_decode=True)
    assert engine.decode_step.gather_bytes == 1 and engine.runner.decode_shapes
    assert tokens == reference


def test_context_buffers_are_reused_and_grow(gqa_llama3_ckpt):
    """The CPU step gathers K/V into buffers kept between steps: logits equal those of fresh
    tensors bit for bit, a step of the same size reuses the buffers, a larger one grows them,
    and a smaller one after it uses their first blocks."""
    llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32", policy="gpu-only")
    engine, step = llm.engine, llm.engine.decode_step
    assert step.buffers is not None
    for ids in mixed_prompts(384, (7, 20, 40)):
        engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    engine.step()                                      # the prefills
    plan = engine.scheduler.schedule()
    tables = engine.block_tables()[GPU]
    kept = [build_decode_inputs(plan.gpu_decodes[:n], tables, engine.cfg.block_size,
                                engine.scratch_block, True, pin=False) for n in (1, 3, 1, 3)]
    with torch.inference_mode():
        logits, buffers = [], []
        for inputs in kept:
            logits.append(step(inputs).clone())
            buffers.append(step.buffers.k)
        step.buffers = None
        fresh = [step(inputs) for inputs in kept]
    llm.close()
    small, large = kept[0].key, kept[1].key            # (rows, block-table width)
    assert small[0] * small[1] < large[0] * large[1]
    assert buffers[0].shape[0] == small[0] * small[1] and buffers[1].shape[0] == large[0] * large[1]
    assert buffers[1] is buffers[2] is buffers[3]
    for a, b in zip(logits, fresh):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [256, 4096])
def test_step_rms_norm_equals_the_models(dtype, hidden):
    """The decode step's RMSNorm (torch's fused op in fp32, the model's six ops otherwise)
    gives model.RMSNorm's bits on the CPU."""
    from apex_mini.packed_model import rms_norm
    from apex_mini.model import RMSNorm
    torch.manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
    for rows in (1, 7, 64):
        x = (3 * torch.randn(rows, hidden)).to(dtype)
        assert torch.equal(rms_norm(x, norm.weight, 1e-5), norm(x))


def test_requests_join_and_leave_across_buckets(gqa_llama3_ckpt):
    """3 running -> 5 (two join late) -> 2 (three finish): every request's tokens equal its
    tokens when it runs alone, and the batch really crossed the 4/8 bucket boundary."""
    path = gqa_llama3_ckpt
    ids = mixed_prompts(384, (5, 17, 33, 2, 48))
    steps = [20, 9, 12, 25, 8]
    alone = []
    for p, m in zip(ids, steps):
        out, _ = _alone(path, p, m)
        alone.append(out)
    llm = LLM(path, device="cpu", dtype="float32", policy="gpu-only", bucket_decode=True)
    engine = llm.engine
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in steps]
    seqs = [engine.add_request(ids[i], params[i]) for i in (0, 1, 2)]
    sizes = []
    for step in range(60):
        if step == 3:                                  # two join while three decode
            seqs += [engine.add_request(ids[i], params[i]) for i in (3, 4)]
        if not engine.has_work():
            break
        plan, _ = engine.step()
        if not plan.prefills:
            sizes.append(len(plan.gpu_decodes))
    llm.close()
    assert [s.output_ids for s in seqs] == alone
    assert 3 in sizes and 5 in sizes and 2 in sizes
    assert {4, 8} <= {b for b, _ in engine.runner.decode_shapes}


def _alone(path, prompt, max_tokens):
    llm = LLM(path, device="cpu", dtype="float32", policy="gpu-only")
    llm.engine.runner.decode_step = None
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                ignore_eos=True))[0]
    llm.close()
    return out.token_ids, None


LAYOUTS = [packed_linear.TRANSPOSED,
           pytest.param(packed_linear.ONEDNN, marks=pytest.mark.skipif(
               not packed_linear.available(), reason="needs oneDNN"))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("bias", ["none", "all", "some"])
def test_stacked_linear_matches_f_linear(rows, bias, layout):
    """q/k/v side by side, as one product on a copy of the weights or plain: each slice equals
    its own F.linear (bit for bit plain, fp32 rounding aside on a copy), for any number of
    rows, with or without biases."""
    torch.manual_seed(rows)
    modules = [torch.nn.Linear(48, n, bias=(bias == "all" or (bias == "some" and i == 1)))
               for i, n in enumerate((64, 16, 16))]
    x = torch.randn(rows, 48)
    copied = packed_linear.StackedLinear(modules, layout)(x)
    plain = packed_linear.StackedLinear(modules, packed_linear.PLAIN)(x)
    assert copied.shape == plain.shape == (rows, 96)
    expected = torch.cat([torch.nn.functional.linear(x, m.weight, m.bias) for m in modules], -1)
    assert torch.equal(plain, expected)
    torch.testing.assert_close(copied, expected, rtol=1e-5, atol=1e-5)
    single = packed_linear.StackedLinear(modules[:1], layout)(x)
    torch.testing.assert_close(single, expected[:, :64], rtol=1e-6, atol=1e-6)


def test_stacked_linear_refuses_an_unknown_layout():
    with pytest.raises(ValueError, match="layout 'packed' is not one of"):
        packed_linear.StackedLinear([torch.nn.Linear(4, 4)], "packed")


def test_runners_of_one_engine_share_its_decode_step(gqa_llama3_ckpt):
    """The profiler's runners and the engine's use one decode step: one packed copy of the
    weights (and one compile) per engine, not one per runner."""
    from apex_mini.cpu_worker import CPUAttentionWorker
    llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32", policy="gpu-only")
    engine = llm.engine
    with CPUAttentionWorker(1) as worker:
        other = engine.make_runner(worker)
    assert engine.runner.decode_step is engine.decode_step is other.decode_step
    llm.close()


def test_available_memory_is_a_plausible_size():
    free = packed_linear.available_memory_bytes()
    if free is None:
        pytest.skip("this OS does not report free memory")
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < free <= total


def test_weight_layout_follows_the_step_and_the_room_left(monkeypatch):
    """Eager CPU steps get oneDNN's packing where it supports the dtype, compiled ones the
    transposed copy (any dtype); no copy on other devices, when turned off, or without room."""
    monkeypatch.setattr(packed_linear, "available_memory_bytes", lambda: 10 << 30)
    monkeypatch.setattr(packed_linear, "supports", lambda dtype: dtype == torch.float32)
    cpu, f32, bf16 = torch.device("cpu"), torch.float32, torch.bfloat16
    choose = packed_linear.choose_layout
    assert choose(True, False, cpu, f32, 4 << 30) == packed_linear.ONEDNN
    assert choose(True, True, cpu, f32, 4 << 30) == packed_linear.TRANSPOSED
    assert choose(True, False, cpu, bf16, 1) == packed_linear.PLAIN      # oneDNN cannot
    assert choose(True, True, cpu, bf16, 1) == packed_linear.TRANSPOSED
    for compiled in (False, True):
        with pytest.warns(RuntimeWarning, match="would not fit"):
            assert choose(True, compiled, cpu, f32, 6 << 30) == packed_linear.PLAIN
        assert choose(False, compiled, cpu, f32, 1) == packed_linear.PLAIN
        assert choose(True, compiled, torch.device("meta"), f32, 1) == packed_linear.PLAIN


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_cpu_prepacks_only_where_onednn_can(gqa_llama3_ckpt, dtype):
    """oneDNN refuses some dtypes on some CPUs (fp16 without AVX512-FP16, for one): the engine
    then keeps F.linear instead of failing, and decodes either way."""
    llm = LLM(gqa_llama3_ckpt, device="cpu", dtype=dtype, policy="gpu-only")
    step = llm.engine.runner.decode_step
    assert step.prepacked == packed_linear.supports(getattr(torch, dtype))
    out = llm.generate(mixed_prompts(384, (5, 9)),
                       SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    llm.close()
    assert [len(o.token_ids) for o in out] == [6, 6]


def test_decode_inputs_pack_and_pad():
    """One packed tensor; padded rows point at the scratch block only."""
    params = SamplingParams(temperature=0.0)
    seqs = [Sequence(i, list(range(1, n + 1)), params, seed=0) for i, n in enumerate((3, 20, 35))]
    for s in seqs:
        s.num_computed = s.num_tokens - 1
    tables = {0: [4], 1: [7, 2], 2: [9, 1, 5]}
    inputs = build_decode_inputs(seqs, tables, block_size=16, pad_block=99, bucketed=True, pin=False)
    assert inputs.key == (4, 4) and inputs.num_seqs == 3
    ids, positions, slots, lens, block_tables = DecodeInputs.views(inputs.packed, 4, 4)
    assert ids.tolist() == [3, 20, 35, 0]
    assert positions.tolist() == [2, 19, 34, 0]
    assert slots.tolist() == [4 * 16 + 2, 2 * 16 + 3, 5 * 16 + 2, 99 * 16]
    assert lens.tolist() == [3, 20, 35, 1]
    assert block_tables.tolist() == [[4, 99, 99, 99], [7, 2, 99, 99], [9, 1, 5, 99], [99] * 4]
    exact = build_decode_inputs(seqs, tables, 16, 99, bucketed=False, pin=False)
    assert exact.key == (3, 3)


@pytest.mark.slow
def test_compiled_decode_same_tokens(gqa_llama3_ckpt):
    """torch.compile of the decode step: same greedy tokens. Kept to one static shape (equal
    prompts, short outputs), since each new shape costs a compile."""
    ids = mixed_prompts(384, (6, 6))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = {}
    for compiled in (False, True):
        llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32", policy="gpu-only",
                  compile_decode=compiled)
        step = llm.engine.runner.decode_step
        assert step.compiled == compiled
        if compiled:                                     # Inductor multiplies by a plain copy
            assert step.weight_layout == packed_linear.TRANSPOSED
        outs[compiled] = [o.token_ids for o in llm.generate(ids, params)]
        llm.close()
    assert outs[True] == outs[False]


def test_compiled_cpu_step_hands_large_batches_to_its_eager_twin(gqa_llama3_ckpt, reference):
    """On the CPU a compiled step runs batches of up to COMPILED_CPU_MAX_ROWS rows itself and
    larger ones on an eager twin with the oneDNN copy: the batch shrinks 8 -> 4 -> 2 -> 1 here,
    so both run, and the tokens are the reference's. (The compiled function is stood in for by
    the eager one: what is under test is the routing; test_compiled_decode_same_tokens
    compiles.)"""
    if not packed_linear.supports(torch.float32):
        pytest.skip("no oneDNN copy here: the compiled step serves every batch")
    llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32", policy="gpu-only",
              compile_decode=True, bucket_decode=True)
    step = llm.engine.decode_step
    twin = step.eager_twin
    assert step.weight_layout == packed_linear.TRANSPOSED
    assert twin is not None and twin.weight_layout == packed_linear.ONEDNN and not twin.compiled
    rows = {"compiled": [], "twin": []}

    def counted(name, fn):
        def run(*args):
            rows[name].append(args[0].shape[0])                # input_ids [B]
            return fn(*args)
        return run
    step.run = counted("compiled", step.forward)
    twin.run = counted("twin", twin.forward)
    tokens = [o.token_ids for o in llm.generate(mixed_prompts(), PARAMS)]
    llm.close()
    assert tokens == reference
    limit = decode_step.COMPILED_CPU_MAX_ROWS
    assert rows["twin"] and min(rows["twin"]) > limit
    assert rows["compiled"] and max(rows["compiled"]) <= limit


def no_compiler(*args):
    """Stands in for a compiled step whose compilation fails."""
    raise RuntimeError("InductorError: no C++ compiler found\nmore lines")


def test_a_failing_compiled_step_falls_back_to_eager(gqa_llama3_ckpt):
    """A compiled decode step that cannot compile (stood in for here: compiling is slow, and
    whether a compiler is missing depends on the machine) warns once and decodes eagerly, with
    the eager step's tokens; an error the eager step raises too still reaches the caller."""
    ids = mixed_prompts(384, (6, 9))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32", policy="gpu-only")
    expected = [o.token_ids for o in llm.generate(ids, params)]
    llm.close()

    llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32", policy="gpu-only",
              compile_decode=True)
    step = llm.engine.decode_step
    step.run = no_compiler                              # what torch.compile returned
    with pytest.warns(RuntimeWarning, match="torch.compile failed .RuntimeError: InductorError: "
                                            "no C\\+\\+ compiler found.; running it eagerly"):
        tokens = [o.token_ids for o in llm.generate(ids, params)]
    assert tokens == expected
    assert step.run == step.forward and sum(llm.engine.runner.decode_shapes.values()) > 1
    llm.close()

    llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32", policy="gpu-only",
              compile_decode=True)
    step = llm.engine.decode_step
    step.run = no_compiler

    def bad_input(*args):
        raise ValueError("bad step")
    step.forward = bad_input
    with pytest.raises(ValueError, match="bad step"):
        llm.generate(ids, params)
    llm.close()


# ------------------------------------------------------------------------------------ CUDA


@pytest.mark.parametrize("options", [
    dict(cuda_graphs=True),
    dict(cuda_graphs=False),
    dict(cuda_graphs=True, bucket_decode=False),
    dict(cuda_graphs=True, policy="static", cpu_fraction=0.5),
], ids=["graphs", "no-graphs", "graphs-no-buckets", "graphs-static-0.5"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_same_tokens(gqa_llama3_ckpt, options):
    options.setdefault("policy", "gpu-only")
    ref, _ = generate(gqa_llama3_ckpt, "cuda", fast=False, policy="gpu-only", bucket_decode=False,
                      cuda_graphs=False)
    tokens, engine = generate(gqa_llama3_ckpt, "cuda", **options)
    assert tokens == ref
    graphs = engine.runner.graphs
    assert (graphs is not None) == options["cuda_graphs"]
    if graphs is not None:
        assert graphs.num_graphs == len(engine.runner.decode_shapes) >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_matches_eager_logits(gqa_llama3_ckpt):
    llm = LLM(gqa_llama3_ckpt, device="cuda", dtype="float32", policy="gpu-only", cuda_graphs=True)
    engine, runner = llm.engine, llm.engine.runner
    for ids in mixed_prompts(384, (7, 20, 40)):
        engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    engine.step()                                      # prefills
    plan = engine.scheduler.schedule()
    inputs = build_decode_inputs(plan.gpu_decodes, engine.block_tables()[GPU], runner.block_size,
                                 runner.scratch_block, True, pin=True)
    with torch.inference_mode():
        eager = runner.decode_step(inputs).clone()
        graphed = runner.graphs.run(inputs).clone()
        again = runner.graphs.run(inputs).clone()     # a replay, not the capture
    llm.close()
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(graphed, again)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graphs_capture_the_eager_step_when_compiling_fails(gqa_llama3_ckpt):
    """A compiled step that cannot compile fails in the graphs' warm-up: it warns, the graphs
    capture the eager step, and the tokens are the eager step's."""
    ids = mixed_prompts(384, (6, 9))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM(gqa_llama3_ckpt, device="cuda", dtype="float32", policy="gpu-only", cuda_graphs=True)
    expected = [o.token_ids for o in llm.generate(ids, params)]
    llm.close()

    llm = LLM(gqa_llama3_ckpt, device="cuda", dtype="float32", policy="gpu-only", cuda_graphs=True,
              compile_decode=True)
    step = llm.engine.decode_step
    step.run_hidden = no_compiler
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        tokens = [o.token_ids for o in llm.generate(ids, params)]
    assert tokens == expected
    assert step.run_hidden == step.hidden_states and llm.engine.runner.graphs.num_graphs >= 1
    llm.close()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cpu_attention_overlaps_gpu_work(gqa_llama3_ckpt):
    """Hybrid steps stay outside the graphs and keep their overlap: the worker starts a layer's
    CPU attention before the main thread, having queued that layer's device work, arrives at
    the layer's join."""
    llm = LLM(gqa_llama3_ckpt, device="cuda", dtype="float32", policy="static", cpu_fraction=0.5,
              cuda_graphs=True)
    runner = llm.engine.runner
    runner.timeline = []
    llm.generate(mixed_prompts(), PARAMS)
    llm.close()
    last = {}
    overlapped = []
    for what, layer, t in runner.timeline:
        if what == "launch":
            last.pop(("cpu_start", layer), None)
        elif what == "cpu_start":
            last[("cpu_start", layer)] = t
        elif what == "join":
            overlapped.append(last.get(("cpu_start", layer), float("inf")) < t)
    assert overlapped
    assert sum(overlapped) >= 0.5 * len(overlapped)
    assert runner.graphs.num_graphs >= 1              # device-only steps did replay graphs


def test_gpu_stamps_are_mapped_to_the_host_clock(gqa_llama3_ckpt, monkeypatch):
    """A CUDA event's time is read relative to the step's anchor event (milliseconds) and added
    to the host time taken when the anchor was recorded. (Stand-in events: no CUDA here.)"""
    class Event:
        def __init__(self, ms):
            self.ms = ms

        def elapsed_time(self, end):
            return end.ms - self.ms
    llm = LLM(gqa_llama3_ckpt, device="cpu", dtype="float32")
    runner = llm.engine.runner
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    runner.timeline = [("launch", 0, 99.0)]
    runner._anchor = (Event(10.0), 100.0)
    runner._gpu_stamps = [("gpu_dev_start", 0, Event(12.5)), ("gpu_dev_end", 0, Event(14.0))]
    runner._resolve_gpu_stamps()
    assert runner.timeline == [("launch", 0, 99.0), ("gpu_dev_start", 0, pytest.approx(100.0025)),
                               ("gpu_dev_end", 0, pytest.approx(100.004))]
    assert runner._anchor is None and runner._gpu_stamps == []
    llm.close()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_stamps_time_the_device_attention_kernels(tmp_path):
    """On CUDA the timeline also says when the GPU ran each layer's device attention (CUDA
    events on the host clock): after the main thread began issuing it, before the step ended,
    and in layer order."""
    from apex_mini import bench_overlap
    out = tmp_path / "overlap.json"
    assert bench_overlap.main(["--device", "cuda", "--num-requests", "8", "--prompt-len", "64",
                               "--steps", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for step in report["steps"]:
        layers = bench_overlap.by_layer(step["stamps"])
        previous_end = step["t0"]
        for _, ev in sorted(layers.items()):
            # (CUDA events map to the host clock to within some microseconds)
            assert ev["dev_start"] - 1e-4 <= ev["gpu_dev_start"] <= ev["gpu_dev_end"]
            assert ev["gpu_dev_end"] <= step["t1"] + 1e-4
            assert ev["gpu_dev_start"] >= previous_end - 1e-4
            previous_end = ev["gpu_dev_end"]
    # How much the two overlap is a measurement (docs/benchmarks.md), not asserted: at this
    # model's size both sides are mostly Python and may take turns on the GIL.
    assert report["summary"]["device_clock"] == "gpu"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_second_gpu_gives_the_same_tokens(gqa_llama3_ckpt):
    """On cuda:1 (not the current device) graphs are captured on the model's device, the
    worker's threads and the profiler's timers use it too: same tokens as on cuda:0."""
    ref, _ = generate(gqa_llama3_ckpt, "cuda:0", policy="gpu-only", cuda_graphs=True)
    for options in (dict(policy="gpu-only", cuda_graphs=True),
                    dict(policy="static", cpu_fraction=0.5, cuda_graphs=True)):
        tokens, engine = generate(gqa_llama3_ckpt, "cuda:1", **options)
        assert tokens == ref and engine.device == torch.device("cuda:1")
    assert torch.cuda.current_device() == 0
