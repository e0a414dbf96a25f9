"""bf16 compute copies of a model's fp32 weights on one device: mixed precision without FSDP2 or autocast.

FSDP2 on a single GPU pays for its mixed-precision policy with copies: the fp32 shards are cast into an all-gather
buffer, "gathered" (a device copy) and copied out, and the bf16 gradients are copied into a reduce-scatter buffer,
cast to fp32 and copied back: about 13 ms of a 236 ms TinyLlama-1.1B step on an H100. Autocast instead casts every
weight inside every forward. Here the model's parameters stay the fp32 masters (so state dicts, checkpoints and the
optimizer see exactly what they see without this), and each has a persistent bf16 copy:

* the root module's forward swaps the copies into the parameter slots and swaps the masters back when it returns
  (as FSDP2 swaps its unsharded parameters in), so forward and backward compute in bf16 and the gradients land on
  the copies, in bf16;
* `optim.CopiesAdamW` reads those gradients, updates the fp32 master, its moments and the bf16 copy in one fused
  pass per tensor: no cast or copy is left outside the optimizer;
* gradients accumulated over several micro-batches are summed in fp32 (`accumulate_fp32`), as FSDP2 would;
* a master changed by anything else (a checkpoint load, `load_state_dict`, an in-place edit) is noticed through
  its version counter and copied again before the next forward.

The copies are swapped out when the root forward returns, so a backward that recomputes a block (activation
checkpointing) would see the fp32 masters: `parallel.plan_parallel` refuses that combination and `auto` leaves
the copies off there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ComputeCopies:
    """Keeps one `dtype` copy per distinct parameter of `model` and swaps the copies in around its forward.

    Args:
        model: The root module (its forward is what the trainer calls); parameters in fp32.
        dtype: Compute dtype of the copies (bf16).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.accumulate_fp32 = False
        self._slots: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._copies: dict[int, nn.Parameter] = {}  # id(master) -> copy; a tied weight has one
        self._masters: list[nn.Parameter] = []
        for module in model.modules():
            for name, master in module._parameters.items():
                if master is None:
                    continue
                if master.dtype != torch.float32:
                    raise ValueError(f"compute copies need fp32 master weights; {name} is {master.dtype}")
                self._slots.append((module, name, master))
                if id(master) not in self._copies:
                    copy = nn.Parameter(master.detach().to(dtype), requires_grad=master.requires_grad)
                    if master.requires_grad:
                        copy.register_post_accumulate_grad_hook(self._make_fp32_hook(master))
                    self._copies[id(master)] = copy
                    self._masters.append(master)
        self._synced = [-1] * len(self._masters)  # master._version when its copy was last written
        self._swapped = False
        model.register_forward_pre_hook(self._swap_in)
        model.register_forward_hook(self._swap_out, always_call=True)

    # ------------------------------------------------------------------------------------------ forward
    def _swap_in(self, module: nn.Module, args: object) -> None:
        if self._swapped:
            return  # a nested call of the root module
        self.refresh()
        for owner, name, master in self._slots:
            owner._parameters[name] = self._copies[id(master)]
        self._swapped = True

    def _swap_out(self, module: nn.Module, args: object, output: object) -> None:
        for owner, name, master in self._slots:
            owner._parameters[name] = master
        self._swapped = False

    def refresh(self) -> None:
        """Copy every master changed since its copy was last written (all of them the first time)."""
        stale = [i for i, m in enumerate(self._masters) if m._version != self._synced[i]]
        if not stale:
            return
        with torch.no_grad():
            torch._foreach_copy_([self._copies[id(self._masters[i])] for i in stale], [self._masters[i] for i in stale])
        self.mark_synced(stale)

    def mark_synced(self, indices: list[int] | None = None) -> None:
        """Record that the copies of these masters (all by default) equal them, e.g. after the optimizer wrote both."""
        for i in range(len(self._masters)) if indices is None else indices:
            self._synced[i] = self._masters[i]._version

    # --------------------------------------------------------------------------------------- gradients
    def _make_fp32_hook(self, master: nn.Parameter) -> Callable[[torch.Tensor], None]:
        def hook(copy: torch.Tensor) -> None:
            # Several micro-batches: sum their gradients in fp32 on the master, as FSDP2's fp32 reduce would.
            if not self.accumulate_fp32 or copy.grad is None:
                return
            with torch.no_grad():
                if master.grad is None:
                    master.grad = copy.grad.float()
                else:
                    master.grad.add_(copy.grad)
            copy.grad = None

        return hook

    def copy_of(self, master: torch.Tensor) -> nn.Parameter:
        """The compute copy of `master` (a model parameter)."""
        return self._copies[id(master)]

    def grad_of(self, master: torch.Tensor) -> torch.Tensor | None:
        """The gradient for `master`: fp32 on it when accumulated over micro-batches, else bf16 on its copy."""
        return master.grad if master.grad is not None else self._copies[id(master)].grad

    def zero_grad(self) -> None:
        for master in self._masters:
            master.grad = None
            self._copies[id(master)].grad = None
