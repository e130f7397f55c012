"""The profiler's tables and the predictor: JSON round trip, stale profiles measured again,
interpolation exact at table points, the error report's arithmetic, and the real thing on this
machine (a quick profile of the tiny shape and the profile CLI's report; accuracy is printed,
not asserted)."""
from __future__ import annotations

import dataclasses

import json
import random
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import CapturingGraphs

from apex_mini import profiler
from apex_mini.config import EngineConfig
from apex_mini.engine import Engine
from apex_mini.cost_tables import PROFILE_VERSION, BatchShape, Profile
from apex_mini.feedback import MIN_SEEN, WINDOW, Feedback
from apex_mini.plan import Plan, Strategy
from apex_mini.predictor import Grid2D, Predictor, interp1, nondecreasing
from apex_mini.weights import MODEL_SHAPES, random_model


@pytest.fixture(autouse=True)
def eager_and_private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("APEX_MINI_EAGER_CPU_ATTENTION", "1")
    monkeypatch.setenv("APEX_MINI_CACHE", str(tmp_path_factory.getbasetemp() / "apex_cache"))


def sample_profile(key=None, **changes) -> Profile:
    p = Profile(key=key or {"device": "cuda", "block_size": 16}, num_layers=4,
                linear=[[1, 1e-3], [8, 2e-3], [64, 10e-3]],
                prefill_attn=[[16, 1e-4], [256, 4e-3]],
                gpu_decode_attn=[[1, 64, 1e-4], [1, 1024, 5e-4], [8, 1024, 8e-4], [8, 8192, 3e-3]],
                cpu_decode_attn=[[1, 64, 1e-3], [1, 1024, 5e-3], [8, 1024, 9e-3], [8, 8192, 4e-2]],
                d2h=[[1024, 1e-5], [1 << 20, 1e-4]], h2d=[[1024, 1e-5], [1 << 20, 2e-4]],
                lm_head=[[1, 1e-4], [64, 1e-3]], overhead=2e-3, bytes_per_token_row=512,
                kv_block_bytes=4096, host_job_s=2e-5)
    for name, value in changes.items():
        setattr(p, name, value)
    return p


# ------------------------------------------------------------------------------- JSON and cache

def test_profile_json_round_trip(tmp_path):
    p = sample_profile(key={"device": "cpu", "model": {"hidden_size": 64}}, host_job_s=7e-5)
    p.to_json(tmp_path / "p.json")
    assert Profile.from_json(tmp_path / "p.json") == p


def fake_engine(path, dtype=torch.float32, layer_weights="onednn", **options):
    """What engine_key reads of an engine, `layer_weights` the layout its layer loop runs on."""
    cfg = EngineConfig(device="cpu", profile_path=str(path) if path else None, **options)
    step = types.SimpleNamespace(loop_model=types.SimpleNamespace(layout=layer_weights))
    return types.SimpleNamespace(cfg=cfg, model_config=MODEL_SHAPES["tiny"], dtype=dtype,
                                 device=torch.device("cpu"), decode_step=step)


DAMAGES = ["version", "key", "garbage", "json-list", "unknown-field"]


@pytest.mark.parametrize("damage", ["missing", *DAMAGES, "current"])
def test_stale_or_mismatched_cached_profile_is_measured_again(tmp_path, monkeypatch, damage):
    """The default profile is a cache: a stale one is measured again and replaced."""
    path = tmp_path / "profile.json"
    monkeypatch.setattr(profiler, "cache_path", lambda key: path)
    engine = fake_engine(None)
    key = profiler.engine_key(engine)
    stored = sample_profile(key=dict(key))
    if damage != "missing":
        stored.to_json(path)
    if damage == "version":
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "version": PROFILE_VERSION - 1}))
    elif damage == "key":
        other = profiler.engine_key(fake_engine(path, dtype=torch.bfloat16))
        sample_profile(key=other).to_json(path)
    elif damage == "garbage":
        path.write_text("{not json")
    elif damage == "json-list":
        path.write_text("[1, 2]")
    elif damage == "unknown-field":                 # same version, written by other code
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "a_field_from_elsewhere": 0.5}))
    fresh = sample_profile(key=dict(key), overhead=42.0)
    calls = []
    monkeypatch.setattr(profiler, "profile_engine",
                        lambda eng, grid, progress: calls.append(eng) or fresh)
    predictor = profiler.predictor_for_engine(engine, progress=False)
    if damage == "current":
        assert not calls and predictor.profile == stored
    else:
        assert calls == [engine] and predictor.profile.overhead == 42.0
        assert Profile.from_json(path).overhead == 42.0          # the new one was saved


def test_a_cuda_profile_without_the_host_row_copies_is_measured_again(tmp_path):
    """A GPU profile measured before the runner's row copies were timed would price host rows
    with the block-copy tables (70 ms an iteration for Llama-2-7B on an H200): stale. On the
    CPU the runner copies nothing, so such a profile is still current."""
    path = tmp_path / "p.json"
    on_cuda = {"device": "cuda", "block_size": 16}
    sample_profile(key=on_cuda).to_json(path)
    profile, why = profiler.load_profile(path, on_cuda)
    assert profile is None and "host rows' copies" in why
    timed = sample_profile(key=on_cuda, rows_d2h=[[512, 2e-5]], rows_h2d=[[256, 1e-5]])
    timed.to_json(path)
    assert profiler.load_profile(path, on_cuda) == (timed, "")
    on_cpu = {"device": "cpu", "block_size": 16}
    sample_profile(key=on_cpu).to_json(path)
    assert profiler.load_profile(path, on_cpu) == (sample_profile(key=on_cpu), "")


