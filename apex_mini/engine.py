"""The engine: builds the pieces, then loops schedule -> execute -> finish.

The scheduler plans, the runner executes, and the engine only connects them, keeps the
measured iteration times (for the predictor's error report) and tells the predictor each one
(its feedback correction, feedback.py).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from .config import EngineConfig
from .cost_tables import BatchShape
from .cpu_attention import compile_enabled, precompile
from .cpu_worker import CPUAttentionWorker
from .decode_step import DecodeStep
from .device_memory import activation_reserve
from .kv_cache import BlockManager, KVPool
from .packed_linear import available_memory_bytes
from .plan import Plan
from .policies import make_policy
from .runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import CPU, GPU, Sequence
from .streams import Streams
from .weights import resolve_device, resolve_dtype

CPU_DEVICE_KV_BYTES = 1 << 30            # device-tier KV budget when the "device" is the CPU


@dataclass
class IterationRecord:
    plan: Plan
    measured_s: float
    shape: BatchShape | None = None    # the plan as it was scheduled (its requests move on)
    # It captured a CUDA graph (a decode shape's first step): a one-time cost, 57 to 104 ms for
    # Llama-2-7B on an H200 against 7 to 8 ms a replay. The feedback does not learn from it and
    # the error report scores it apart (predictor.py).
    captured_graph: bool = False


class Engine:
    def __init__(self, model, cfg: EngineConfig, tokenizer=None, predictor=None,
                 progress: bool = True):
        self.cfg = cfg
        self.model = model
        self.model_config = mc = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.tokenizer = tokenizer
        self.max_model_len = cfg.context_length(mc)
        self.policy_name = resolve_policy(cfg.policy, self.device)
        self.streams = Streams(self.device)
        self.reserve: dict[str, int] | None = None   # set where free memory sizes the pool
        self._build_cache()
        # One decode step per engine, shared by its runners (the profiler's too): its packed
        # weights are a copy, and its compiled graph or weight packing need doing only once.
        self.decode_step = DecodeStep(model, self.gpu_pool, cfg.block_size, self.scratch_block,
                                      compile=cfg.compile_decode, prepack=cfg.prepack_weights)
        self.predictor = predictor
        if self.policy_name in ("neo", "apex") and predictor is None:
            from .profiler import predictor_for_engine
            self.predictor = predictor_for_engine(self, progress=progress)   # may profile
        self.policy = make_policy(self.policy_name, cfg, self.predictor)
        eos = tokenizer.eos_ids if tokenizer is not None else mc.eos_token_ids
        self.scheduler = Scheduler(self.policy, self.gpu_blocks, self.cpu_blocks, cfg.max_num_seqs,
                                   cfg.max_num_batched_tokens, self.max_model_len, tuple(eos))
        self.worker = CPUAttentionWorker(cfg.cpu_threads, device=self.device)
        self.runner = self.make_runner(self.worker)
        if self.policy.uses_host and self.runner.compile_cpu_attention:
            # The host kernel's graphs now, on the worker (its guards include the thread's
            # torch thread count), rather than stalling the first requests decoded on the host.
            k_cache, v_cache = self.cpu_pool.layer(0)
            self.worker.submit(precompile, k_cache, v_cache, mc.num_attention_heads,
                               self.max_model_len).result()
        self.records: list[IterationRecord] = []
        self.closed = False
        self._ids = itertools.count()

    def _build_cache(self) -> None:
        cfg, mc = self.cfg, self.model_config
        per_block = KVPool.bytes_per_block(mc.num_hidden_layers, cfg.block_size,
                                           mc.num_key_value_heads, mc.head_dim, self.dtype)
        # Never more blocks than every running request at full length could use.
        most = cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)
        gpu_blocks = cfg.gpu_kv_blocks or min(most, self._device_kv_bytes() // per_block)
        if gpu_blocks < 1:
            reserve = (f" and a {self.reserve['total'] / 2**30:.2f} GiB activation reserve (it "
                       f"grows with --max-num-seqs, --max-num-batched-tokens and --max-model-len)"
                       if self.reserve else "")
            raise ValueError(f"no device memory is left for the KV cache after the weights{reserve}; "
                             f"raise --gpu-memory-gb or pass --gpu-kv-blocks")
        uses_host = self.policy_name != "gpu-only"
        cpu_blocks = cfg.cpu_kv_blocks or min(most, int(cfg.cpu_kv_gb * (1 << 30)) // per_block)
        if uses_host and cpu_blocks < 1:
            raise ValueError(f"--cpu-kv-gb {cfg.cpu_kv_gb} holds no KV block ({per_block} bytes); "
                             f"raise it, pass --cpu-kv-blocks, or use --policy gpu-only")
        cpu_blocks = cpu_blocks if uses_host else 1
        self._check_pools_fit(gpu_blocks + 1, cpu_blocks, per_block)
        self.kv_bytes_per_block = per_block
        # One extra device block that no request owns: padded decode rows write there.
        self.scratch_block = gpu_blocks
        pool_args = (mc.num_hidden_layers, cfg.block_size, mc.num_key_value_heads, mc.head_dim,
                     self.dtype)
        self.gpu_pool = KVPool(pool_args[0], gpu_blocks + 1, *pool_args[1:], device=self.device)
        self.cpu_pool = KVPool(pool_args[0], cpu_blocks, *pool_args[1:], device="cpu",
                               pin=self.streams.pin, cuda_device=self.device)
        self.gpu_blocks = BlockManager(gpu_blocks, cfg.block_size, GPU)
        self.cpu_blocks = BlockManager(cpu_blocks, cfg.block_size, CPU)

    def _check_pools_fit(self, device_blocks: int, host_blocks: int, per_block: int) -> None:
        """Refuse, before allocating them, pools the memory cannot hold: torch would fail with a
        long allocator error, or the OS kill the process once their pages are touched."""
        on_cpu = self.device.type == "cpu"
        host = (host_blocks + (device_blocks if on_cpu else 0)) * per_block
        free = available_memory_bytes()
        if free is not None and host > free:
            flags = ["--gpu-kv-blocks (on a CPU that pool is host memory too)"] if on_cpu else []
            flags += ["--cpu-kv-gb or --cpu-kv-blocks"] if self.policy_name != "gpu-only" else []
            raise ValueError(f"the KV pools need {host / 1e9:.1f} GB of host memory but "
                             f"{free / 1e9:.1f} GB is available; lower {', '.join(flags)}")
        if not on_cpu:
            free, _ = torch.cuda.mem_get_info(self.device)
            if device_blocks * per_block > free:
                raise ValueError(f"the device KV pool needs {device_blocks * per_block / 1e9:.1f}"
                                 f" GB but {free / 1e9:.1f} GB of device memory is free; lower "
                                 "--gpu-kv-blocks")

    def make_runner(self, worker) -> ModelRunner:
        """A runner with this engine's model, pools, decode step and options, on `worker` (the
        profiler times real iterations with a runner of its own, before the engine's exists)."""
        cfg = self.cfg
        runner = ModelRunner(self.model, self.device, self.gpu_pool, self.cpu_pool, worker,
                             self.streams, cfg.block_size, self.scratch_block,
                             cfg.compile_cpu_attention and compile_enabled(), cfg.bucket_decode,
                             self.decode_step)
        if self.device.type == "cuda" and cfg.cuda_graphs:
            from .cuda_graphs import CudaGraphDecoder
            runner.graphs = CudaGraphDecoder(runner.decode_step)
        return runner

    def _device_kv_bytes(self) -> int:
        """Bytes the device KV pool may take: `gpu_memory_gb` (or, on CUDA, free memory) less
        the weights and, on CUDA, the activation reserve, which it records in `self.reserve`
        (for the error message when nothing is left, and for the CUDA tests)."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if self.device.type != "cuda":
            limit = self.cfg.gpu_memory_gb
            return int(limit * (1 << 30)) - weights if limit else CPU_DEVICE_KV_BYTES
        cfg = self.cfg
        # Kept free for what iterations allocate and release (device_memory.py).
        self.reserve = activation_reserve(
            self.model_config, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len,
            cfg.block_size, self.dtype.itemsize, cfg.cuda_graphs)
        reserve = self.reserve["total"]
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = free - reserve
        if cfg.gpu_memory_gb:
            budget = min(budget, int(cfg.gpu_memory_gb * (1 << 30)) - weights - reserve)
        return max(0, budget)

    # ---------------------------------------------------------------- requests

    def check_request(self, token_ids: list[int], params: SamplingParams,
                      what: str = "the request") -> None:
        """Raise ValueError unless this request can run: a non-empty prompt of vocabulary ids,
        shorter than the model's context, whose KV fits in a tier (`what` names it)."""
        if not token_ids:
            raise ValueError(f"{what} has an empty prompt; give some text or token ids")
        vocab = self.model_config.vocab_size
        not_ids = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int)]
        if not_ids:
            raise ValueError(f"{what} has {not_ids[0]!r} among its token ids, which must be "
                             "integers (a text prompt is one str)")
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} has token id {bad[0]!r} outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"{what} has {len(token_ids)} prompt tokens but the model's context "
                             f"is {self.max_model_len}; shorten the prompt")
        self.scheduler.check_capacity(len(token_ids), params.max_tokens, what)

    def add_request(self, token_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue one request (checked first: see check_request); it runs from the next step."""
        token_ids = list(token_ids)
        self.check_request(token_ids, params)
        seq_id = next(self._ids)
        seed = params.seed if params.seed is not None else hash((self.cfg.seed, seq_id)) & (2**62 - 1)
        seq = Sequence(seq_id, list(token_ids), params, seed=seed)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request that has not finished (its KV blocks are freed); finished: no-op."""
        self.scheduler.abort(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> tuple[Plan, list[Sequence]]:
        """One iteration. Returns the plan it ran and the requests that finished."""
        if self.closed:
            raise RuntimeError("this engine is closed (close() was called); build a new one")
        plan = self.scheduler.schedule()
        shape = BatchShape.from_plan(plan)
        if plan.predicted_s is None and self.predictor is not None:   # a policy that asks none
            plan.predicted_s = self.predictor.iteration_time(shape, plan.strategy)
        graphs_before = self._graphs_captured()
        start = time.perf_counter()
        try:
            tokens = self.runner.execute(plan, self.block_tables())
        except BaseException:
            # Host attention handed to the worker may still be writing K/V into host blocks:
            # let it end before a caller frees (and a next call reuses) those blocks.
            self.worker.drain()
            raise
        measured = time.perf_counter() - start
        if not plan.is_empty:
            captured = self._graphs_captured() > graphs_before
            self.records.append(IterationRecord(plan, measured, shape, captured))
            if len(self.records) > self.cfg.max_records:   # a record holds its requests
                keep = max(1, self.cfg.max_records // 2)     # the newer half
                del self.records[:len(self.records) - keep]
            observe = getattr(self.predictor, "observe", None)   # injected fakes may lack it
            if observe is not None and not captured:
                observe(shape, plan.strategy, measured)
        if plan.is_empty and not plan.swaps and self.has_work():
            raise RuntimeError("the scheduler made no progress; this is a bug")
        return plan, self.scheduler.finish(plan, tokens)

    def _graphs_captured(self) -> int:
        """CUDA graphs the runner has captured so far (0 without graphs)."""
        graphs = self.runner.graphs
        return graphs.num_graphs if graphs is not None else 0

    def block_tables(self) -> dict[str, dict[int, list[int]]]:
        return {GPU: self.gpu_blocks.tables, CPU: self.cpu_blocks.tables}

    def close(self) -> None:
        """Let the worker's queued tasks finish and join its threads. Idempotent; the engine
        takes no more steps."""
        self.closed = True
        self.worker.close()


def resolve_policy(name: str, device: torch.device) -> str:
    if name == "auto":
        return "apex" if device.type == "cuda" else "gpu-only"
    return name


def load_engine(model_dir: str, cfg: EngineConfig, predictor=None) -> Engine:
    from .tokenizer import Tokenizer
    from .weights import load_model
    from .config import ModelConfig

    device = resolve_device(cfg.device)
    mc = ModelConfig.from_hf(model_dir)
    dtype = resolve_dtype(cfg.dtype, mc, device)
    model = load_model(model_dir, dtype, device)
    tokenizer = Tokenizer.from_dir(model_dir, eos_ids=mc.eos_token_ids)
    return Engine(model, cfg, tokenizer, predictor)
