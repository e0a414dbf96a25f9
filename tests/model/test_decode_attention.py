"""`llamita::decode_attention`: one query a row through a KV cache, each row reading its own positions. On a CPU
the op runs its reference (SDPA with the row's mask); on CUDA its split-KV Triton kernel, checked against it."""

from __future__ import annotations

import pytest
import torch
from test_llama import decode_step_against_the_dense_mask

from llamita.model.decode_attention import BLOCK_N, decode_attention, reference, splits_for


def _inputs(B, KV, G, D, S, slot, dtype, device, seed=0):
    """Queries in the model's layout and a cache read that is a view of longer slots, with random lengths (the
    first row the whole read, the last one position)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, KV * G, D, generator=g).transpose(1, 2).reshape(B, KV, G, D)  # [B, H, 1, hd] grouped
    k = torch.randn(B, KV, slot, D, generator=g)[:, :, :S]
    v = torch.randn(B, KV, slot, D, generator=g)[:, :, :S]
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0], lengths[-1] = S, 1
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), lengths.to(device)


def test_the_op_checks_as_a_custom_op_and_its_reference_masks_each_rows_positions():
    """torch.library.opcheck (schema, fake tensor, dispatch); the reference equals float64 attention over each row's
    first lengths[b] positions, computed one row at a time."""
    q, k, v, lengths = _inputs(3, 2, 4, 16, 40, 48, torch.float64, "cpu")
    torch.library.opcheck(decode_attention, (q, k, v, lengths, 0.25))
    got = decode_attention(q, k, v, lengths, 0.25)
    assert got.shape == q.shape and got.is_contiguous()
    for b in range(3):
        n = int(lengths[b])
        p = (q[b] @ k[b, :, :n].transpose(-1, -2) * 0.25).softmax(-1)  # [KV, G, n]
        torch.testing.assert_close(got[b], p @ v[b, :, :n], atol=1e-12, rtol=0)
    torch.testing.assert_close(reference(q, k, v, lengths, 0.25), got, atol=0, rtol=0)


def test_a_decode_step_through_the_op_attends_as_the_dense_mask():
    """`KVCache.decode = "triton"`: the model's decode step (one token a row) through the op gives the dense mask's
    hidden states (float64), an idle row past the read length (its scratch position) seeing all of it."""
    decode_step_against_the_dense_mask("triton", BLOCK_N)


def test_a_row_is_split_where_the_batch_leaves_sms_idle():
    assert splits_for(1, 4, 384, 132) == 3  # batch 1: a split per block of 128 positions, at most
    assert splits_for(1, 4, 2048, 132) == 16
    assert splits_for(1, 4, 2048, 132, block_n=64) == 32
    assert splits_for(64, 4, 384, 132) == 2
    assert splits_for(256, 4, 2048, 132) == 1  # 1,024 programs already


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B, KV, G, D, S, slot",
    [(1, 4, 8, 64, 384, 384), (1, 4, 8, 64, 2048, 2048), (64, 4, 8, 64, 384, 512), (256, 4, 8, 64, 2000, 2048),
     (5, 2, 3, 16, 130, 200), (3, 1, 1, 32, 70, 128)],
)  # fmt: skip
def test_the_kernel_equals_the_reference(B, KV, G, D, S, slot, dtype):
    """The Triton kernel, split and direct, against the reference: float32 to 1e-5, bf16 to bf16's rounding."""
    q, k, v, lengths = _inputs(B, KV, G, D, S, slot, dtype, "cuda")
    got = decode_attention(q, k, v, lengths, D**-0.5)
    expected = reference(q.double(), k.double(), v.double(), lengths, D**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def _packed(device, dtype, D=64, slots=3, S=96, seed=1):
    """Rows of a packed prefill: queries that read slots through an index, rows repeating (a prompt's tokens, each
    reading its slot up to its own position), and padding rows reading one position."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.tensor([2, 2, 2, 0, 1, 1, 2, 0, 0])
    lengths = torch.tensor([5, 6, 7, 1, 40, 41, S, 1, 1])
    q = torch.randn(len(rows), 4, 8, D, generator=g)
    k, v = torch.randn(2, slots, 4, S, D, generator=g)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), lengths.to(device), rows.to(device)


def test_the_op_reads_cache_rows_through_an_index():
    """`rows`: query b reads cache row rows[b] (rows repeat), to its own length, as float64 attention one query at
    a time; the op's schema, fake tensor and dispatch with the index (opcheck)."""
    q, k, v, lengths, rows = _packed("cpu", torch.float64, D=16)
    torch.library.opcheck(decode_attention, (q, k, v, lengths, 0.25, rows))
    got = decode_attention(q, k, v, lengths, 0.25, rows)
    for b in range(len(rows)):
        n, r = int(lengths[b]), int(rows[b])
        p = (q[b] @ k[r, :, :n].transpose(-1, -2) * 0.25).softmax(-1)  # [KV, G, n]
        torch.testing.assert_close(got[b], p @ v[r, :, :n], atol=1e-12, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_reads_cache_rows_through_an_index(dtype):
    """The kernel with `rows` (split: 9 rows leave SMs idle) against the reference."""
    q, k, v, lengths, rows = _packed("cuda", dtype)
    got = decode_attention(q, k, v, lengths, 0.125, rows)
    expected = reference(q.double(), k.double(), v.double(), lengths, 0.125, rows)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