def test_the_copy_up_is_timed_without_the_pin_the_host_job_pays(monkeypatch):
    """The worker pins its output inside its job (timed in `cpu_decode_attn`): `rows_h2d`
    times the copy up alone, or the predictor would count the pin twice."""
    model = random_model("tiny", torch.float32, "cpu")
    prof = profiler.Profiler(model, block_size=16, cpu_threads=1, compiled=False, progress=False)
    monkeypatch.setattr(profiler, "pin_for_upload", lambda t, streams: time.sleep(0.05) or t)
    run = prof._rows_up(4)                         # pins here, once
    assert run() < 0.05


@pytest.mark.parametrize("damage", ["version", "key", "garbage", "json-list"])
def test_a_named_profile_that_does_not_fit_is_an_error_not_overwritten(tmp_path, monkeypatch,
                                                                       damage):
    """--profile-path names the user's file: one that does not fit this engine is reported,
    never measured again over it. A path that does not exist yet is measured and saved."""
    path = tmp_path / "mine.json"
    engine = fake_engine(path)
    key = profiler.engine_key(engine)
    if damage in ("version", "key"):
        sample_profile(key={**key, "torch_threads": 99} if damage == "key" else dict(key)).to_json(path)
        data = json.loads(path.read_text())
        if damage == "version":
            data["version"] = PROFILE_VERSION - 1
        path.write_text(json.dumps(data))
    else:
        path.write_text({"garbage": "{not json", "json-list": "[1, 2]"}[damage])
    text = path.read_text()
    monkeypatch.setattr(profiler, "profile_engine", lambda *a: pytest.fail("measured again"))
    with pytest.raises(ValueError, match="--profile-path: profile .*mine.json"):
        profiler.predictor_for_engine(engine, progress=False)
    assert path.read_text() == text
    fresh = sample_profile(key=dict(key), overhead=42.0)
    monkeypatch.setattr(profiler, "profile_engine", lambda eng, grid, progress: fresh)
    new = tmp_path / "new" / "p.json"
    assert profiler.predictor_for_engine(fake_engine(new), progress=False).profile == fresh
    assert Profile.from_json(new).overhead == 42.0


def test_key_names_the_difference(tmp_path):
    path = tmp_path / "p.json"
    key = profiler.engine_key(fake_engine(path))
    sample_profile(key={**key, "torch_threads": 99}).to_json(path)
    profile, why = profiler.load_profile(path, key)
    assert profile is None and "torch_threads" in why
    assert profiler.key_hash(key) != profiler.key_hash({**key, "torch_threads": 99})


@pytest.mark.parametrize("option", [dict(compile_decode=True), dict(prepack_weights=False),
                                    dict(bucket_decode=False)])
def test_decode_step_options_are_part_of_the_key(tmp_path, option):
    """The profile's decode table times the engine's own decode step, so a profile measured
    with another step is not reused."""
    path = tmp_path / "p.json"
    sample_profile(key=profiler.engine_key(fake_engine(path))).to_json(path)
    profile, why = profiler.load_profile(path, profiler.engine_key(fake_engine(path, **option)))
    assert profile is None and "decode_step" in why


def test_layer_loop_weights_are_part_of_the_key(tmp_path):
    """The linear and LM-head tables time the layers the runner runs (packed_model.py), whose
    speed depends on their weights' layout: a profile of another layout is not reused, and a
    real engine's key names its own."""
    path = tmp_path / "p.json"
    sample_profile(key=profiler.engine_key(fake_engine(path))).to_json(path)
    key = profiler.engine_key(fake_engine(path, layer_weights="plain"))
    profile, why = profiler.load_profile(path, key)
    assert profile is None and "layer_weights" in why
    engine = Engine(random_model("tiny", torch.float32, "cpu"),
                    EngineConfig(device="cpu", policy="gpu-only", prepack_weights=False))
    assert profiler.engine_key(engine)["layer_weights"] == "plain"
    engine.close()


# ------------------------------------------------------------------------------- interpolation

def test_interp1_exact_at_points_and_linear_outside():
    rng = random.Random(0)
    xs = sorted(rng.sample(range(1, 5000), 8))
    table = [[x, rng.uniform(0.1, 9.0)] for x in xs]
    for x, y in table:
        assert interp1(table, x) == pytest.approx(y)
    (x0, y0), (x1, y1) = table[-2:]
    assert interp1(table, x1 + 100) == pytest.approx(y1 + (y1 - y0) / (x1 - x0) * 100)
    (x0, y0), (x1, y1) = table[:2]
    mid = (x0 + x1) / 2
    assert interp1(table, mid) == pytest.approx((y0 + y1) / 2)


@pytest.mark.parametrize("ragged", [False, True])
def test_grid2d_exact_at_points(ragged):
    rng = random.Random(1)
    points = [[n, kv, rng.uniform(1e-4, 1e-2)] for n in (1, 4, 16) for kv in (64, 256, 1024)
              if not (ragged and n == 16 and kv == 64)]
    grid = Grid2D(points)
    for n, kv, y in points:
        assert grid(n, kv) == pytest.approx(y)
    # Bilinear: the centre of a full cell is the mean of its corners.
    corners = [grid(a, b) for a in (4, 16) for b in (256, 1024)]
    assert grid(10, 640) == pytest.approx(sum(corners) / 4)


