"""The paged KV cache: one pure-Python `BlockManager` class and one `KVPool` class, each
instantiated once per tier (device and host).

Pool layout, the same in both tiers: per layer, a K and a V tensor of

    [num_blocks, block_size, num_kv_heads, head_dim]

Token t of a sequence lives in block `table[t // block_size]` at offset `t % block_size`, i.e.
at flat slot `table[t // block_size] * block_size + t % block_size` of a layer's K (or V) seen
as `[num_blocks * block_size, num_kv_heads, head_dim]`.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
import weakref

import torch

from .streams import Streams


class BlockManager:
    """Hands out the blocks of one tier.

    Invariants (checked by `check_integrity`): every block is either free or owned by exactly
    one sequence; a sequence's table holds exactly `ceil(num_tokens / block_size)` blocks.
    """

    def __init__(self, num_blocks: int, block_size: int, name: str = ""):
        self.num_blocks, self.block_size, self.name = num_blocks, block_size, name
        # Pop from the end: low block ids are handed out first, which keeps small runs readable.
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.num_tokens: dict[int, int] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def extra_blocks_for(self, seq_id: int, num_tokens: int) -> int:
        """Blocks `seq_id` must gain to hold `num_tokens` tokens (0 if it already has room)."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, self.blocks_needed(num_tokens) - have)

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.extra_blocks_for(seq_id, num_tokens) <= self.num_free

    def grow(self, seq_id: int, num_tokens: int) -> list[int]:
        """Make room for `num_tokens` tokens in total; returns the sequence's table."""
        extra = self.extra_blocks_for(seq_id, num_tokens)
        if extra > self.num_free:
            raise MemoryError(f"{self.name} KV tier: need {extra} blocks, {self.num_free} free")
        table = self.tables.setdefault(seq_id, [])
        for _ in range(extra):
            table.append(self.free_blocks.pop())
        self.num_tokens[seq_id] = max(num_tokens, self.num_tokens.get(seq_id, 0))
        return table

    def free(self, seq_id: int) -> list[int]:
        """Release every block of `seq_id`; returns them (their contents stay until reused)."""
        table = self.tables.pop(seq_id, [])
        self.num_tokens.pop(seq_id, None)
        self.free_blocks.extend(reversed(table))
        return table

    def owns(self, seq_id: int) -> bool:
        return seq_id in self.tables

    def check_integrity(self) -> None:
        owned = [b for table in self.tables.values() for b in table]
        every = owned + self.free_blocks
        assert len(every) == self.num_blocks, f"{self.name}: {len(every)} blocks tracked of {self.num_blocks}"
        assert sorted(every) == list(range(self.num_blocks)), f"{self.name}: a block is leaked or shared"
        for seq_id, table in self.tables.items():
            assert len(table) == self.blocks_needed(self.num_tokens[seq_id]), \
                f"{self.name}: seq {seq_id} holds {len(table)} blocks for {self.num_tokens[seq_id]} tokens"


HOST_REGISTER_PORTABLE = 1      # cudaHostRegisterPortable: page-locked for every CUDA device


def pin_in_place(t: torch.Tensor, device: torch.device | None = None) -> None:
    """Page-lock a contiguous host tensor's memory where it lies (cudaHostRegister, portable,
    called on `device`: no context is started on another GPU), so that copies to and from the
    GPU can be asynchronous. Raises OSError where CUDA refuses, having reset the CUDA
    runtime's last error (`reset_cuda_last_error`): torch's next checked kernel launch would
    otherwise report it as its own, and a caller could not try again with a smaller pool.

    `pin_memory=True` would do it through torch's caching host allocator, which rounds every
    allocation up to a power of two: a 300 MB layer of a 7B model's host pool would hold 512 MB
    of page-locked RAM, up to 2x the `cpu_kv_gb` asked for."""
    nbytes = t.numel() * t.element_size()
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes,
                                                       HOST_REGISTER_PORTABLE))
    if err:
        reset_cuda_last_error()
        raise OSError(f"CUDA could not page-lock {nbytes / 2**20:.0f} MiB of host memory for the "
                      f"host KV pool (cudaError {err}); lower --cpu-kv-gb or --cpu-kv-blocks")


