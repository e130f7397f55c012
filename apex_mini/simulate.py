"""`python -m apex_mini.simulate`: the real scheduler and policies on a simulated machine.

    python -m apex_mini.simulate --gpu t4 --model llama2-7b --workload chat --num-requests 200
    python -m apex_mini.simulate --gpu custom --hardware my_box.json --policies gpu-only,apex
    python -m apex_mini.simulate --calibrate-from profile.json --model weights/apex-tiny-llama ...

A discrete-event loop with no tensors: requests are released at their arrival times, the real
`Scheduler` plans each iteration with the real policy and `Predictor`, and the simulated clock
advances by that plan's cost. The cost comes from the same kind of tables the predictor reads:
an analytic hardware model (hardware.py), or, with --calibrate-from, tables measured by
`python -m apex_mini.profile`. The clock is the predictor on those tables (plus swap copies and
an optional --noise term), so the simulator checks *scheduling decisions*, batch sizes and
memory pressure under a cost model; it cannot reveal the predictor's own errors, which only a
measured run (`bench serve`) shows. Every finished request gets dummy token 3, never EOS.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from . import metrics, workloads
from .cli import (ArgumentParser, check_input_file, check_number, check_output_path,
                  policy_list, read_json_arg, run_cli)
from .config import EngineConfig, ModelConfig
from .cost_tables import BatchShape, Profile
from .hardware import (GPUS, HOSTS, Hardware, analytic_profile, kv_capacity_tokens, load_hardware,
                       weight_bytes)
from .kv_cache import BlockManager
from .plan import Plan
from .policies import make_policy
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import CPU, GPU, Sequence
from .weights import MODEL_SHAPES

DUMMY_TOKEN = 3
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
# Engine options that mean nothing without tensors, or that the simulator sets itself.
SKIPPED_FLAGS = ("device", "dtype", "policy", "cpu_threads", "compile_cpu_attention",
                 "cuda_graphs", "compile_decode", "profile_path", "gpu_memory_gb", "cpu_kv_gb")


@dataclass
class Machine:
    """What a simulation runs on: cost tables and the two tiers' KV capacities."""

    profile: Profile
    gpu_blocks: int
    cpu_blocks: int
    kv_bytes_per_block: int
    max_model_len: int
    description: dict


