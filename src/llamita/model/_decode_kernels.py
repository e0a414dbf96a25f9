"""The Triton kernels of `decode_attention` (imported on CUDA only: Triton comes with PyTorch's CUDA builds)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def partial_kernel(
    Q, K, V, Lengths, Rows, Acc, M, L,
    sqb, sqh, sqg, skb, skh, skn, svb, svh, svn, sob, soh, sog,
    split_len, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    DIRECT: tl.constexpr, HAS_ROWS: tl.constexpr,
):  # fmt: skip
    """Program (b, h, s): row b's queries of key/value head h over positions [s * split_len, (s + 1) * split_len)
    of the row's own lengths[b], in cache row b or with HAS_ROWS in cache row Rows[b]; an online softmax over
    blocks of BLOCK_N positions. DIRECT (one split): the
    normalised result into the output (Acc, strides so*); else the split's unnormalised sum, running max and
    denominator into Acc [B, KV, S, G_PAD, D], M and L [B, KV, S, G_PAD]. Offsets in int64: a cache of many
    long slots passes 2**31 elements (vLLM's FlexAttention crash, vllm#50427)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    length = tl.load(Lengths + b)
    start = s * split_len
    end = tl.minimum(start + split_len, length)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * sqb + h * sqh + offs_g[:, None] * sqg + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    if HAS_ROWS:
        kb = tl.load(Rows + b).to(tl.int64)
    else:
        kb = b
    k_row = K + kb * skb + h * skh
    v_row = V + kb * svb + h * svh
    for n0 in tl.range(start, end, BLOCK_N):
        n = n0 + offs_n
        inside = n < end
        k = tl.load(k_row + n[:, None] * skn + offs_d[None, :], mask=inside[:, None], other=0.0)  # [BLOCK_N, D]
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(inside[None, :], qk * scale, float("-inf"))  # [G_PAD, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_row + n[:, None] * svn + offs_d[None, :], mask=inside[:, None], other=0.0)  # [BLOCK_N, D]
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if DIRECT:
        out = acc / l_i[:, None]
        tl.store(Acc + b * sob + h * soh + offs_g[:, None] * sog + offs_d[None, :], out.to(Acc.dtype.element_ty),
                 mask=offs_g[:, None] < G)  # fmt: skip
    else:
        n_splits = tl.num_programs(2)
        part = (b * tl.num_programs(1) + h) * n_splits + s
        tl.store(Acc + part * G_PAD * D + offs_g[:, None] * D + offs_d[None, :], acc)
        tl.store(M + part * G_PAD + offs_g, m_i)
        tl.store(L + part * G_PAD + offs_g, l_i)


@triton.jit
def combine_kernel(
    Acc, M, L, Out, sob, soh, sog, splits,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """Program (b, h): the splits' partial softmaxes of row b and head h combined, normalised, into Out. A split
    past the row's length has a max of -inf and weighs nothing."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    first = (b * tl.num_programs(1) + h) * splits
    m_max = tl.full([G_PAD], float("-inf"), tl.float32)
    for s in range(0, splits):
        m_max = tl.maximum(m_max, tl.load(M + (first + s) * G_PAD + offs_g))
    l_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for s in range(0, splits):
        part = first + s
        w = tl.exp(tl.load(M + part * G_PAD + offs_g) - m_max)  # [G_PAD]
        l_sum += tl.load(L + part * G_PAD + offs_g) * w
        acc += tl.load(Acc + part * G_PAD * D + offs_g[:, None] * D + offs_d[None, :]) * w[:, None]
    out = acc / l_sum[:, None]
    tl.store(Out + b * sob + h * soh + offs_g[:, None] * sog + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=offs_g[:, None] < G)  # fmt: skip