def test_nondecreasing_outvotes_an_outlier_and_is_the_closest_monotone_fit():
    # The first cpu_decode_attn row of docs/data/profile_cpu.json (us): a slow first point.
    assert nondecreasing([1038, 239, 347, 477, 1566]) == [347, 347, 347, 477, 1566]
    rng = random.Random(2)
    for _ in range(300):
        ys = [rng.uniform(0, 10) for _ in range(rng.randint(1, 9))]
        fit = nondecreasing(ys)
        assert len(fit) == len(ys) and all(a <= b for a, b in zip(fit, fit[1:]))
        if ys == sorted(ys):
            assert fit == ys
        # No worse (in absolute error) than two other monotone fits: the running maximum
        # and the running minimum from the right.
        run_max = [max(ys[:i + 1]) for i in range(len(ys))]
        run_min = [min(ys[i:]) for i in range(len(ys))]
        err = lambda f: sum(abs(a - b) for a, b in zip(f, ys))
        assert err(fit) <= min(err(run_max), err(run_min)) + 1e-9


def test_more_work_never_predicts_less_time_on_the_shipped_profile():
    """The shipped CPU profile's medians dip (noise on a 2-core machine); the predictor's
    tables must not: more KV per request, or more tokens, never predicts a faster iteration,
    nor does less work below the first point predict more."""
    path = Path(__file__).resolve().parent.parent / "docs" / "data" / "profile_cpu.json"
    profile = Profile(**json.loads(path.read_text()))
    pred = Predictor(profile, bucket_decode=True)
    kvs = [4, 16, 32, 64, 100, 128, 300, 512, 1000, 2048, 5000, 8192, 20000, 32768]
    for n in (1, 2, 4, 8, 16):
        for strategy, shape in (
                (Strategy.GPU_ONLY, lambda kv: BatchShape(n_gpu_decodes=n, gpu_decode_kv=n * kv,
                                                          gpu_decode_max_kv=kv)),
                (Strategy.OVERLAP, lambda kv: BatchShape(n_gpu_decodes=1, gpu_decode_kv=64,
                                                         n_cpu_decodes=n, cpu_decode_kv=n * kv,
                                                         cpu_decode_max_kv=kv))):
            times = [pred.iteration_time(shape(kv), strategy) for kv in kvs]
            assert times == sorted(times), (n, strategy)
    tokens = [1, 2, 3, 4, 6, 8, 12, 16, 64, 300, 4096]
    prefill = [pred.iteration_time(BatchShape(prefill_tokens=(t,), prefill_context=(t,)),
                                   Strategy.GPU_ONLY) for t in tokens]
    assert prefill == sorted(prefill)
    assert pred.profile == profile                 # the measured tables stay as measured


def test_pipeline_replay_equals_simulating_every_layer():
    """The replay stops simulating once the loop is periodic and extrapolates: exact, also
    where the worker's backlog takes many layers to settle (host and device times close)."""
    from apex_mini.predictor import _replay
    rng = random.Random(3)
    for trial in range(3000):
        u = lambda: rng.choice([0.0, rng.uniform(0, 1), rng.uniform(0, 0.01)])
        args = (u(), u(), u(), (u(), u(), u()), u(), u(), (u(), u(), u()))
        if trial % 3 == 0:       # host job just over or under the device's work per layer
            device = args[0] + args[1] + args[2] + args[4] + args[5]
            args = args[:6] + ((0.0, device * rng.uniform(0.97, 1.03), 0.0),)
        layers = rng.choice([1, 2, 3, 5, 32, 80])
        assert _replay(layers, *args) == pytest.approx(_replay(layers, *args, extrapolate=False),
                                                       rel=1e-9, abs=1e-12)


def pipeline_by_events(layers, pre_a, dev_a, post_a, host_a, pre_b, post_b, host_b) -> float:
    """The pipelined loop written out as the runner's calls (runner._forward_pipelined), then
    played on two resources: the device, which runs its work in program order and waits at
    each join, and one CPU worker, which takes host jobs first come, first served. A job starts
    when its rows are down and the worker is free; its output is ready once it has gone back
    up. Sub-batch A sends a job only when it has host rows (a job time); B always has."""
    program = []
    for i in range(layers):
        program += [("run", pre_a), ("send", "a", host_a), ("run", dev_a)]
        if i > 0:
            program += [("join", "b"), ("run", post_b)]
        program += [("run", pre_b), ("send", "b", host_b), ("join", "a"), ("run", post_a)]
    program += [("join", "b"), ("run", post_b)]
    device, worker_free, ready = 0.0, 0.0, {}
    for op, *args in program:
        if op == "run":
            device += args[0]
        elif op == "send":
            name, (down, job, up) = args
            if name == "a" and not job:
                ready[name] = device                       # nothing on the host to wait for
                continue
            start = max(worker_free, device + down)
            worker_free = start + job
            ready[name] = worker_free + up
        else:
            device = max(device, ready.pop(args[0]))
    return device