def build_machine(mc: ModelConfig, cfg: EngineConfig, itemsize: int, hw: Hardware | None = None,
                  profile: Profile | None = None, model_name: str = "") -> Machine:
    """Capacities as the engine sizes them: device memory minus weights and a reserve (or
    --gpu-kv-blocks), host memory for KV (or --cpu-kv-blocks), never more than every running
    request at full length could use. The reserve is the hardware's fixed `reserve_gb` (1 GB
    by default), not the engine's sum of worst cases (device_memory.py: 1.5 GiB for
    Llama-2-7B fp16 with the default options), so that the published comparisons keep one
    stated assumption; pass --gpu-kv-blocks to simulate the engine's own sizing."""
    bs = cfg.block_size
    max_len = cfg.context_length(mc)
    most = cfg.max_num_seqs * -(-max_len // bs)
    if hw is not None:
        dev_tokens, host_tokens = kv_capacity_tokens(hw, mc, itemsize)
        if dev_tokens < bs and not cfg.gpu_kv_blocks:
            name, weights = model_name or "the model", weight_bytes(mc, itemsize) / 1e9
            room = hw.gpu.memory_gb - weights - hw.reserve_gb
            if room <= 0:
                raise ValueError(f"{name} does not fit on {hw.gpu.name}: weights take "
                                 f"{weights:.2f} GB of {hw.gpu.memory_gb} GB, with "
                                 f"{hw.reserve_gb} GB reserved")
            block_gb = mc.kv_bytes_per_token(itemsize) * bs / 1e9
            raise ValueError(f"one KV block of --block-size {bs} tokens takes {block_gb:.2f} GB "
                             f"but {name} on {hw.gpu.name} leaves {room:.2f} GB for the KV cache "
                             "(after its weights and the reserve); lower --block-size")
        profile = profile or analytic_profile(hw, mc, itemsize, model_name, bs)
        description = {"name": hw.name, **hw.to_dict()}
    else:
        if not (cfg.gpu_kv_blocks and cfg.cpu_kv_blocks):
            raise ValueError("--calibrate-from needs --gpu-kv-blocks and --cpu-kv-blocks (the same "
                             "values the measured run used)")
        dev_tokens = host_tokens = 0
        description = {"name": f"measured profile ({profile.source})", "profile_key": profile.key}
    gpu_blocks = cfg.gpu_kv_blocks or min(most, dev_tokens // bs)
    cpu_blocks = cfg.cpu_kv_blocks or min(most, host_tokens // bs)
    block_bytes = mc.kv_bytes_per_token(itemsize) * bs
    if not profile.kv_block_bytes:                   # swaps cost what this cache's blocks weigh
        profile = dataclasses.replace(profile, kv_block_bytes=block_bytes)
    return Machine(profile, gpu_blocks, cpu_blocks, block_bytes, max_len, description)


class Clock:
    """The simulated cost of one plan: the predictor on the machine's own tables (swap copies
    included), times (1 + noise * N(0, 1)) when --noise is set."""

    def __init__(self, predictor, noise: float = 0.0, seed: int = 0):
        self.predictor, self.noise = predictor, noise
        self.rng = random.Random(seed)

    def cost(self, plan: Plan) -> float:
        t = self.predictor.iteration_time(BatchShape.from_plan(plan), plan.strategy)
        if self.noise:
            t *= max(0.05, 1.0 + self.noise * self.rng.gauss(0.0, 1.0))
        return t


def make_scheduler(name: str, machine: Machine, cfg: EngineConfig):
    """(predictor, a fresh `Scheduler` running policy `name` on `machine`'s two tiers)."""
    from .predictor import Predictor

    predictor = Predictor(machine.profile, bucket_decode=cfg.bucket_decode)
    policy = make_policy(name, cfg, predictor)
    host_blocks = machine.cpu_blocks if policy.uses_host else 1      # as the engine does
    sched = Scheduler(policy, BlockManager(machine.gpu_blocks, cfg.block_size, GPU),
                      BlockManager(max(1, host_blocks), cfg.block_size, CPU), cfg.max_num_seqs,
                      cfg.max_num_batched_tokens, machine.max_model_len)
    return predictor, sched


def simulate_policy(name: str, specs: list[workloads.RequestSpec], machine: Machine,
                    cfg: EngineConfig, noise: float = 0.0, seed: int = 0, progress: bool = False,
                    scheduler_time: bool = False) -> dict:
    """Run every request through policy `name` on `machine`; returns its metrics row. With
    `scheduler_time`, the wall time this process spends in `schedule()` and `finish()` is added
    to the clock, as a real engine spends it between forwards."""
    predictor, sched = make_scheduler(name, machine, cfg)
    clock, now = Clock(predictor, noise, seed), 0.0
    pending, seqs, tally = collections.deque(specs), [], metrics.IterationTally()
    bar = tqdm(total=len(specs), desc=f"simulate {name}", unit="req", disable=not progress,
               leave=False)
    while pending or sched.has_work():
        while pending and pending[0].arrival_s <= now:
            spec = pending.popleft()
            seq = Sequence(len(seqs), [DUMMY_TOKEN] * spec.prompt_len,
                           SamplingParams(max_tokens=spec.output_len, ignore_eos=True),
                           seed=len(seqs), arrival_time=spec.arrival_s)
            sched.add(seq)
            seqs.append(seq)
        if not sched.has_work():
            now = pending[0].arrival_s                   # idle until the next arrival
            continue
        t0 = time.perf_counter()
        plan = sched.schedule()
        planning = time.perf_counter() - t0
        if plan.is_empty and not plan.swaps:
            raise RuntimeError(f"{name}: the scheduler made no progress; this is a bug")
        cost = clock.cost(plan)                      # costed before finish() moves the state
        fresh = [s for s, n in plan.scheduled if s.first_token_time is None]
        outputs = sum(s.num_computed + n >= s.num_tokens for s, n in plan.scheduled)
        t0 = time.perf_counter()
        done = sched.finish(plan, [DUMMY_TOKEN] * outputs)
        planning += time.perf_counter() - t0
        now += cost + (planning if scheduler_time else 0.0)
        for s in fresh:                              # restamp on the simulated clock
            if s.first_token_time is not None:
                s.first_token_time = now
        for s in done:
            s.finish_time = now
        tally.add(plan)
        bar.update(len(done))
    bar.close()
    sched.check_integrity()
    return metrics.summarize(seqs, 0.0, tally, sched.num_preemptions, sched.num_swaps,
                             sched.num_parks)


def resolve_model(name: str) -> tuple[ModelConfig, str]:
    """A shape name from weights.MODEL_SHAPES, or a folder with a Hugging Face config.json."""
    if name in MODEL_SHAPES:
        return MODEL_SHAPES[name], name
    if "/" in name or name.startswith("."):
        return ModelConfig.from_hf(name), name.rstrip("/").split("/")[-1]
    raise ValueError(f"unknown model {name!r}; give a shape ({', '.join(MODEL_SHAPES)}) or a "
                     "checkpoint folder")


def model_from_key(key: dict) -> tuple[ModelConfig, str]:
    """The model shape a measured profile's key records (its context length is not recorded:
    pass --model or --max-model-len when it matters)."""
    shape = dict(key.get("model") or {})
    shape.pop("name", None)
    try:
        return ModelConfig(**shape), "profiled model"
    except TypeError:
        raise ValueError("the profile's key lacks the model shape; pass --model") from None


def resolve_hardware(args) -> Hardware:
    if args.hardware:
        hw = load_hardware(args.hardware)
    elif args.gpu == "custom":
        raise ValueError("--gpu custom needs --hardware FILE.json")
    else:
        hw = Hardware(GPUS[args.gpu or "t4"], HOSTS[args.cpu or "server-ddr4"])
    host = {k: v for k, v in (("mem_bw_gbps", args.cpu_mem_gbps), ("cores", args.cpu_cores),
                              ("kv_memory_gb", args.host_kv_gb)) if v is not None}
    gpu = {"memory_gb": args.device_memory_gb} if args.device_memory_gb is not None else {}
    extra = {"iteration_overhead_s": args.overhead_ms / 1e3} if args.overhead_ms is not None else {}
    return dataclasses.replace(hw, gpu=dataclasses.replace(hw.gpu, **gpu),
                               host=dataclasses.replace(hw.host, **host), **extra)


# ------------------------------------------------------------------------------ input checks
# Each raises ValueError with one line naming the flag, before any long work (the generic ones
# are cli.py's).

PROFILE_FILE = "a profile JSON from `python -m apex_mini.profile --out FILE`"
REPORT_FILE = "a report JSON from `python -m apex_mini.bench serve --json FILE`"


def load_profile_arg(path: str, flag: str = "--calibrate-from") -> Profile:
    """A measured profile, checked before the simulation runs."""
    data = read_json_arg(path, flag, PROFILE_FILE)
    if not isinstance(data, dict):
        what = f"holds a JSON {type(data).__name__}"
    elif missing := [k for k in ("key", "num_layers", "linear") if k not in data]:
        what = f"lacks {', '.join(missing)}"
    elif not isinstance(data["key"], dict):
        what = "has a key that is not an object"
    else:
        what = None
    if what:
        raise ValueError(f"{flag} {path} is not a profile (it {what}); give {PROFILE_FILE}")
    try:
        return Profile.from_json(path)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    except TypeError as e:
        raise ValueError(f"{flag} {path} is not a profile ({e}); give {PROFILE_FILE}") from None


def load_report_arg(path: str, policies: list[str], flag: str = "--compare-to") -> dict:
    """A measured `bench serve` report with a throughput for at least one of `policies`."""
    data = read_json_arg(path, flag, REPORT_FILE)
    rows = data.get("policies") if isinstance(data, dict) else None
    if not isinstance(rows, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("throughput_tok_s"), (int, float))
            for r in rows.values()):
        what = ("has no 'policies' rows with throughput_tok_s" if isinstance(data, dict)
                else f"holds a JSON {type(data).__name__}")
        raise ValueError(f"{flag} {path} is not a bench serve report (it {what}); give "
                         f"{REPORT_FILE}")
    if not set(rows) & set(policies):
        raise ValueError(f"{flag} {path} measured {', '.join(rows) or 'no policy'}, none of "
                         f"--policies {','.join(policies)}; run a policy it measured")
    return data


def check_trace_arg(args) -> None:
    """--trace, when --workload trace reads it (otherwise make_workload says it is unused)."""
    if args.trace and args.workload == "trace":
        check_input_file(args.trace, "--trace", 'a JSONL file of {"arrival_s": s, "prompt_len": '
                         'n, "output_len": n} lines')


def check_flags(args) -> None:
    """The simulator's own figures and machine (the engine options are EngineConfig's to
    check)."""
    check_number(args.cpu_mem_gbps, "--cpu-mem-gbps", positive=True)
    check_number(args.cpu_cores, "--cpu-cores", positive=True, whole=True)
    check_number(args.host_kv_gb, "--cpu-kv-gb", positive=True)
    check_number(args.device_memory_gb, "--gpu-memory-gb", positive=True)
    check_number(args.overhead_ms, "--overhead-ms", positive=False)
    check_number(args.noise, "--noise", positive=False)
    for flag, preset in (("--gpu", args.gpu), ("--cpu", args.cpu)):
        if args.hardware and preset not in (None, "custom"):
            raise ValueError(f"{flag} {preset} and --hardware {args.hardware} both describe the "
                             f"machine; drop {flag} (the file describes GPU and host) or "
                             "--hardware")


def check_requests_fit(specs: list[workloads.RequestSpec], policies: list[str], machine: Machine,
                       cfg: EngineConfig, hint: str) -> None:
    """Every request's whole KV must fit one tier each policy uses (else the scheduler refuses
    it mid-run, with the engine's hint); `hint` names this tool's flags."""
    longest = max(specs, key=lambda s: s.total_len)
    for name in policies:
        _, sched = make_scheduler(name, machine, cfg)
        if sched.policy.uses_host and machine.cpu_blocks < 1:
            raise ValueError(f"the host tier holds no KV block ({machine.kv_bytes_per_block} "
                             f"bytes) but policy {name} keeps KV there; raise --cpu-kv-gb, pass "
                             "--cpu-kv-blocks, or run --policies gpu-only")
        sched.check_capacity(longest.prompt_len, longest.output_len,
                             f"the longest request (policy {name})", hint)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m apex_mini.simulate",
                       description="\n\n".join(__doc__.split("\n\n")[:2]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", choices=(*GPUS, "custom"),
                   help="GPU preset (default: t4, or custom with --hardware); custom reads "
                   "--hardware")
    p.add_argument("--hardware", help="JSON (or YAML, with pyyaml) hardware description with the "
                   "keys of hardware.Hardware, GPU and host both: --gpu custom (default: none, "
                   "the presets)")
    p.add_argument("--cpu", choices=HOSTS,
                   help="host preset (default: server-ddr4; with --hardware, the file's host)")
    p.add_argument("--cpu-mem-gbps", type=float, help="override the host's memory bandwidth, "
                   "GB/s (> 0; default: the preset's)")
    p.add_argument("--cpu-cores", type=int, help="override the host cores running attention (>= 1; "
                   "default: the preset's)")
    # Their own dests: EngineConfig has fields of these names, which the simulator skips.
    p.add_argument("--cpu-kv-gb", dest="host_kv_gb", metavar="CPU_KV_GB", type=float,
                   help="override host memory for the KV cache, GB (> 0; the host policies need "
                   "room for at least one block; default: the preset's)")
    p.add_argument("--gpu-memory-gb", dest="device_memory_gb", metavar="GPU_MEMORY_GB",
                   type=float, help="override the GPU's memory, GB (> 0; default: the "
                   "preset's)")
    p.add_argument("--overhead-ms", type=float, help="override the per-iteration overhead, ms "
                   "(>= 0; 0: none; default: the preset's)")
    p.add_argument("--model", help="model shape name or checkpoint folder (default: llama2-7b, or "
                   "the shape in --calibrate-from's profile)")
    p.add_argument("--dtype", dest="sim_dtype", choices=ITEMSIZE, help="weight and KV dtype "
                   "(default: float16, or the profile's)")
    p.add_argument("--calibrate-from", help="a measured profile JSON: simulate with its tables "
                   "instead of the analytic model (needs --gpu-kv-blocks and --cpu-kv-blocks; "
                   "default: none, the analytic model)")
    p.add_argument("--scheduler-time", action="store_true", help="add the scheduler's own wall "
                   "time on this machine to each iteration (for validation against bench serve; "
                   "default: off)")
    p.add_argument("--compare-to", help="a `bench serve` JSON of the same workload: print and "
                   "record simulated vs measured throughput per policy (default: none)")
    p.add_argument("--noise", type=float, default=0.0, help="relative std-dev of a Gaussian term "
                   "on each iteration's time (>= 0; default: 0, no noise)")
    workloads.add_cli_flags(p, default_requests=200)
    metrics.add_cli_flags(p)
    EngineConfig.add_cli_flags(p, skip=SKIPPED_FLAGS)
    return p


CAPACITY_HINT = ("lower --length-scale, or raise --gpu-kv-blocks / --cpu-kv-blocks (or "
                 "--gpu-memory-gb / --cpu-kv-gb)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Every input is checked here, before the simulation: a bad one costs no run.
    policies = policy_list(args.policies)
    check_flags(args)
    for flag in ("json", "markdown", "plot"):
        check_output_path(getattr(args, flag), f"--{flag}")
    if args.plot:
        from .bench_plot import check_plot
        check_plot()
    cfg = EngineConfig.from_cli(args)
    check_trace_arg(args)
    check_input_file(args.hardware, "--hardware", "a JSON or YAML hardware description")
    measured = load_report_arg(args.compare_to, policies) if args.compare_to else None
    specs = workloads.from_args(args, cfg.seed)
    if args.calibrate_from:
        profile = load_profile_arg(args.calibrate_from)
        mc, model_name = resolve_model(args.model) if args.model else model_from_key(profile.key)
        dtype = args.sim_dtype or profile.key.get("dtype", "float16")
        if dtype not in ITEMSIZE:
            raise ValueError(f"--calibrate-from {args.calibrate_from} records dtype {dtype!r}; "
                             f"pass --dtype ({', '.join(ITEMSIZE)})")
        machine = build_machine(mc, cfg, ITEMSIZE[dtype], profile=profile)
    else:
        mc, model_name = resolve_model(args.model or "llama2-7b")
        dtype = args.sim_dtype or "float16"
        machine = build_machine(mc, cfg, ITEMSIZE[dtype], hw=resolve_hardware(args),
                                model_name=model_name)
    workloads.check_fits(specs, machine.max_model_len)
    check_requests_fit(specs, policies, machine, cfg, CAPACITY_HINT)
    rows = {name: simulate_policy(name, specs, machine, cfg, args.noise, cfg.seed,
                                  not args.no_progress, args.scheduler_time) for name in policies}
    workload = {"name": args.workload, "rate": args.rate, "length_scale": args.length_scale,
                **workloads.describe(specs)}
    model = {"name": model_name, "dtype": dtype}
    hardware = {**machine.description, "gpu_kv_blocks": machine.gpu_blocks,
                "cpu_kv_blocks": machine.cpu_blocks, "block_size": cfg.block_size}
    rep = metrics.report(rows, workload, model, hardware, "apex_mini.simulate", argv,
                         simulated=True)
    if measured is not None:
        rep["validation"] = {"measured": args.compare_to,
                             "policies": metrics.compare(rep, measured)}
    metrics.publish(rep, args, f"simulated: {hardware['name']}, {model_name}, {args.workload}")
    if measured is not None:
        print(metrics.compare_markdown(rep["validation"]["policies"]))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
