import dataclasses

import pytest
import torch
import torch.nn.functional as F

from llamita.model import Llama, ModelConfig
from llamita.model.loss import _chunk_step, _chunk_step_inplace, chunked_cross_entropy

TINY = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, intermediate_size=72, max_seq_len=32)


def _inputs(n: int = 37, d: int = 16, v: int = 53, dtype: torch.dtype = torch.float32):
    hidden = (torch.randn(n, d) * 2).to(dtype).requires_grad_()
    weight = torch.randn(v, d).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,))
    return hidden, weight, targets


def _reference(hidden, weight, targets, ignore_index: int = -100):
    """Loss and gradients in float64 through plain autograd."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets, ignore_index=ignore_index)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 1000], ids=["c1", "c8", "whole", "larger"])
def test_matches_float64_reference_with_gradients(chunk_size):
    hidden, weight, targets = _inputs()
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    loss.backward()
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), ref_dh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad.double(), ref_dw, atol=1e-6, rtol=1e-5)
    plain = F.cross_entropy(hidden @ weight.T, targets)
    torch.testing.assert_close(loss, plain, atol=1e-6, rtol=1e-6)


def test_ignored_rows_add_nothing():
    hidden, weight, targets = _inputs()
    targets[::3] = -100
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=8)
    loss.backward()
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, targets)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), ref_dh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad.double(), ref_dw, atol=1e-6, rtol=1e-5)
    assert torch.equal(hidden.grad[::3], torch.zeros_like(hidden.grad[::3]))


def test_upstream_gradient_scales_and_accumulates():
    hidden, weight, targets = _inputs()
    (chunked_cross_entropy(hidden, weight, targets, chunk_size=8) * 0.25).backward()
    chunked_cross_entropy(hidden, weight, targets, chunk_size=8).backward()  # accumulates into .grad
    _, ref_dh, ref_dw = _reference(hidden, weight, targets)
    torch.testing.assert_close(hidden.grad.double(), 1.25 * ref_dh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad.double(), 1.25 * ref_dw, atol=1e-6, rtol=1e-5)


def test_no_grad_gives_the_same_loss():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), _reference(hidden, weight, targets)[0], atol=1e-6, rtol=1e-6)


def test_only_weight_needs_gradient():
    hidden, weight, targets = _inputs()
    hidden = hidden.detach()
    chunked_cross_entropy(hidden, weight, targets, chunk_size=8).backward()
    torch.testing.assert_close(weight.grad.double(), _reference(hidden, weight, targets)[2], atol=1e-6, rtol=1e-5)


def test_autocast_runs_the_products_in_bf16_like_linear():
    hidden, weight, targets = _inputs(n=64, d=32, v=101)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
        plain = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    loss.backward()
    assert loss.dtype == torch.float32
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, plain, atol=1e-5, rtol=1e-5)  # the same bf16 logits
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, targets)
    torch.testing.assert_close(loss.double(), ref_loss, atol=2e-2, rtol=2e-2)
    assert (hidden.grad.double() - ref_dh).norm() / ref_dh.norm() < 2e-2
    assert (weight.grad.double() - ref_dw).norm() / ref_dw.norm() < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_chunk_step_equals_the_compiled_one(dtype):
    """The eager in-place step (CPU) and the pointwise one that CUDA compiles compute the same loss and gradient."""
    logits = (torch.randn(40, 53) * 3).to(dtype)
    targets = torch.randint(0, 53, (40,))
    targets[[3, 17]] = -100
    inv = torch.tensor(1 / 38)
    loss, grad = _chunk_step(logits, targets, inv, -100)
    loss2, grad2 = _chunk_step_inplace(logits.clone(), targets, inv, -100)
    assert grad2.dtype == dtype
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad2, grad, rtol=1e-6, atol=1e-7)
    assert grad2[[3, 17]].abs().sum() == 0


def test_rejects_bad_chunk_size():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, weight, targets, chunk_size=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_model_loss_equals_cross_entropy_of_its_logits(tied):
    config = dataclasses.replace(TINY, tie_embeddings=tied)
    model = Llama(config)
    reference = Llama(config)
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, config.vocab_size, (3, 20))
    targets = torch.randint(0, config.vocab_size, (3, 20))

    loss = model(tokens, targets=targets)
    loss.backward()
    logits = reference(tokens)  # [B, T, V]
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    expected.backward()

    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_path_matches_float64_reference():
    """The compiled chunk step and the fp32-accumulating matmul that only run on CUDA."""
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(1000, 256, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
    targets = torch.randint(0, 1000, (3000,), device="cuda", generator=g)
    targets[::7] = -100
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=512)  # a last chunk of 440 rows
    loss.backward()
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, targets)
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert abs(loss.double() - ref_loss) < 1e-2
    assert (hidden.grad.double() - ref_dh).norm() / ref_dh.norm() < 1e-2
    assert (weight.grad.double() - ref_dw).norm() / ref_dw.norm() < 1e-2