@pytest.mark.parametrize("layers", [1, 2])
def test_pipeline_replay_device_bound_by_hand(layers):
    """Host jobs shorter than the device's work hide completely: each layer costs the device's
    own work (both sub-batches' linear halves and A's attention), nothing more."""
    from apex_mini.predictor import _replay
    host = (0.0, 1.0, 0.0)
    got = _replay(layers, 1.0, 10.0, 2.0, host, 1.0, 2.0, host)
    assert got == pytest.approx(layers * (1.0 + 10.0 + 2.0 + 1.0 + 2.0))        # 16 a layer


@pytest.mark.parametrize("layers", [1, 2])
def test_pipeline_replay_host_bound_by_hand(layers):
    """Host jobs longer than the device's work: the one worker runs A's and B's jobs back to
    back, so its backlog is the critical path, A's first linear half before it and B's last
    after it: pre_a + layers * (job_a + job_b) + post_b (1 layer: 1 + 20 + 1)."""
    from apex_mini.predictor import _replay
    host = (0.0, 10.0, 0.0)
    got = _replay(layers, 1.0, 0.0, 1.0, host, 1.0, 1.0, host)
    assert got == pytest.approx(1.0 + layers * (10.0 + 10.0) + 1.0)


def test_pipeline_replay_with_copies_by_hand():
    """One layer with copies: A's rows go down (1) after its first linear half (1), A's job runs
    (3), B's job waits for the worker (3) though its rows were down long before, B's output
    comes up (1), then B's last linear half (1): 10, not the device's own 1+2+1+1+1 = 6."""
    from apex_mini.predictor import _replay
    host = (1.0, 3.0, 1.0)
    assert _replay(1, 1.0, 2.0, 1.0, host, 1.0, 1.0, host) == pytest.approx(10.0)


def test_pipeline_replay_equals_an_event_simulation():
    """The recurrence (and its extrapolation) agrees with the loop played out event by event
    (pipeline_by_events, written from the runner's call order alone), on random times: mostly
    device-bound, mostly host-bound, balanced, with and without copies, A with and without a
    host job."""
    from apex_mini.predictor import _replay
    rng = random.Random(7)
    for trial in range(2000):
        u = lambda: rng.choice([0.0, rng.uniform(0, 1), rng.uniform(0, 0.01)])
        host_b = (u(), rng.uniform(1e-3, 1), u())
        host_a = (0.0, 0.0, 0.0) if trial % 4 == 0 else (u(), rng.uniform(1e-3, 1), u())
        args = (u(), u(), u(), host_a, u(), u(), host_b)
        layers = rng.choice([1, 2, 3, 7, 32])
        expected = pipeline_by_events(layers, *args)
        assert _replay(layers, *args) == pytest.approx(expected, rel=1e-9, abs=1e-12), (layers, args)
        assert _replay(layers, *args, extrapolate=False) == pytest.approx(expected, rel=1e-9,
                                                                          abs=1e-12)


def test_iteration_time_from_table_points():
    p = sample_profile()
    pred = Predictor(p)
    shape = BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024)
    expected = 4 * (2e-3 + 8e-4) + interp1(p.lm_head, 8) + p.overhead
    assert pred.iteration_time(shape, Strategy.GPU_ONLY) == pytest.approx(expected)
    # Overlap on a real device: the host side (rows down, worker job, output up) hides behind
    # the device's attention, or the device's behind it, whichever is longer.
    both = BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024, n_cpu_decodes=1, cpu_decode_kv=64)
    row = p.bytes_per_token_row
    host = interp1(p.d2h, row) + p.host_job_s + 1e-3 + interp1(p.h2d, row * pred.up_share)
    expected = 4 * (interp1(p.linear, 9) + max(8e-4, host)) + interp1(p.lm_head, 9) + p.overhead
    assert pred.iteration_time(both, Strategy.OVERLAP) == pytest.approx(expected)
    assert pred.breakdown(both, Strategy.OVERLAP)["total_s"] == pytest.approx(expected)


def test_host_rows_are_priced_by_the_runners_own_row_copies_where_measured():
    """On an H200 the block-copy tables (a swap's) cost 1.1 ms at their smallest size, so
    pricing a layer's few KB of host rows with them put 70 ms of copies in every Llama-2-7B
    iteration with one host request (measured: 63 to 77 ms in all). A profile that measured
    the runner's row copies (`rows_d2h`, `rows_h2d`) prices them with those; an older one, or
    the simulator's, still with d2h and h2d."""
    shape = BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024, n_cpu_decodes=2, cpu_decode_kv=128)
    slow_blocks = dict(d2h=[[1 << 18, 1e-3], [1 << 22, 1.1e-3]],
                       h2d=[[1 << 18, 1.2e-3], [1 << 22, 1.3e-3]])
    old = Predictor(sample_profile(**slow_blocks))
    rows = dict(rows_d2h=[[512, 2e-5], [8192, 3e-5]], rows_h2d=[[256, 1e-5], [4096, 2e-5]])
    new = Predictor(sample_profile(**slow_blocks, **rows))
    row = 512                                                  # sample_profile's row bytes
    assert old.breakdown(shape, Strategy.OVERLAP)["xfer_s"] == pytest.approx(
        4 * (interp1(slow_blocks["d2h"], 2 * row) + interp1(slow_blocks["h2d"], 2 * row * old.up_share)))

    def copies(n):                      # one layer's copies of n host rows, down and up
        return interp1(rows["rows_d2h"], n * row) + interp1(rows["rows_h2d"], n * row * new.up_share)
    assert new.breakdown(shape, Strategy.OVERLAP)["xfer_s"] == pytest.approx(4 * copies(2))
    # Pipelined, each sub-batch sends its own host row.
    assert new.breakdown(shape, Strategy.PIPELINE)["xfer_s"] == pytest.approx(4 * 2 * copies(1))
    assert new.iteration_time(shape, Strategy.OVERLAP) < old.iteration_time(shape, Strategy.OVERLAP)


