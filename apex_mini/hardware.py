"""An analytic hardware model: GPU, host and link figures turned into a `Profile`.

The simulator never times anything. Each cost is a roofline, max(bytes / bandwidth,
FLOPs / FLOP rate) times stated efficiencies, plus fixed per-kernel or per-call costs, and the
results fill the same tables the profiler measures (see cost_tables.py). The real `Predictor`
then reads them, so the scheduler cannot tell a simulated machine from a measured one.

Units: GB = 1e9 bytes, GB/s, TFLOP/s, seconds. Times in the tables are per decoder layer except
lm_head (whole model) and overhead (per iteration).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .cost_tables import Profile


# Figures that must be > 0 (a rate, a size or a share), and those where 0 is meaningful (a fixed
# cost of nothing, no reserve); every figure is a finite number, `cores` an integer.
POSITIVE = {"memory_gb", "mem_bw_gbps", "tflops", "pcie_gbps", "bw_efficiency", "flop_efficiency",
            "link_efficiency", "cores", "core_bw_gbps", "core_gflops", "kv_memory_gb"}
NON_NEGATIVE = {"kernel_s", "call_s", "iteration_overhead_s", "reserve_gb"}


def _check_figures(obj, prefix: str = "") -> None:
    """ValueError naming the first figure of a spec that is not a finite number in its range."""
    for f in dataclasses.fields(obj):
        if f.name not in POSITIVE | NON_NEGATIVE:
            continue
        value = getattr(obj, f.name)
        whole = f.name == "cores"
        ok = (isinstance(value, numbers.Integral if whole else numbers.Real)
              and not isinstance(value, bool) and math.isfinite(value))
        ok = ok and (value > 0 if f.name in POSITIVE else value >= 0)
        if not ok:
            kind = "an integer" if whole else "a finite number"
            bound = ">= 1" if whole else "> 0" if f.name in POSITIVE else ">= 0"
            raise ValueError(f"{prefix}{f.name}={value!r} must be {kind} {bound}")


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gb: float            # device memory, GB
    mem_bw_gbps: float          # peak memory bandwidth, GB/s
    tflops: float               # peak dense fp16/bf16 TFLOP/s
    pcie_gbps: float            # host link, GB/s each way
    bw_efficiency: float = 0.8       # achieved share of peak bandwidth in streaming kernels
    flop_efficiency: float = 0.6     # achieved share of peak FLOP/s in matmuls
    link_efficiency: float = 0.8     # achieved share of the link's bandwidth
    kernel_s: float = 5e-6           # fixed cost of one kernel (launch and tail), s

    def __post_init__(self) -> None:
        _check_figures(self, "gpu.")


@dataclass(frozen=True)
class HostSpec:
    name: str
    mem_bw_gbps: float          # peak memory bandwidth, GB/s
    cores: int                  # cores running host attention
    core_bw_gbps: float = 10.0       # streaming bandwidth one core can pull, GB/s
    core_gflops: float = 40.0        # attention FLOP/s one core sustains, GFLOP/s
    bw_efficiency: float = 0.7       # achieved share of peak bandwidth
    kv_memory_gb: float = 64.0       # host memory given to the KV cache, GB
    call_s: float = 20e-6            # fixed cost of one attention call (wake the workers), s

    def __post_init__(self) -> None:
        _check_figures(self, "host.")


@dataclass(frozen=True)
class Hardware:
    gpu: GPUSpec
    host: HostSpec
    iteration_overhead_s: float = 2e-3   # scheduling, input preparation, sampling sync, s
    reserve_gb: float = 1.0              # device memory kept for activations and context, GB

    def __post_init__(self) -> None:
        _check_figures(self)

    @property
    def name(self) -> str:
        return f"{self.gpu.name}+{self.host.name}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Hardware":
        expected = ('expected {"gpu": {name, memory_gb, mem_bw_gbps, tflops, pcie_gbps, ...}, '
                    '"host": {name, mem_bw_gbps, cores, ...}, "iteration_overhead_s": ...}')
        if not isinstance(data, dict):
            raise ValueError(f"bad hardware description (a {type(data).__name__}, not an "
                             f"object); {expected}")
        try:
            gpu, host = GPUSpec(**data["gpu"]), HostSpec(**data["host"])
            rest = {k: v for k, v in data.items() if k not in ("gpu", "host")}
            return cls(gpu, host, **rest)
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad hardware description ({e}); {expected}") from None


# Datasheet figures (memory, peak memory bandwidth, dense fp16 TFLOP/s, PCIe bandwidth each way);
# efficiencies are the dataclass defaults unless said.
GPUS = {
    "t4": GPUSpec("T4", memory_gb=16, mem_bw_gbps=320, tflops=65, pcie_gbps=16),
    "a10": GPUSpec("A10", memory_gb=24, mem_bw_gbps=600, tflops=125, pcie_gbps=32),
    # 4.3 of 4.8 TB/s measured in copies, 790 of 990 TFLOP/s measured in bf16 matmuls
    "h200": GPUSpec("H200", memory_gb=141, mem_bw_gbps=4800, tflops=990, pcie_gbps=64,
                    bw_efficiency=0.9, flop_efficiency=0.8),
}
HOSTS = {
    # 8 channels of DDR4-3200 (25.6 GB/s each), 32 cores
    "server-ddr4": HostSpec("server-ddr4", mem_bw_gbps=205, cores=32),
    # 2 channels of DDR4-3200, 8 cores
    "desktop-ddr4": HostSpec("desktop-ddr4", mem_bw_gbps=51.2, cores=8, kv_memory_gb=24),
    # 12 channels of DDR5-4800 (38.4 GB/s each), 64 cores
    "server-ddr5": HostSpec("server-ddr5", mem_bw_gbps=460, cores=64, kv_memory_gb=256),
}


def load_hardware(path: str | Path) -> Hardware:
    """A custom machine from JSON, or YAML when pyyaml is installed (same keys as to_dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hardware file {str(path)!r} not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("YAML hardware files need pyyaml; install it or write JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"hardware file {str(path)!r} is not valid YAML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None
    try:
        return Hardware.from_dict(data)
    except ValueError as e:
        raise ValueError(f"hardware file {str(path)!r}: {e}") from None


# --------------------------------------------------------------------------------------- costs

def _layer_params(mc: ModelConfig) -> int:
    q = mc.num_attention_heads * mc.head_dim
    kv = mc.num_key_value_heads * mc.head_dim
    return mc.hidden_size * (2 * q + 2 * kv) + 3 * mc.hidden_size * mc.intermediate_size


def weight_bytes(mc: ModelConfig, itemsize: int) -> int:
    """All weights: decoder layers, embedding, and the LM head unless tied."""
    embed = mc.vocab_size * mc.hidden_size
    head = 0 if mc.tie_word_embeddings else embed
    return itemsize * (mc.num_hidden_layers * _layer_params(mc) + embed + head)


def kv_capacity_tokens(hw: Hardware, mc: ModelConfig, itemsize: int) -> tuple[int, int]:
    """(device, host) KV capacity in tokens: device memory minus weights minus the reserve."""
    per_token = mc.kv_bytes_per_token(itemsize)
    device = hw.gpu.memory_gb * 1e9 - weight_bytes(mc, itemsize) - hw.reserve_gb * 1e9
    return max(0, int(device // per_token)), int(hw.host.kv_memory_gb * 1e9 // per_token)


class CostModel:
    """Per-layer costs of one model on one machine (seconds)."""

    def __init__(self, hw: Hardware, mc: ModelConfig, itemsize: int = 2):
        self.hw, self.mc, self.b = hw, mc, itemsize
        g, h = hw.gpu, hw.host
        self.gpu_bw = g.mem_bw_gbps * 1e9 * g.bw_efficiency                 # bytes/s
        self.gpu_flops = g.tflops * 1e12 * g.flop_efficiency                # FLOP/s
        self.link_bw = g.pcie_gbps * 1e9 * g.link_efficiency                # bytes/s
        self.host_bw = min(h.mem_bw_gbps * h.bw_efficiency, h.cores * h.core_bw_gbps) * 1e9
        self.host_flops = h.cores * h.core_gflops * 1e9
        self.q_dim = mc.num_attention_heads * mc.head_dim
        self.kv_dim = mc.num_key_value_heads * mc.head_dim

    def _gpu(self, nbytes: float, flops: float, kernels: int) -> float:
        return max(nbytes / self.gpu_bw, flops / self.gpu_flops) + kernels * self.hw.gpu.kernel_s

    def linear(self, tokens: int) -> float:
        """QKV, O and MLP for `tokens` rows: weights read once, activations in and out."""
        p = _layer_params(self.mc)
        acts = tokens * (4 * self.mc.hidden_size + 3 * self.mc.intermediate_size) * self.b
        return self._gpu(p * self.b + acts, 2 * p * tokens, kernels=8)

    def prefill_attn(self, tokens: int) -> float:
        """Causal attention of one prompt chunk: half of the tokens x tokens score matrix."""
        flops = 2 * tokens * tokens * self.q_dim
        return self._gpu(tokens * (2 * self.q_dim + 2 * self.kv_dim) * self.b, flops, kernels=2)

    def _decode_bytes_flops(self, n_seqs: int, kv_tokens: int) -> tuple[float, float]:
        nbytes = kv_tokens * 2 * self.kv_dim * self.b + n_seqs * 2 * self.q_dim * self.b
        return nbytes, 4 * kv_tokens * self.q_dim

    def gpu_decode_attn(self, n_seqs: int, kv_tokens: int) -> float:
        nbytes, flops = self._decode_bytes_flops(n_seqs, kv_tokens)
        return self._gpu(nbytes, flops, kernels=2)

    def cpu_decode_attn(self, n_seqs: int, kv_tokens: int) -> float:
        nbytes, flops = self._decode_bytes_flops(n_seqs, kv_tokens)
        return max(nbytes / self.host_bw, flops / self.host_flops)   # + host.call_s per job

    def copy(self, nbytes: int) -> float:
        """One copy over the link, either way."""
        return 10e-6 + nbytes / self.link_bw

    def lm_head(self, rows: int) -> float:
        """Final norm, LM head and sampling over fp32 logits, whole model."""
        w = self.mc.vocab_size * self.mc.hidden_size
        return self._gpu(w * self.b + rows * self.mc.vocab_size * 4, 2 * w * rows, kernels=4)


def _powers(lo: int, hi: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, ... from lo up to the first value >= hi."""
    out, x = [], 1
    while True:
        for v in (x, 3 * x // 2):
            if v >= lo and (not out or v > out[-1]):
                out.append(v)
        if out and out[-1] >= hi:
            return out
        x *= 2


def analytic_profile(hw: Hardware, mc: ModelConfig, itemsize: int = 2, model_name: str = "",
                     block_size: int = 16, max_tokens: int = 16384, max_seqs: int = 1024,
                     max_kv_tokens: int | None = None) -> Profile:
    """The tables the profiler would measure on `hw`, computed; source 'analytic:<name>'."""
    cost = CostModel(hw, mc, itemsize)
    kv_hi = max_kv_tokens or max(sum(kv_capacity_tokens(hw, mc, itemsize)), 1 << 16)
    tokens, seqs, kvs = _powers(1, max_tokens), _powers(1, max_seqs), _powers(16, kv_hi)
    row_bytes = (cost.q_dim + 2 * cost.kv_dim) * itemsize
    # Copies from one row (q, k, v) up to a swap of 64k tokens' KV; the predictor extrapolates.
    swap_hi = mc.kv_bytes_per_token(itemsize) << 16
    copies = _powers(row_bytes, max(row_bytes * max_seqs * 4, swap_hi))
    model = {k: getattr(mc, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "head_dim",
                                         "vocab_size")}
    key = {"model": {"name": model_name, **model}, "dtype_bytes": itemsize,
           "device": f"simulated {hw.gpu.name}", "host": hw.host.name, "block_size": block_size,
           "hardware": hw.name}
    return Profile(
        key=key, num_layers=mc.num_hidden_layers,
        linear=[[t, cost.linear(t)] for t in tokens],
        prefill_attn=[[t, cost.prefill_attn(t)] for t in tokens],
        gpu_decode_attn=[[n, k, cost.gpu_decode_attn(n, k)] for n in seqs for k in kvs],
        cpu_decode_attn=[[n, k, cost.cpu_decode_attn(n, k)] for n in seqs for k in kvs],
        d2h=[[c, cost.copy(c)] for c in copies], h2d=[[c, cost.copy(c)] for c in copies],
        lm_head=[[r, cost.lm_head(r)] for r in tokens],
        overhead=hw.iteration_overhead_s, bytes_per_token_row=row_bytes,
        kv_block_bytes=mc.kv_bytes_per_token(itemsize) * block_size,
        host_job_s=hw.host.call_s, source=f"analytic:{hw.name}")