def cuda_runtime_library() -> ctypes.CDLL | None:
    """The CUDA runtime library torch has loaded (found in this process's memory maps; Linux),
    or None: torch's `cudart()` bindings have no cudaGetLastError."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/libcudart" in line})
    except OSError:
        return None
    for path in paths:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def reset_cuda_last_error() -> int:
    """Read and clear this thread's CUDA runtime last error (cudaGetLastError): the error code,
    or -1 where the runtime library cannot be found (a torch linked to it statically)."""
    lib = cuda_runtime_library()
    return -1 if lib is None else int(lib.cudaGetLastError())


def unpin(pointers: list[int]) -> None:
    """Undo `pin_in_place` for these data pointers (errors ignored: this runs in finalizers)."""
    for ptr in pointers:
        try:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        except (AttributeError, RuntimeError):
            pass


class KVPool:
    """The tensors behind one tier: for every layer, one K and one V tensor of
    [num_blocks, block_size, num_kv_heads, head_dim]. Host pools are pinned when CUDA is
    present (`pin`; registered on `cuda_device`, the engine's), so copies to and from the
    device can be asynchronous.

    Separate tensors, not views of one big one, because torch.compile must be able to write a
    layer's K in place: Inductor copies a whole tensor before writing into one that aliases
    other inputs.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str, pin: bool = False,
                 cuda_device: torch.device | None = None):
        self.block_size, self.num_blocks, self.dtype = block_size, num_blocks, dtype
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        if not pin:
            self.layers = [tuple(torch.zeros(shape, dtype=dtype, device=device) for _kv in range(2))
                           for _layer in range(num_layers)]
            return
        # Pinned host pool: page-locked in place, at its exact size (see `pin_in_place`).
        self.layers = [tuple(torch.zeros(shape, dtype=dtype) for _kv in range(2))
                       for _layer in range(num_layers)]
        registered: list[int] = []
        try:
            for kv in self.layers:
                for t in kv:
                    pin_in_place(t, cuda_device)
                    registered.append(t.data_ptr())
        except AttributeError:      # a torch without the cudart binding: its own allocator
            unpin(registered)
            self.layers = [tuple(t.pin_memory() for t in kv) for kv in self.layers]
            registered = []
        except OSError:
            unpin(registered)
            raise
        # Unregistered when the pool is collected, before its tensors' memory is freed.
        weakref.finalize(self, unpin, registered)

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.layers[layer_idx]

    def read_blocks(self, blocks: torch.Tensor, pin: bool = False) -> torch.Tensor:
        """Copy of whole blocks, every layer: [num_layers, 2 (k, v), len(blocks), block_size,
        num_kv_heads, head_dim], in pinned memory if `pin`. `blocks` is a tensor of block ids
        on this pool's device."""
        k0 = self.layers[0][0]
        out = torch.empty((len(self.layers), 2, len(blocks), *k0.shape[1:]), dtype=self.dtype,
                          device=self.device, pin_memory=pin)
        for l, kv in enumerate(self.layers):
            for j, cache in enumerate(kv):
                torch.index_select(cache, 0, blocks, out=out[l, j])
        return out

    def write_blocks(self, blocks: torch.Tensor, data: torch.Tensor) -> None:
        """The inverse of read_blocks: data [num_layers, 2, len(blocks), ...] into `blocks`."""
        for l, kv in enumerate(self.layers):
            for j, cache in enumerate(kv):
                cache.index_copy_(0, blocks, data[l, j])

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


class GatherBuffers(threading.local):
    """Per-thread K and V buffers that the CPU's eager attention paths (the decode step's, the
    host tier's eager kernel) gather whole KV blocks into, kept between calls and grown to the
    largest call. A fresh tensor of that size comes from the OS as new pages, zeroed when first
    touched, and on the benchmark machine that cost more than the gather itself (2-3x the whole
    eager kernel at 1k-4k tokens x 8-32 sequences). A thread must be done with one call's
    buffers before it asks for the next."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def take(self, cache: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `num_blocks` blocks of a K and a V buffer whose blocks are shaped like
        `cache`'s ([block_size, num_kv_heads, head_dim], same dtype and device)."""
        k = self.k
        if (k is None or k.shape[0] < num_blocks or k.shape[1:] != cache.shape[1:]
                or k.dtype != cache.dtype or k.device != cache.device):
            self.k = torch.empty((num_blocks, *cache.shape[1:]), dtype=cache.dtype,
                                 device=cache.device)
            self.v = torch.empty_like(self.k)
        return self.k[:num_blocks], self.v[:num_blocks]


# Most bytes one layer's decode attention gathers (K; as much again for V), or its prefill
# attention's scores hold, at once: a bound the engine's memory reserve counts on.
GATHER_BYTES = 128 << 20


def rows_per_gather(batch: int, width: int, block_bytes: int, limit: int = GATHER_BYTES) -> int:
    """Rows whose gathered context (width blocks of block_bytes each) fits in `limit` bytes:
    all `batch` rows when they fit, else the largest power of two that does (at least 1)."""
    fits = max(1, limit // max(1, width * block_bytes))
    return batch if fits >= batch else 1 << (fits.bit_length() - 1)


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """cache[blocks] for a 1-D tensor of block ids: [len(blocks), block_size, num_kv_heads,
    head_dim], written into `out` (a `GatherBuffers` slice) when given."""
    if out is None:
        return cache.index_select(0, blocks)
    return torch.index_select(cache, 0, blocks, out=out)


def slots_for(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat slot ids of tokens [start, end) of a sequence with block table `table`."""
    return [table[t // block_size] * block_size + t % block_size for t in range(start, end)]


def copy_blocks(src: KVPool, src_blocks: list[int], dst: KVPool, dst_blocks: list[int],
                streams: Streams) -> None:
    """Copy whole blocks (all layers, k and v) between tiers, bit for bit.

    On CUDA the transfer runs on the copy stream after the compute stream's pending work, and
    the compute stream waits for it before its next kernel. The host side is staged through a
    pinned buffer so the copy can be asynchronous; this call returns once the host pool holds
    its data.
    """
    if not src_blocks:
        return
    assert len(src_blocks) == len(dst_blocks)
    with streams.copy_after_compute():
        # Made on the copy stream, so the allocator cannot reuse them before it is done.
        src_idx = torch.tensor(src_blocks, device=src.device)
        dst_idx = torch.tensor(dst_blocks, device=dst.device)
        # Host side of a host-to-device move: gather straight into pinned memory.
        gather_pinned = src.device.type == "cpu" and streams.pin
        moved = src.read_blocks(src_idx, pin=gather_pinned)  # [L, 2, n, block_size, KVH, D]
        if moved.device != dst.device:
            staged = torch.empty(moved.shape, dtype=moved.dtype, device=dst.device,
                                 pin_memory=dst.device.type == "cpu" and streams.pin)
            staged.copy_(moved, non_blocking=streams.is_cuda)
            moved = staged
        if dst.device.type == "cpu":
            streams.copy_stream_sync()                        # the host scatter needs the bytes
        dst.write_blocks(dst_idx, moved)
    streams.compute_waits_for_copy()