def test_host_prefill_rows_send_only_their_k_and_v_down():
    """A host-tier prefill row's K/V go down to be appended on the host; its attention runs on
    the device, so its q does not (8 query heads, 2 KV heads: 4 of the row's 12 head-rows)."""
    model = {"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64}
    p = sample_profile(key={"device": "cuda", "block_size": 16, "model": model})
    pred = Predictor(p)
    shape = BatchShape(prefill_tokens=(10,), n_host_prefill_tokens=10)
    assert pred.breakdown(shape, Strategy.OVERLAP)["xfer_s"] == pytest.approx(
        4 * interp1(p.d2h, 10 * p.bytes_per_token_row * 4 / 12))


def test_a_host_chunk_pays_for_bringing_its_cached_prefix_up():
    """A host-tier chunk after the first attends on the device to its cached prefix, copied up
    from the host pool every layer: its K and V bytes (4 of a row's 12 head-rows here) at the
    h2d table's speed, on the device's side of the overlap, and not at all on a CPU."""
    model = {"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64}
    p = sample_profile(key={"device": "cuda", "block_size": 16, "model": model})
    first = BatchShape(prefill_tokens=(64,), prefill_context=(64,), n_host_prefill_tokens=64)
    later = dataclasses.replace(first, prefill_context=(1064,), host_prefill_prefix=1000)
    up = interp1(p.h2d, 1000 * p.bytes_per_token_row * 4 / 12)
    for strategy in (Strategy.OVERLAP, Strategy.PIPELINE):
        a, b = (Predictor(p).breakdown(s, strategy) for s in (first, later))
        assert b["xfer_s"] - a["xfer_s"] == pytest.approx(4 * up)
        assert b["total_s"] > a["total_s"]
    on_cpu = Predictor(sample_profile(key={"device": "cpu", "block_size": 16, "model": model}))
    assert on_cpu.breakdown(later, Strategy.OVERLAP)["xfer_s"] == 0.0


def test_decode_only_iterations_come_from_their_measured_table():
    """A decode-only, device-only plan runs the static decode step: the `decode_iteration`
    table predicts it whole (at the bucketed batch), plus swaps; any other plan still adds up
    the per-layer pieces."""
    table = [[1, 64, 1e-3], [1, 1024, 2e-3], [8, 1024, 4e-3], [8, 8192, 9e-3]]
    p = sample_profile(decode_iteration=table)
    pred = Predictor(p, bucket_decode=True)
    assert pred.iteration_time(BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024),
                               Strategy.GPU_ONLY) == pytest.approx(4e-3)
    # 5 rows pad to 8; 5 sequences of 128 tokens read 640 rows of KV.
    five = BatchShape(n_gpu_decodes=5, gpu_decode_kv=640, gpu_decode_max_kv=128)
    assert pred.iteration_time(five, Strategy.GPU_ONLY) == pytest.approx(Grid2D(table)(8, 640))
    swapping = BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024, swap_in_blocks=2)
    assert pred.iteration_time(swapping, Strategy.GPU_ONLY) == pytest.approx(
        4e-3 + interp1(p.h2d, 2 * p.kv_block_bytes))
    with_prefill = BatchShape(prefill_tokens=(16,), prefill_context=(16,), n_gpu_decodes=8,
                              gpu_decode_kv=1024)
    assert pred.iteration_time(with_prefill, Strategy.GPU_ONLY) == pytest.approx(
        Predictor(sample_profile(), bucket_decode=True).iteration_time(with_prefill, Strategy.GPU_ONLY))


def test_cpu_device_overlap_is_additive():
    key = {"device": "cpu", "block_size": 16}
    both = BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024, n_cpu_decodes=8, cpu_decode_kv=1024)
    on_gpu = Predictor(sample_profile()).breakdown(both, Strategy.OVERLAP)
    on_cpu = Predictor(sample_profile(key=key)).breakdown(both, Strategy.OVERLAP)
    assert on_cpu["xfer_s"] == 0.0                       # the runner copies nothing
    assert on_cpu["layers_s"] == pytest.approx(on_cpu["linear_s"] + on_cpu["gpu_decode_attn_s"]
                                               + on_cpu["cpu_decode_attn_s"])
    assert on_gpu["layers_s"] < on_gpu["linear_s"] + on_gpu["gpu_decode_attn_s"] + on_gpu["cpu_decode_attn_s"]


def test_pipeline_reads_weights_twice_and_hides_cpu_work():
    pred = Predictor(sample_profile())
    shape = BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024, n_cpu_decodes=8, cpu_decode_kv=1024)
    pipe = pred.breakdown(shape, Strategy.PIPELINE)
    merged = pred.breakdown(shape, Strategy.OVERLAP)
    assert pipe["linear_s"] > merged["linear_s"]
    assert pipe["layers_s"] >= pipe["linear_s"]
    # A lone host decode is not split by the runner: predicted as overlap.
    lone = BatchShape(n_cpu_decodes=1, cpu_decode_kv=64)
    assert pred.iteration_time(lone, Strategy.PIPELINE) == pred.iteration_time(lone, Strategy.OVERLAP)


