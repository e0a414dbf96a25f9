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
