"""AdamW (torch's fused one, or torchao's for bf16 weights or 8-bit moments) with decoupled weight decay on
matrices only, the optimizer step with clipping folded in, and the schedules: the learning rate (warmup, then
cosine, warmup-stable-decay or constant) and the batch size, both functions of the tokens seen."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from llamita.config import OptimConfig, TrainConfig
from llamita.train.copies import ComputeCopies


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device, copies: ComputeCopies | None = None
) -> torch.optim.Optimizer:
    """AdamW over the model's parameters: weight decay on matrices (ndim >= 2), none on norm weights.

    For fp32 weights and `optim.name` adamw the fused kernel (CUDA and CPU) is used: besides being the fastest, it
    accepts the trainer's skip decision as a device tensor (`found_inf`), so skipping a bad step needs no host
    sync. With compute copies (`parallel.copies`) it is `CopiesAdamW`, which also writes the bf16 copies. With
    `optim.name` adamw8bit it is torchao's AdamW8bit, and with bf16 weights (`train.weights`, which
    `parallel.parallelize` has cast) and adamw torchao's AdamW (`torchao_adamw`); both round the update of a bf16
    parameter stochastically and take no skip tensor (`clipped_step` reads it on the host). Build it after FSDP2
    has sharded the model, so that it holds (and keeps state for) this rank's shards.

    Raises:
        ValueError: compute copies with an optimizer other than fp32 AdamW (`config.check_config` refuses it).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.name == "adamw8bit" or any(p.dtype == torch.bfloat16 for p in decay + no_decay):
        if copies is not None:
            raise ValueError("compute copies are written by the fp32 AdamW; build torchao's optimizers without them")
        from llamita.train import torchao_adamw

        ao = torchao_adamw.AdamW8bit if cfg.name == "adamw8bit" else torchao_adamw.AdamW
        return ao(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, bf16_stochastic_round=True)
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "fused": True}
    if copies is not None:
        return CopiesAdamW(groups, copies, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _adamw_update(
    master: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    copy: Tensor,
    step: Tensor,
    lr: Tensor,
    skip: Tensor,
    grad_coef: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW update of a flat fp32 master and its moments from a (bf16 or fp32) gradient, in place; writes the
    master's compute copy too. torch's AdamW math (decoupled decay, bias corrections from the per-tensor step);
    `grad_coef` is the clipping factor; `skip` = 1 leaves everything, the step count included, unchanged."""
    new_step = step + (1.0 - skip)  # [] fp32
    g = grad.float() * grad_coef  # [N]
    m = exp_avg.lerp(g, 1.0 - beta1)
    v = exp_avg_sq * beta2 + g * g * (1.0 - beta2)
    bias1 = 1.0 - torch.pow(beta1, new_step)
    bias2 = 1.0 - torch.pow(beta2, new_step)
    p = master * (1.0 - lr * weight_decay)
    p = p - (lr / bias1) * m / (v.sqrt() / bias2.sqrt() + eps)
    keep = skip > 0
    p = torch.where(keep, master, p)
    exp_avg.copy_(torch.where(keep, exp_avg, m))
    exp_avg_sq.copy_(torch.where(keep, exp_avg_sq, v))
    master.copy_(p)
    copy.copy_(p)
    step.copy_(new_step)


@functools.cache
def _compiled_adamw_update() -> Callable[..., None]:
    return torch.compile(_adamw_update, dynamic=True, fullgraph=True)


class CopiesAdamW(torch.optim.AdamW):
    """AdamW over fp32 masters whose gradients arrive on their bf16 compute copies (`copies.ComputeCopies`).

    One fused pass per tensor (compiled on CUDA) reads the master, the gradient and both moments and writes the
    master, the moments and the bf16 copy. State and state_dict are AdamW's (`step`, `exp_avg`, `exp_avg_sq` per
    parameter), so checkpoints move freely between this and FSDP2 runs. The trainer hands it the skip decision
    (`found_inf`) and the clipping factor (`grad_coef`) as device tensors.
    """

    def __init__(self, params: list[dict], copies: ComputeCopies, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.copies = copies
        self.found_inf: Tensor | None = None
        self.grad_coef: Tensor | None = None

    def gradient(self, p: Tensor) -> Tensor | None:
        return self.copies.grad_of(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.copies.zero_grad()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        update = None
        for group in self.param_groups:
            pairs = [(p, g) for p in group["params"] if (g := self.copies.grad_of(p)) is not None]
            if not pairs:
                continue
            device = pairs[0][0].device
            if update is None:
                update = _compiled_adamw_update() if device.type == "cuda" else _adamw_update
                skip = self.found_inf if self.found_inf is not None else torch.zeros((), device=device)
                coef = self.grad_coef if self.grad_coef is not None else torch.ones((), device=device)
            lr = _device_scalar(group["lr"], device)
            beta1, beta2 = group["betas"]
            for p, grad in pairs:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                update(
                    p.view(-1),
                    grad.view(-1),
                    state["exp_avg"].view(-1),
                    state["exp_avg_sq"].view(-1),
                    self.copies.copy_of(p).view(-1),
                    state["step"],
                    lr,
                    skip,
                    coef,
                    float(beta1),
                    float(beta2),
                    float(group["eps"]),
                    float(group["weight_decay"]),
                )
        self.copies.mark_synced()


def _device_scalar(value: float, device: torch.device) -> Tensor:
    """A 0-d fp32 tensor on `device` without a host sync (through pinned memory on CUDA)."""
    host = torch.tensor(float(value), dtype=torch.float32)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def gradient_norm(optimizer: torch.optim.Optimizer) -> Tensor:
    """L2 norm (fp32, on the device) of every gradient `optimizer` will apply; over all ranks for FSDP2 shards."""
    get = getattr(optimizer, "gradient", lambda p: p.grad)
    grads = [g for group in optimizer.param_groups for p in group["params"] if (g := get(p)) is not None]
    if not grads:
        return torch.zeros((), device=optimizer.param_groups[0]["params"][0].device)
    # In fp32 whatever the gradients' dtype (bf16 with `train.weights` bf16); FSDP2 shards' norms are DTensors
    # whose placements sum them over the ranks that hold different shards.
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clipped_step(optimizer: torch.optim.Optimizer, grad_norm: Tensor, max_norm: float, skip: Tensor) -> None:
    """Step with gradients scaled to at most `max_norm` in L2 norm (as `clip_grad_norm_` does), unless `skip` is 1.

    Fused AdamW and `CopiesAdamW` take the clipping factor and the skip decision as device tensors, inside the
    update (no pass over the gradients of its own, no host sync). Another optimizer (torchao's, `build_optimizer`)
    takes neither: `skip` is read on the host, one device sync per step, and a skipped step does not call `step()`,
    which leaves weights, moments and torchao's host-side step counts unchanged; otherwise the gradients are
    clipped in place (when `max_norm` is finite) and it steps.
    """
    coef = torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0)
    if isinstance(optimizer, CopiesAdamW):
        optimizer.grad_coef, optimizer.found_inf = coef, skip
        optimizer.step()
    elif optimizer.defaults.get("fused"):
        optimizer.grad_scale, optimizer.found_inf = 1.0 / coef, skip  # the fused kernel divides by grad_scale
        optimizer.step()
    else:
        # The host sync: torchao's optimizers take no found_inf and count their steps on the host.
        if skip.item():
            return
        if math.isfinite(max_norm):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm)
        optimizer.step()


def lr_at(step: float, cfg: OptimConfig, max_steps: float) -> float:
    """Learning rate at schedule position `step`: linear warmup, then `cfg.schedule` until `max_steps`.

    The position is counted in optimizer steps of the first batch: tokens seen / `train.global_batch_tokens`
    (`LRSchedule`), which without a batch schedule is the 0-based step itself. Step 0 gets lr/warmup rather than 0
    so that no step is wasted. cosine decays from `lr` to `min_lr` between the warmup's end and `max_steps`; wsd
    holds `lr` until the last `decay_fraction` of `max_steps`, then decays to `min_lr` linearly or as 1-sqrt; past
    `max_steps` both stay at `min_lr`. constant holds `lr`.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = max_steps * (1.0 - cfg.decay_fraction)
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start) / max(1.0, max_steps - decay_start))
        remaining = 1.0 - progress if cfg.decay_shape == "linear" else 1.0 - math.sqrt(progress)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * remaining
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class BatchSchedule:
    """The global batch in tokens as a function of the tokens seen (`train.global_batch_tokens`, `batch_stages`).

    A step that starts after `t` tokens takes the batch of the last stage whose start is <= `t`: a new batch takes
    effect at the first step boundary at or past its `from_tokens`. Every position is a pure function of the step
    count, so a resumed run and a branch see the batches an uninterrupted run would.

    Attributes:
        stages: (from_tokens, global batch tokens) per stage, the first from 0, the starts increasing.
    """

    stages: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, cfg: TrainConfig) -> BatchSchedule:
        """The schedule of a run config (checked by `config.check_config`)."""
        later = tuple((int(s["from_tokens"]), int(s["global_batch_tokens"])) for s in cfg.batch_stages)
        return cls(((0, cfg.global_batch_tokens), *later))

    @property
    def first(self) -> int:
        """The batch of the first step (`train.global_batch_tokens`): the LR schedule's unit of steps."""
        return self.stages[0][1]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Every stage's global batch in tokens."""
        return tuple(batch for _, batch in self.stages)

    def at(self, tokens: int) -> int:
        """The global batch of the step that starts after `tokens` tokens."""
        return next(batch for start, batch in reversed(self.stages) if start <= tokens)

    def _steps(self) -> Iterator[tuple[int, int, int | None]]:
        """(tokens at the stage's first step, its batch, its steps or None for the last) for each stage in turn."""
        tokens = 0
        for i, (_, batch) in enumerate(self.stages):
            if i + 1 == len(self.stages):
                yield tokens, batch, None
                return
            steps = max(0, -(-(self.stages[i + 1][0] - tokens) // batch))  # boundaries before the next start
            yield tokens, batch, steps
            tokens += steps * batch

    def tokens_after(self, steps: int) -> int:
        """Tokens seen after `steps` optimizer steps."""
        for tokens, batch, length in self._steps():
            if length is None or steps <= length:
                return tokens + steps * batch
            steps -= length
        raise AssertionError("unreachable: the last stage has no end")

    def steps_within(self, max_tokens: int) -> int:
        """How many steps run before the next one would pass `max_tokens` (`train.max_tokens`)."""
        done = 0
        for tokens, batch, length in self._steps():
            fit = max(0, (max_tokens - tokens) // batch)
            if length is None or fit < length:
                return done + fit
            done += length
        raise AssertionError("unreachable: the last stage has no end")


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate as a function of the tokens seen: `lr_at` at tokens / the first batch, over a span.

    With one batch size the position is the step itself and the span `max_steps`, as without a batch schedule; a
    larger batch later advances the position by its tokens, so it neither stretches nor warps the schedule.

    Attributes:
        cfg: the optimizer section (schedule, warmup, decay, `schedule_tokens`).
        unit: tokens per step of the first batch.
        span: the schedule's length in steps of `unit`.
    """

    cfg: OptimConfig
    unit: int
    span: float

    @classmethod
    def of(cls, cfg: OptimConfig, batch: BatchSchedule, max_steps: int) -> LRSchedule:
        """The schedule over `optim.schedule_tokens`, or (0) over the run's own `max_steps` steps."""
        if cfg.schedule_tokens:
            return cls(cfg, batch.first, cfg.schedule_tokens / batch.first)
        if len(batch.stages) == 1:
            return cls(cfg, batch.first, max_steps)
        return cls(cfg, batch.first, batch.tokens_after(max_steps) / batch.first)

    def at(self, tokens: int) -> float:
        """The learning rate of the step that starts after `tokens` tokens."""
        return lr_at(tokens / self.unit, self.cfg, self.span)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group; in place where it is a tensor (torchao's optimizers keep a
    CPU one and refuse a float)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