# ------------------------------------------------------------------------------- error report

class Rec:
    def __init__(self, shape, strategy, measured):
        self.shape, self.plan, self.measured_s = shape, Plan(strategy=strategy), measured


def test_error_report_math():
    pred = Predictor(sample_profile())
    shape = BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024)
    t = pred.iteration_time(shape, Strategy.GPU_ONLY)
    errors = [0.0, 0.1, 0.2, 0.3, 0.5]
    recs = [Rec(shape, Strategy.GPU_ONLY, t / (1 + e)) for e in errors]       # |t - m| / m = e
    both = BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024, n_cpu_decodes=2, cpu_decode_kv=128)
    t2 = pred.iteration_time(both, Strategy.OVERLAP)
    recs += [Rec(both, Strategy.OVERLAP, t2 / 0.8)]                            # e = 0.2
    report = pred.error_report(recs)
    assert report["n"] == 6
    assert report["median_rel_error"] == pytest.approx(0.2)
    assert report["p90_rel_error"] == pytest.approx(0.5)       # nearest rank: the 6th of 6
    g = report["by_strategy"]["gpu-only"]
    assert g["n"] == 5 and g["median_rel_error"] == pytest.approx(0.2)
    assert g["p90_rel_error"] == pytest.approx(0.5)
    assert report["by_strategy"]["overlap"]["median_rel_error"] == pytest.approx(0.2)
    assert pred.error_report([])["median_rel_error"] is None


# ------------------------------------------------------------------------------- feedback

def test_feedback_correction_is_the_median_of_recent_ratios():
    fb = Feedback(window=4, min_seen=3)
    assert fb.correction() == 1.0
    fb.observe(1.0, 2.0)
    fb.observe(1.0, 2.0)
    assert fb.correction() == 1.0                          # too few to go by
    fb.observe(1.0, 50.0)                                  # one stalled iteration...
    assert fb.correction() == 2.0                          # ...does not move the median
    for _ in range(4):
        fb.observe(2.0, 1.0)                               # the machine got faster
    assert fb.correction() == 0.5                          # the window forgot the old ratios
    fb.observe(0.0, 1.0)                                   # nothing predicted: ignored
    assert fb.correction() == 0.5


def test_predictor_feedback_scales_every_plan_alike():
    """Observed iterations 1.5x the tables: every prediction, whatever its path, is 1.5x the
    tables' (so no comparison between candidate plans changes); without feedback, none is."""
    table = [[1, 64, 1e-3], [1, 1024, 2e-3], [8, 1024, 4e-3], [8, 8192, 9e-3]]
    pred = Predictor(sample_profile(decode_iteration=table), bucket_decode=True, feedback=True)
    decode = BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024)
    both = BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024, n_cpu_decodes=2, cpu_decode_kv=128)
    assert pred.path(decode, Strategy.GPU_ONLY) == "decode step"
    assert pred.path(both, Strategy.OVERLAP) == "overlap"
    assert pred.path(both, Strategy.PIPELINE) == "pipeline"
    before = {s: pred.iteration_time(both, s) for s in Strategy}
    for _ in range(MIN_SEEN):
        pred.observe(decode, Strategy.GPU_ONLY, 1.5 * 4e-3)   # 1.5x the table, every time
    assert pred.iteration_time(decode, Strategy.GPU_ONLY) == pytest.approx(1.5 * 4e-3)
    for s in Strategy:
        assert pred.iteration_time(both, s) == pytest.approx(1.5 * before[s])
    b = pred.breakdown(both, Strategy.OVERLAP)
    assert b["table_s"] == pytest.approx(before[Strategy.OVERLAP])
    assert b["total_s"] == pytest.approx(b["table_s"] * b["correction"])

    plain = Predictor(sample_profile(decode_iteration=table), bucket_decode=True)
    for _ in range(MIN_SEEN):
        plain.observe(decode, Strategy.GPU_ONLY, 1.5 * 4e-3)
    assert plain.iteration_time(decode, Strategy.GPU_ONLY) == pytest.approx(4e-3)


def test_engine_scores_the_prediction_it_made_before_each_iteration():
    """Each record keeps the prediction asked for before its iteration ran (the first one, with
    nothing observed yet, is the tables' own), and every iteration reaches the feedback."""
    from apex_mini.engine import Engine
    from apex_mini.sampling import SamplingParams
    model = random_model("tiny", torch.float32, "cpu")
    cfg = EngineConfig(device="cpu", dtype="float32", policy="apex", gpu_kv_blocks=8, cpu_kv_blocks=64)
    engine = Engine(model, cfg)
    try:
        for n in (5, 9, 3):
            engine.add_request(list(range(3, 3 + n)), SamplingParams(temperature=0.0, max_tokens=6))
        while engine.has_work():
            engine.step()
    finally:
        engine.close()
    pred, records = engine.predictor, engine.records
    assert pred.feedback is not None and all(r.plan.predicted_s is not None for r in records)
    first = records[0]
    assert first.plan.predicted_s == pytest.approx(pred.breakdown(first.shape, first.plan.strategy)["table_s"])
    assert len(pred.feedback.ratios) == min(len(records), WINDOW)
    last = records[-1]
    table_s = pred.breakdown(last.shape, last.plan.strategy)["table_s"]
    assert pred.feedback.ratios[-1] == pytest.approx(last.measured_s / table_s)
    report = pred.error_report(records)
    assert report["n"] == len(records) and report["tables_only"]["n"] == len(records)


