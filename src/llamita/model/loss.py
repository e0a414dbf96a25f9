"""Cross-entropy of a linear output head, computed in row chunks so that the [N, V] logits never exist whole.

For TinyLlama's shape (8 x 2048 tokens, 32000-token vocabulary) the plain path holds bf16 logits, an fp32 copy
and its gradient at once: about 5 GiB. Here each chunk of rows gets its logits (fp32 for the softmax), its loss
and its gradient, which is multiplied into the hidden-state and weight gradients straight away; the chunk is
then freed. The gradients are computed in the forward pass (as Liger's fused linear cross-entropy does), so the
logits are never recomputed: the backward pass only scales them by the incoming gradient.

Shapes: N rows (tokens), D hidden size, V vocabulary, C rows in one chunk.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 4096
"""Rows per chunk: 4096 x 32000 fp32 logits are 500 MiB."""


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
) -> Tensor:
    """Mean cross-entropy of `softmax(hidden @ weight.T)` against `targets`, equal to `F.cross_entropy` on the logits.

    The matrix products run in the autocast dtype when autocast is on (as `nn.Linear` would), else in the common
    dtype of `hidden` and `weight`; the softmax and the loss are always fp32.

    Args:
        hidden: [N, D] final hidden states.
        weight: [V, D] output head weight.
        targets: [N] token ids; rows equal to `ignore_index` add nothing to the loss or the gradients.
        chunk_size: Rows whose logits exist at one time.
        ignore_index: Target value that marks rows to skip, as in `F.cross_entropy`.

    Returns:
        Scalar fp32 mean over the rows not ignored (NaN when all are, like `F.cross_entropy`).
    """
    if chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    hidden, weight = _head_inputs(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index)


def _head_inputs(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """`hidden` and the head `weight` in the dtype the head's matmul runs in (autocast's, else their promotion); under
    no_grad detached, since the autograd Functions would still see inputs that require grad and compute gradients."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if not torch.is_grad_enabled():
        hidden, weight = hidden.detach(), weight.detach()
    return hidden, weight


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Loss in forward, with the input gradients for a unit upstream gradient; backward scales them."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_size: int,
        ignore_index: int,
    ) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        # A batch without targets (a packed chat row of prompts only) has loss 0 and no gradient, not NaN.
        inv_count = 1.0 / (targets != ignore_index).sum().clamp(min=1).float()  # scalar, on the device: no host sync
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, D]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        step = _chunk_step_for(hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]  # [C, D]
            logits = h @ weight.T  # [C, V]
            chunk_loss, grad_logits = step(logits, targets[start : start + chunk_size], inv_count, ignore_index)
            loss_sum += chunk_loss
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[start : start + chunk_size])  # [C, D]
            if grad_weight is not None:
                _accumulate_fp32(grad_weight, grad_logits.T, h)  # [V, D]
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum * inv_count  # scalar

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)  # [N, D]
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)  # [V, D]
        return grad_hidden, grad_weight, None, None, None


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Log-probability of each row's target under `softmax(hidden @ weight.T)`, in row chunks.

    For per-sequence sums (preference losses), whose gradient per row is only known in backward: so the backward
    pass recomputes each chunk's logits (one more head matmul) instead of keeping [N, V] of them. Dtypes as in
    `chunked_cross_entropy`: matmuls in the autocast (or common) dtype, the softmax in fp32.

    Args:
        hidden: [N, D] final hidden states of the scored positions.
        weight: [V, D] output head weight.
        targets: [N] token ids (every row is scored; select the rows before).
        chunk_size: Rows whose logits exist at one time.

    Returns:
        [N] log-probabilities in fp32 (float64 for float64 inputs).
    """
    if chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be >= 1, got {chunk_size}")
    hidden, weight = _head_inputs(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLogprobs.apply(hidden, weight, targets, chunk_size)


class _ChunkedLogprobs(torch.autograd.Function):
    """Target log-probabilities in forward keeping only each row's log-sum-exp; backward recomputes the logits."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int
    ) -> Tensor:
        softmax_dtype = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=softmax_dtype, device=hidden.device)  # [N]
        lse = torch.empty_like(out)  # [N]
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = (hidden[rows] @ weight.T).to(softmax_dtype)  # [C, V]
            lse[rows] = torch.logsumexp(logits, dim=-1)  # [C]
            out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse[rows]  # [C]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, D]
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h, g = hidden[rows], grad_out[rows].to(lse.dtype)  # [C, D], [C]
            # d log p(target) / d logits = one_hot(target) - softmax, times the row's upstream gradient.
            grad = torch.exp((h @ weight.T).to(lse.dtype) - lse[rows, None]).mul_(-g[:, None])  # [C, V]
            grad.scatter_add_(1, targets[rows, None], g[:, None])
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[rows])  # [C, D]
            if grad_weight is not None:
                _accumulate_fp32(grad_weight, grad.T, h)  # [V, D]
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def _chunk_step(logits: Tensor, targets: Tensor, inv_count: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Summed loss of one chunk and d(mean loss)/d(logits), written as pointwise ops that fuse when compiled.

    Args:
        logits: [C, V] in the matmul dtype.
        targets: [C] token ids or `ignore_index`.
        inv_count: Scalar 1 / (rows not ignored in the whole batch).
        ignore_index: Target value of rows to skip.

    Returns:
        (fp32 scalar sum of the chunk's losses, [C, V] gradient in `logits`' dtype).
    """
    logits32 = logits.float()  # [C, V]
    valid = targets != ignore_index  # [C]
    safe = torch.where(valid, targets, 0)[:, None]  # [C, 1]: an index even for ignored rows
    lse = torch.logsumexp(logits32, dim=-1, keepdim=True)  # [C, 1]
    loss = torch.where(valid, (lse - logits32.gather(1, safe)).squeeze(1), 0.0)  # [C]
    is_target = torch.arange(logits.shape[1], device=logits.device) == safe  # [C, V]
    grad = torch.exp(logits32 - lse) - is_target.float()  # [C, V]: softmax - one_hot(target)
    grad = grad * (valid[:, None] * inv_count)  # [C, V]: ignored rows get no gradient
    return loss.sum(), grad.to(logits.dtype)


def _chunk_step_inplace(logits: Tensor, targets: Tensor, inv_count: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """`_chunk_step` for eager execution: the gradient is built in place in the fp32 logits (three passes over
    [C, V] instead of seven, and no [C, V] temporaries), which makes the CPU demo's step about a quarter faster.
    `logits` is overwritten (when it is fp32); the caller no longer needs it.
    """
    grad = logits.float()  # [C, V]: `logits` itself when fp32, else an fp32 copy
    valid = targets != ignore_index  # [C]
    safe = torch.where(valid, targets, 0)[:, None]  # [C, 1]
    lse = torch.logsumexp(grad, dim=-1, keepdim=True)  # [C, 1]
    loss = torch.where(valid, (lse - grad.gather(1, safe)).squeeze(1), 0.0)  # [C]
    grad.sub_(lse).exp_()  # softmax
    grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))  # - one_hot(target)
    grad.mul_(valid[:, None] * inv_count)  # ignored rows get no gradient
    return loss.sum(), grad.to(logits.dtype)


def _accumulate_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with an fp32 accumulator; a and b may be bf16.

    On CUDA the product is accumulated into `acc` by the matmul itself (no bf16 rounding, no extra pass);
    elsewhere the product is rounded to a's dtype and added.
    """
    if acc.is_cuda and a.dtype != acc.dtype:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += a @ b


@functools.cache
def _compiled_chunk_step() -> object:
    return torch.compile(_chunk_step, dynamic=False)


def _chunk_step_for(device: torch.device) -> object:
    """On CUDA the chunk step is compiled: a reduction and one pointwise pass over the [C, V] logits. Elsewhere it
    runs eagerly, in place."""
    return _compiled_chunk_step() if device.type == "cuda" else _chunk_step_inplace
