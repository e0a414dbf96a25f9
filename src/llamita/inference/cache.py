"""The engine's KV cache: one slot per sequence, each holding `seq_len` positions, sized from free memory.

Slots rather than paged blocks: a decode step then reads each sequence's keys as one contiguous [KV, S, hd] run,
through plain SDPA with a mask, and the rows of a batch are a slice of the cache (a view, no gather). A step reads
only the first S positions of the slots, S a bucket (`attend_buckets`) at or past its longest sequence, so its
attention costs what the sequences hold rather than what the slots could. The last
position of every slot is never fed a real token (a sequence ends at seq_len tokens, and its last token is never
fed back), so it is the slot's scratch position: where an idle row of a padded batch writes.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from llamita.config import ConfigError
from llamita.model.config import ModelConfig
from llamita.model.decode_attention import kernel_takes
from llamita.model.llama import KVCache


def slot_bytes(config: ModelConfig, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values one sequence of `seq_len` positions takes, over all layers."""
    return 2 * config.n_layers * config.n_kv_heads * seq_len * config.head_dim * dtype.itemsize


def count_slots(
    per_slot: int,
    seq_len: int,
    device: torch.device,
    *,
    max_batch: int,
    max_cache_tokens: int | None,
    memory_fraction: float,
    reserve: int = 0,
) -> int:
    """How many sequences the cache holds: `max_batch`, fewer where the token cap or the free memory says so.

    Args:
        per_slot: Bytes one slot takes (`slot_bytes`, summed over the models that share the slots).
        seq_len: Positions per slot.
        device: Where the cache lives; its free memory bounds it (`memory_fraction` of it).
        max_batch: Slots at most.
        max_cache_tokens: Positions at most over all slots (None: no cap).
        memory_fraction: Share of the free memory the cache may take.
        reserve: Bytes of the free memory to leave first, for the steps' activations and CUDA graph pools.

    Raises:
        ConfigError: Not even one slot fits.
    """
    slots = max_batch
    if max_cache_tokens is not None:
        slots = min(slots, max_cache_tokens // seq_len)
    free = _free_memory(device)
    if free is not None:
        slots = min(slots, int(max(free - reserve, 0) * memory_fraction) // per_slot)
    if slots < 1:
        raise ConfigError(
            f"the KV cache has no room for one sequence of {seq_len} positions ({per_slot / 2**20:.1f} MiB): raise "
            "max_cache_tokens or memory_fraction, or lower max_seq_len"
        )
    return slots


def _free_memory(device: torch.device) -> int | None:
    """Free bytes on the GPU, or the host's available physical memory (None where the platform does not say). On
    a GPU the allocator's cached blocks go back to the driver first: freed memory that the allocator keeps (weights
    replaced by quantized ones, an earlier engine's cache) is free for this one."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def decode_attention_for(setting: str | None, device: torch.device, head_dim: int) -> str:
    """`EngineConfig.decode_attention` resolved: the setting, or where unset the split-KV kernel on CUDA for
    the heads it takes (a power of 2 of at least 16 dimensions) and SDPA elsewhere."""
    if setting is not None:
        return setting
    return "triton" if device.type == "cuda" and kernel_takes(head_dim) else "sdpa"


class SlotCache:
    """`n_slots` sequences of `seq_len` positions of keys and values for one model (a `KVCache` underneath)."""

    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        seq_len: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
        decode: str | None = None,
    ) -> None:
        """`decode`: how decode steps attend (`KVCache.decode`): "flex" and "triton" read each row's own
        positions, "sdpa" the whole read length; None: `decode_attention_for`'s choice."""
        self.n_slots = n_slots
        self.seq_len = seq_len
        self.kv = KVCache(config, n_slots, seq_len, device=device, dtype=dtype)
        self.kv.decode = decode_attention_for(decode, device, config.head_dim)

    def rows(self, start: int, stop: int, attend: int | None = None) -> KVCache:
        """Slots start .. stop - 1 as the model's cache, a view; attention reads their first `attend` positions
        (default all), while a row may write anywhere in its slot (an idle row: its scratch position)."""
        return self.kv.view(slice(start, stop), attend=attend)

    def gather(self, slots: Tensor, attend: int) -> KVCache:
        """Any slots (a [B] index) as the model's cache: written in place, their first `attend` positions read as
        one gathered copy per layer (what a prefill of scattered slots reads: a few MB)."""
        return self.kv.view(slots, attend=attend)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Give slot `dst` the keys and values of slot `src`'s first `n` positions (a shared prompt prefix)."""
        for k, v in zip(self.kv.k, self.kv.v):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]


def attend_buckets(seq_len: int, smallest: int = 256) -> list[int]:
    """The read lengths a decode step is captured for: seq_len, halved while at least `smallest` (2048: 256, 512,
    1024, 2048). A step reads the smallest one that holds its longest sequence, at most twice what it needs."""
    buckets = [seq_len]
    while buckets[0] // 2 >= smallest:
        buckets.insert(0, buckets[0] // 2)
    return buckets