# ------------------------------------------------------------------------------- on this machine

def test_engine_profiles_once_then_reuses(monkeypatch):
    from apex_mini.engine import Engine
    model = random_model("tiny", torch.float32, "cpu")
    cfg = EngineConfig(device="cpu", dtype="float32", policy="apex", gpu_kv_blocks=8, cpu_kv_blocks=64)
    first = Engine(model, cfg)
    first.close()
    path = profiler.cache_path(profiler.engine_key(first))
    assert path.is_file() and first.predictor.profile.source == "measured"
    p = first.predictor.profile
    assert p.overhead >= 0 and p.linear and p.cpu_decode_attn and p.kv_block_bytes
    # The runner's own host-row copies, keyed by their bytes: q + k + v rows down, output up.
    mc, grid = model.config, profiler.QUICK
    up_row = mc.num_attention_heads * mc.head_dim * 4
    assert [x for x, _ in p.rows_d2h] == [r * p.bytes_per_token_row for r in grid.rows]
    assert [x for x, _ in p.rows_h2d] == [r * up_row for r in grid.rows]
    assert all(t > 0 for _, t in p.rows_d2h + p.rows_h2d)

    def boom(*a, **k):
        raise AssertionError("profiled again")
    monkeypatch.setattr(profiler, "profile_engine", boom)
    second = Engine(model, cfg)
    second.close()
    assert second.predictor.profile == Profile.from_json(path)


def fake_profiling(monkeypatch, tmp_path):
    """Profiling returns sample_profile() under the engine's own key at once, saved in a cache
    of this test's own (so no other test reuses the fake)."""
    monkeypatch.setenv("APEX_MINI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(profiler, "profile_engine",
                        lambda engine, grid, progress: sample_profile(key=profiler.engine_key(engine)))


@pytest.mark.parametrize("feedback", [True, False])
def test_engine_predictor_follows_the_feedback_option(feedback, monkeypatch, tmp_path):
    """predictor_feedback reaches the predictor the engine builds: off, it has no feedback and
    observing a slow iteration leaves every prediction at the tables'."""
    from apex_mini.engine import Engine
    fake_profiling(monkeypatch, tmp_path)
    model = random_model("tiny", torch.float32, "cpu")
    cfg = EngineConfig(device="cpu", dtype="float32", policy="apex", gpu_kv_blocks=8,
                       cpu_kv_blocks=64, predictor_feedback=feedback)
    engine = Engine(model, cfg)
    engine.close()
    pred = engine.predictor
    assert (pred.feedback is not None) == feedback
    shape = BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024)
    table_s = pred.breakdown(shape, Strategy.OVERLAP)["table_s"]
    for _ in range(MIN_SEEN):
        pred.observe(shape, Strategy.OVERLAP, 2 * table_s)
    assert pred.iteration_time(shape, Strategy.OVERLAP) == pytest.approx(
        2 * table_s if feedback else table_s)


