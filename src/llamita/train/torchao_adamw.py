"""torchao's AdamW over bf16 weights (stochastic rounding) and its AdamW8bit (block-wise 8-bit moments), with fp32
moments wherever torchao would keep them in the parameter's dtype.

Imported only by `optim.build_optimizer`, for `optim.name` adamw8bit or `train.weights` bf16 (torchao is the
`quant` extra). Both step with torchao's `torch.compile`d update, on a GPU several tensors of a shape a call
(`_FP32Moments.step`; one graph per shape), on a CPU one tensor a call (Inductor's C++ backend), computed in fp32
from the fp32 (or dequantized 8-bit) moments; with `bf16_stochastic_round` a bf16 parameter takes the fp32 result
rounded up or down at random, in proportion to how close it lies, so an update below half a bf16 ulp (DPO's lr
5e-7 on weights of size 1e-2) moves the weight in expectation instead of being rounded away. They keep `lr` as a
CPU tensor (`optim.set_lr` fills it in place) and each parameter's `step` as a CPU tensor incremented on the host,
and take no `found_inf`: `optim.clipped_step` reads the skip decision on the host and skips `step()`.

The other change to torchao: a moment that is not quantized (every moment of `_AdamW`; AdamW8bit's of tensors under
4096 values or not a whole number of 256-value blocks, i.e. norm weights and small or unevenly sharded matrices)
is fp32, not bf16 like its parameter. A bf16 `exp_avg_sq` stalls: beta2's step of 1 - beta2 = 0.05..0.001 of its
value is under bf16's resolution of 1/256, so it rounds back to the old value and never decays.
"""

from __future__ import annotations

import itertools

import torch
import torchao.optim
from torch import Tensor
from torch.distributed.tensor import DTensor
from torchao.optim.adam import single_param_adam
from torchao.optim.subclass_8bit import OptimState8bit


def _update_all(
    params: list[Tensor],
    grads: list[Tensor],
    steps: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor | None],
    lr: Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    is_adamw: bool,
    rounds: list[bool],
) -> None:
    """torchao's update of one tensor (`single_param_adam`), for each tensor of the lists: compiled as one graph,
    one call from the host for all of them."""
    for p, g, step, m, v, v_max, sr in zip(params, grads, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, rounds):
        single_param_adam(p, g, step, m, v, v_max, lr, beta1, beta2, weight_decay, eps, is_adamw, sr)


_compiled_update = torch.compile(_update_all, fullgraph=True, dynamic=False)
"""`_update_all` compiled (lazily, at its first call): a graph per shape and list length."""


def _groups_of_a_shape(params: list[Tensor], most: int) -> list[list[Tensor]]:
    """`params` in lists of one shape and dtype, each list of a bucket the same length (the largest divisor of the
    bucket's count up to `most`), so that one compiled graph serves all of a bucket's lists."""
    buckets: dict[tuple, list[Tensor]] = {}
    for p in params:
        local = p.to_local() if isinstance(p, DTensor) else p
        buckets.setdefault((type(p), p.shape, local.shape, p.dtype), []).append(p)
    out = []
    for bucket in buckets.values():
        size = max(k for k in range(1, min(most, len(bucket)) + 1) if len(bucket) % k == 0)
        out += [bucket[i : i + size] for i in range(0, len(bucket), size)]
    return out


class _FP32Moments:
    """Mixin over torchao's `_AdamBase`: plain moments in fp32, 8-bit ones as torchao makes them, also through a
    `load_state_dict` (which DCP's `set_state_dict` calls); and a step that updates several tensors of a shape in
    one compiled call.

    torchao's own step calls its compiled update once per tensor, and the host's work around each call (the
    compiled region's guards and wrappers over 8-bit subclass states, the DTensor and dtype checks) costs about a
    millisecond: for TinyLlama's 201 tensors the host took 227 ms a step while the GPU ran 23 ms of kernels, 40%
    of a DPO step of 2 x 4 rows (profiled on an H200). One graph for all of a group's tensors took the host 46 ms,
    but minutes to compile (Inductor's time grows with the tensors in a graph). So the update runs on lists of up
    to `most_per_call` tensors of one shape, one graph per shape; on a CPU, where nothing waits for the host and
    Inductor's C++ compile time grows the same way, one tensor a call as torchao does.
    """

    most_per_call: int | None = None
    """Most tensors one compiled update takes; None: 8 on a GPU, 1 on a CPU."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch.optim.Optimizer's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # type: ignore[attr-defined]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if not isinstance(group["lr"], Tensor):
                raise RuntimeError("lr was changed to a non-Tensor object: set it with optim.set_lr (fill_)")
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("Sparse gradient is not supported")
                state = self.state[p]  # type: ignore[attr-defined]
                if not state:  # as torchao initialises it
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = self._new_buffer(p, True)  # type: ignore[attr-defined]
                    state["exp_avg_sq"] = self._new_buffer(p, False)  # type: ignore[attr-defined]
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = self._new_buffer(p, False)  # type: ignore[attr-defined]
                state["step"] += 1
            most = self.most_per_call or (8 if params[0].device.type == "cuda" else 1)
            for some in _groups_of_a_shape(params, most):
                states = [self.state[p] for p in some]  # type: ignore[attr-defined]
                with torch._dynamo.utils.disable_cache_limit():  # a graph per shape and length, as torchao's
                    _compiled_update(
                        [p.detach() for p in some],  # detached as torchao does (FSDP2's DTensors under compile)
                        [p.grad for p in some],
                        [s["step"] for s in states],
                        [s["exp_avg"] for s in states],
                        [s["exp_avg_sq"] for s in states],
                        [s.get("max_exp_avg_sq") for s in states],
                        group["lr"],
                        group["betas"][0],
                        group["betas"][1],
                        group["weight_decay"],
                        group["eps"],
                        self.is_adamw,  # type: ignore[attr-defined]
                        [self.bf16_stochastic_round and p.dtype is torch.bfloat16 for p in some],  # type: ignore[attr-defined]
                    )
        return loss

    def _new_buffer(self, p: Tensor, signed: bool) -> Tensor:
        out = super()._new_buffer(p, signed)  # type: ignore[misc]
        local = out.to_local() if isinstance(out, DTensor) else out
        if isinstance(local, OptimState8bit) or out.dtype == torch.float32:
            return out
        return out.float()  # a DTensor keeps its placement

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        # torch casts every floating state tensor but `step` to its parameter's dtype: take the fp32 moments back
        # as saved (an 8-bit moment shows its parameter's dtype and was only relabelled).
        saved = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)  # type: ignore[attr-defined]
        for i, p in zip(saved, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if key != "step" and isinstance(value, Tensor) and value.dtype == torch.float32:
                    self.state[p][key] = value.to(device=p.device)  # type: ignore[attr-defined]


class AdamW(_FP32Moments, torchao.optim._AdamW):
    """torchao's AdamW (decoupled weight decay) with fp32 moments, for bf16 weights: 8 bytes of moments per
    parameter, bf16 weights and gradients, no fp32 master."""


class AdamW8bit(_FP32Moments, torchao.optim.AdamW8bit):
    """torchao's AdamW8bit: each moment as uint8 codes of a dynamic quantization map and one fp32 scale per block
    of 256 values (about 2 bytes per parameter for both moments), fp32 where too small to quantize."""
