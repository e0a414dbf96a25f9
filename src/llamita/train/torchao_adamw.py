"""torchao's AdamW over bf16 weights (stochastic rounding) and its AdamW8bit (block-wise 8-bit moments), with fp32
moments wherever torchao would keep them in the parameter's dtype.

Imported only by `optim.build_optimizer`, for `optim.name` adamw8bit or `train.weights` bf16 (torchao is the
`quant` extra). Both step one parameter at a time with a `torch.compile`d update (one graph per shape; Inductor's
C++ backend on a CPU), computed in fp32 from the fp32 (or dequantized 8-bit) moments; with
`bf16_stochastic_round` a bf16 parameter takes the fp32 result rounded up or down at random, in proportion to how
close it lies, so an update below half a bf16 ulp (DPO's lr 5e-7 on weights of size 1e-2) moves the weight in
expectation instead of being rounded away. They keep `lr` as a CPU tensor (`optim.set_lr` fills it in place) and
each parameter's `step` as a CPU tensor incremented on the host, and take no `found_inf`: `optim.clipped_step` reads
the skip decision on the host and skips `step()`.

The one change to torchao: a moment that is not quantized (every moment of `_AdamW`; AdamW8bit's of tensors under
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
from torchao.optim.subclass_8bit import OptimState8bit


class _FP32Moments:
    """Mixin over torchao's `_AdamBase`: plain moments in fp32, 8-bit ones as torchao makes them, also through a
    `load_state_dict` (which DCP's `set_state_dict` calls)."""

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