def test_profile_report_without_feedback(monkeypatch, tmp_path):
    """`profile --report --no-predictor-feedback`: the report's predictor has no feedback, so
    every prediction it scored is the tables' own."""
    from apex_mini.profile import main
    fake_profiling(monkeypatch, tmp_path)
    out = tmp_path / "report.json"
    assert main(["--model-shape", "tiny", "--device", "cpu", "--quick", "--report",
                 "--no-predictor-feedback", "--json", str(out), "--requests", "2",
                 "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["feedback"] is None and report["n"] > 0
    assert report["points"] and all(p["predicted_ms"] == p["table_ms"] for p in report["points"])


def test_the_report_warms_up_on_every_prompt_of_its_workload(monkeypatch, tmp_path):
    """The untimed warm-up run sees every prompt the timed runs will (a few tokens each), so
    their prefill sizes are not first met while timed."""
    from apex_mini import profile
    fake_profiling(monkeypatch, tmp_path)
    runs = []                                   # per engine made: (prompt, max_tokens) added
    make_engine = profile.make_engine

    def recording(model, cfg, run, predictor):
        engine = make_engine(model, cfg, run, predictor)
        added, add = [], engine.add_request
        runs.append(added)
        engine.add_request = lambda ids, params: added.append((ids, params.max_tokens)) or add(
            ids, params)
        return engine
    monkeypatch.setattr(profile, "make_engine", recording)
    assert profile.main(["--model-shape", "tiny", "--device", "cpu", "--quick", "--report",
                         "--requests", "6", "--no-progress"]) == 0
    warm, timed = runs[0], runs[1]              # the warm-up, then apex
    assert len(runs) == 1 + len(profile.REPORT_RUNS) and len(timed) == 6
    assert [ids for ids, _ in warm] == [ids for ids, _ in timed]
    assert [n for _, n in warm] == [min(n, profile.WARMUP_TOKENS) for _, n in timed]


def test_profile_cli_report(tmp_path, capsys):
    """The predictor's error on this machine, through the profile CLI; shown, not asserted."""
    from apex_mini.profile import main
    out = tmp_path / "report.json"
    assert main(["--model-shape", "tiny", "--device", "cpu", "--quick", "--reuse", "--report",
                 "--json", str(out), "--requests", "6", "--no-progress", "--show", "3"]) == 0
    report = json.loads(out.read_text())
    assert report["n"] > 0 and set(report["by_strategy"]) >= {"gpu-only", "overlap", "pipeline"}
    assert report["tables_only"]["n"] == report["n"] and report["feedback"]
    assert report["command"].startswith("python -m apex_mini.profile --model-shape tiny")
    assert report["date"] and report["machine"]["cpu_cores"]
    assert report["decisions"] and all(d["predicted_ms"] > 0 for d in report["decisions"])
    with capsys.disabled():
        print(f"\npredictor on this machine (tiny shape): median error "
              f"{100 * report['median_rel_error']:.1f}%, p90 {100 * report['p90_rel_error']:.1f}% "
              f"over {report['n']} iterations")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_and_report_on_cuda(tmp_path):
    """CUDA events, pinned copies and the copy stream in the profiler; the report on a GPU."""
    from apex_mini.profile import main
    out = tmp_path / "report.json"
    assert main(["--model-shape", "tiny", "--device", "cuda", "--dtype", "float16", "--quick",
                 "--report", "--json", str(out), "--requests", "6", "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["profile_key"]["device"] == "cuda" and report["n"] > 0
    print(f"predictor on {report['profile_key']['device_name']}: median error "
          f"{100 * report['median_rel_error']:.1f}%")


def test_error_report_skips_non_finite_times():
    """A NaN or infinite measured time, or a non-finite prediction, is skipped like a zero one:
    one such record would otherwise turn the median and p90 into NaN or inf."""
    pred = Predictor(sample_profile())
    shape = BatchShape(n_gpu_decodes=8, gpu_decode_kv=1024)
    t = pred.iteration_time(shape, Strategy.GPU_ONLY)
    good = Rec(shape, Strategy.GPU_ONLY, t / 1.25)                          # e = 0.25
    bad = [Rec(shape, Strategy.GPU_ONLY, m) for m in (float("nan"), float("inf"), 0.0, -1.0)]
    for predicted in (float("nan"), float("inf")):
        rec = Rec(shape, Strategy.GPU_ONLY, t)
        rec.plan.predicted_s = predicted
        bad.append(rec)
    report = pred.error_report([good, *bad])
    assert report["n"] == report["tables_only"]["n"] == 1
    assert report["median_rel_error"] == pytest.approx(0.25)
    assert report["by_strategy"]["gpu-only"]["p90_rel_error"] == pytest.approx(0.25)


def test_an_iteration_that_captures_a_graph_is_neither_learned_from_nor_scored(monkeypatch,
                                                                               tmp_path):
    """On an H200 a decode step that captured a CUDA graph took 57 to 104 ms against 7 to 8 a
    replay: 15 such steps made the report's p90 error 87%, and the feedback, taking two among
    three iterations for the machine's pace, predicted the next steps up to 13x too slow. Such a
    step is recorded as `captured_graph`, never reaches the feedback, and is counted apart."""
    from apex_mini.engine import Engine
    from apex_mini.sampling import SamplingParams
    fake_profiling(monkeypatch, tmp_path)
    model = random_model("tiny", torch.float32, "cpu")
    cfg = EngineConfig(device="cpu", dtype="float32", policy="apex", gpu_kv_blocks=64,
                       cpu_kv_blocks=64)
    engine = Engine(model, cfg)
    engine.runner.graphs = CapturingGraphs(engine.runner.decode_step)
    observed = []
    monkeypatch.setattr(engine.predictor, "observe", lambda *args: observed.append(args[2]))
    try:
        for n in (3, 5, 9):                       # decodes of 3, then 2, then 1 request
            engine.add_request(list(range(3, 3 + 4 * n)),
                               SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        while engine.has_work():
            engine.step()
    finally:
        engine.close()
    captured = [r for r in engine.records if r.captured_graph]
    assert len(captured) == engine.runner.graphs.num_graphs >= 2
    assert all(r.measured_s >= CapturingGraphs.CAPTURE_S for r in captured)
    assert sorted(observed) == sorted(r.measured_s for r in engine.records if not r.captured_graph)
    report = engine.predictor.error_report(engine.records)
    assert report["graph_captures"]["n"] == len(captured)
    assert report["graph_captures"]["measured_s"] == pytest.approx(
        sum(r.measured_s for r in captured))
    assert report["n"] == report["tables_only"]["n"] == len(engine.records) - len(captured)


def test_the_report_says_how_many_iterations_captured_a_graph():
    from apex_mini.profile import format_report
    report = Predictor(sample_profile()).error_report([])
    report["graph_captures"] = {"n": 2, "measured_s": 0.19}
    report["decisions"] = [{"predicted_ms": 7.7, "measured_ms": 104.1, "plan": "gpu-only: ...",
                            "reason": "apex: no host work", "captured_graph": True}]
    text = format_report(report)
    assert "not scored: 2 iterations that captured a CUDA graph (190 ms in all" in text
    assert text.splitlines()[-1].endswith("[apex: no host work] (captured a CUDA graph)")
