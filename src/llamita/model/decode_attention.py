"""Decode attention through a KV cache, one query a row, each row reading only its own positions: a split-KV
("flash decoding") Triton kernel, as a PyTorch custom op (`llamita::decode_attention`).

Why a kernel of our own: on an H200 at the TinyLlama-1.1B shape, SDPA's decode attention (cuDNN's, with the mask
that lets every row see its own positions) read the cache at a fifth of the bandwidth: 58 µs a layer for 256 rows
of 384 positions, and with serving's mixed lengths in 2048-position slots 249 µs, since every row reads the
longest row's length (`bench/results/2026-12-02-engine-r6.md`). FlexAttention, which reads each row's own, crashed
at that shape (an illegal memory access, torch 2.11). This kernel:
- takes the G query heads that share a key/value head together, as one block of queries: each row's keys and
  values are read once per key/value head;
- reads positions 0 .. lengths[b] - 1 of row b and no more;
- splits the positions of a row over several programs when the batch alone would leave the GPU's SMs idle (batch
  1: 4 key/value heads), then combines their partial softmaxes.

It is the engine's default on CUDA (`EngineConfig.decode_attention`) since it beat SDPA's in
`bench/decode_attention.py` (ARCHITECTURE.md: a hand-written Triton kernel must beat the library one): on an
H200, 31 µs a layer against cuDNN's 69 µs at 256 rows of 384 positions, 40 µs against 267 µs with serving's
lengths in 2048-position slots (`bench/results/2026-12-03-engine-r7.md`).

On a CPU the op runs its reference, SDPA with the equivalent mask, so that the engine's path through the op can be
tested anywhere; the kernel itself is tested on CUDA against that reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_N = 128
"""Key positions per iteration of a program."""


def kernel_takes(head_dim: int) -> bool:
    """Whether the kernel takes heads of `head_dim` dimensions: a power of 2 of at least 16 (Triton's dot)."""
    return head_dim >= 16 and not head_dim & (head_dim - 1)


@torch.library.custom_op("llamita::decode_attention", mutates_args=())
def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float, rows: Tensor | None = None
) -> Tensor:
    """Attention of one query per row and head to the first lengths[b] cached positions of its cache row.

    Args:
        q: [B, KV, G, hd] the queries, the G heads that share key/value head h at [:, h].
        k: [B, KV, S, hd] the cached keys (any strides; the last dimension contiguous), or with `rows` [N, KV, S,
            hd], the rows of every slot.
        v: likewise, the cached values.
        lengths: [B] positions each row sees, 1 .. S.
        scale: Multiplies the scores (1 / sqrt(hd)).
        rows: [B] the cache row each query reads (rows may repeat: the tokens of a packed prefill, each reading its
            own slot up to its own position); None: query b reads cache row b.

    Returns:
        [B, KV, G, hd], contiguous, in q's dtype.
    """
    if q.is_cuda:
        return _triton(q, k, v, lengths, scale, rows)
    return reference(q, k, v, lengths, scale, rows)


@decode_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float, rows: Tensor | None = None) -> Tensor:
    return q.new_empty(q.shape)


def reference(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float, rows: Tensor | None = None) -> Tensor:
    """The op's result through SDPA with the dense mask (what `decode_attention="sdpa"` computes)."""
    if rows is not None:  # each query's cache row, read up to the longest length only
        longest = int(lengths.max())
        k, v = k[:, :, :longest].index_select(0, rows), v[:, :, :longest].index_select(0, rows)
    S = k.shape[2]
    mask = torch.arange(S, device=k.device) < lengths[:, None]  # [B, S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None], scale=scale).contiguous()


def splits_for(batch: int, kv_heads: int, positions: int, sms: int, block_n: int = BLOCK_N) -> int:
    """Programs per row and key/value head: enough for two per SM across the batch, at most one per `block_n`
    positions."""
    return max(1, min(_cdiv(2 * sms, batch * kv_heads), _cdiv(positions, block_n)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor,
    scale: float,
    rows: Tensor | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
) -> Tensor:
    """The op on CUDA; `block_n`, `num_warps` and `num_stages` are the kernel's tuning (`bench/decode_attention.py
    --sweep` times the alternatives)."""
    import triton

    from llamita.model._decode_kernels import combine_kernel, partial_kernel

    B, KV, G, D = q.shape
    S = k.shape[2]
    if not kernel_takes(D) or k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError(f"decode_attention: heads of a power of 2 of at least 16 dimensions, contiguous, not {D}")
    g_pad = max(16, triton.next_power_of_2(G))
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    splits = splits_for(B, KV, S, sms, block_n)
    split_len = _cdiv(_cdiv(S, splits), block_n) * block_n  # positions per split, whole blocks
    splits = _cdiv(S, split_len)
    out = torch.empty(B, KV, G, D, device=q.device, dtype=q.dtype)
    lengths = lengths.to(torch.int32)
    index = lengths if rows is None else rows  # a pointer the kernel ignores without HAS_ROWS
    ieee = q.dtype == torch.float32  # no TF32 for float32 caches (the tests')
    common = dict(G=G, G_PAD=g_pad, D=D, BLOCK_N=block_n, IEEE=ieee, HAS_ROWS=rows is not None, num_warps=num_warps,
                  num_stages=num_stages)  # fmt: skip
    if splits == 1:
        partial_kernel[(B, KV, 1)](
            q, k, v, lengths, index, out, out, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], split_len, scale, DIRECT=True, **common,
        )  # fmt: skip
        return out
    acc = torch.empty(B, KV, splits, g_pad, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B, KV, splits, g_pad, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)  # noqa: E741
    partial_kernel[(B, KV, splits)](
        q, k, v, lengths, index, acc, m, l, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], 0, 0, 0,
        split_len, scale, DIRECT=False, **common,
    )  # fmt: skip
    combine_kernel[(B, KV)](acc, m, l, out, *out.stride()[:3], splits, G=G, G_PAD=g_pad, D=D, num_warps=num_warps)
    return out
