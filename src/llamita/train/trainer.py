"""The training loop: micro-steps with gradient accumulation, clipping, schedule, validation, logging, checkpoints.

The trainer receives a model that is already built, initialised and (for multi-GPU) wrapped from outside; it
never constructs parallelism itself. Per-step losses stay on the device until a log interval flushes them. Whether
a step may change the weights (NaN/Inf, loss spikes) is decided on the device by `guard.StepGuard` and handed to
the fused AdamW kernel; the host reads each step's outcome one step late, so it keeps running up to one step
ahead of the device. SIGTERM/SIGINT make every rank save a checkpoint at the same step boundary and return. A
resume refuses a config that changes the run's math since the checkpoint unless `checkpoint.allow_config_change`
(`find_resume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from llamita.config import UNSET, RunConfig, changes_math, describe_change, resume_changes, to_dict
from llamita.evaluate.perplexity import mean_loss
from llamita.model.config import ModelConfig
from llamita.tokenizer import Tokenizer
from llamita.train import checkpoint as ckpt
from llamita.train.guard import HostCopy, StepGuard
from llamita.train.metrics import MetricsLogger, Throughput, peak_flops
from llamita.train.optim import clipped_step, gradient_norm, lr_at, set_lr


def causal_lm_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over the targets that are not -100; inputs and targets are [B, T].

    The model computes it (chunked, from its output head) so the full logits are never materialised. `positions`
    ([B, T], restarting at 0 at each document) marks packed documents, which then attend only to themselves.
    """
    return model(inputs, targets=targets, positions=positions)  # scalar


class Validation(Protocol):
    """A held-out set the trainer scores (`evaluate.perplexity.ShardValidation`, `chat.packing.PackedValidation`)."""

    def batches(self, batch_size: int, max_batches: int | None, rank: int, world: int) -> Iterator[tuple]:
        """This rank's (inputs, targets[, positions]) batches; every rank gets the same number."""
        ...


CONFIG_CHANGES_FILE = "config_changes.jsonl"
"""In the run directory: one row per resume whose config differs from its checkpoint's (config.yaml stays the
first start's)."""


def find_resume(cfg: RunConfig) -> tuple[Path, dict[str, tuple[Any, Any]]] | None:
    """The checkpoint that `checkpoint.resume` names (auto: the latest in the run directory, if any), and what `cfg`
    changes in the config it was saved with (`config.resume_changes`); None when the run starts fresh.

    Reads only the checkpoint's trainer state, so an entry calls it before any expensive work; `Trainer.fit` calls it
    again when it resumes.

    Raises:
        CheckpointError: the checkpoint holds weights only, or `cfg` changes settings that change the run's math
            (`config.changes_math`) without `checkpoint.allow_config_change`.
    """
    choice = cfg.checkpoint.resume
    if choice == "none":
        return None
    if choice == "auto":
        found = ckpt.list_checkpoints(Path(cfg.out_dir))
        if not found:
            return None
        path = found[-1]
    else:
        path = ckpt.resolve_checkpoint(choice)
    state = ckpt.read_state(path)
    if "loader" not in state:
        raise ckpt.CheckpointError(
            f"{path} holds weights only (no optimizer or data state, e.g. written by `llamita import hf`); "
            f"start a new run from it with --init.from {path.parent.parent} and another --out_dir"
        )
    changes = resume_changes(state["run_config"], cfg)
    refused = [describe_change(k, *v) for k, v in changes.items() if changes_math(k)]
    if refused and not cfg.checkpoint.allow_config_change:
        listed = "".join(f"\n  {line}" for line in refused)
        raise ckpt.CheckpointError(
            f"{path}: this run's config changes settings of the checkpoint's run that change its math "
            f"(checkpoint value -> new value):{listed}\nresume with the checkpoint's settings (its `run_config` in "
            f"{path / ckpt.STATE_FILE}), start a new out_dir (--init.from {path} keeps the weights), or set "
            "checkpoint.allow_config_change=true to continue with the new settings (recorded in "
            f"{Path(cfg.out_dir) / CONFIG_CHANGES_FILE})"
        )
    return path, changes


@dataclasses.dataclass
class TrainState:
    step: int = 0
    """Optimizer steps completed."""
    tokens: int = 0
    """Training tokens consumed over all ranks."""


class Trainer:
    """Runs `max_steps` optimizer steps of `model` on `loader`, resuming from the run directory when asked.

    Args:
        cfg: the resolved run config (saved with every checkpoint).
        model: the model, initialised and already placed/wrapped for its device(s).
        model_config: the architecture, for FLOPs/token and for the checkpoint.
        optimizer: built over `model`'s parameters.
        loader: yields (inputs, targets) or (inputs, targets, positions) micro-batches for this rank; has
            state_dict()/load_state_dict(). A loader whose batches hold different numbers of targets (packed chat
            rows) says so with `token_weighted = True`: each micro-batch's loss is then weighted by its share of
            the step's targets over all ranks, so a step's gradient is the mean over its tokens.
        validation: the held-out set for validation loss, or None.
        device: the compute device of this rank.
        max_steps: optimizer steps of the whole run.
        autocast: autocast forward passes to this dtype; None when the weights already have the compute dtype
            (fp32, or bf16 cast by FSDP2): `parallel.plan_parallel` decides.
    """

    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        model_config: ModelConfig,
        optimizer: torch.optim.Optimizer,
        loader: Any,
        validation: Validation | None,
        device: torch.device,
        max_steps: int,
        *,
        autocast: torch.dtype | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.model_config = model_config
        self.optimizer = optimizer
        self.loader = loader
        self.validation = validation
        self.device = device
        self.max_steps = max_steps
        self.out_dir = Path(cfg.out_dir)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.accum = loader.micro_steps_per_step
        self.tokens_per_step = cfg.train.global_batch_tokens
        self.state = TrainState()
        self.autocast: contextlib.AbstractContextManager = (
            contextlib.nullcontext() if autocast is None else torch.autocast(device.type, dtype=autocast)
        )
        self.autocast_dtype = autocast
        self.tokenizer = tokenizer
        if cfg.eval.tasks and tokenizer is None:
            raise ValueError("eval.tasks needs the tokenizer: pass tokenizer= to the Trainer")
        self._batches: Iterator | None = None
        self.config_changes: dict[str, tuple[Any, Any]] = {}  # since the checkpoint `resume` loaded
        self._stop_signal = 0  # set by a SIGTERM/SIGINT handler while `fit` runs
        copies = getattr(optimizer, "copies", None)
        if copies is not None:  # bf16 gradients of several micro-batches are summed in fp32
            copies.accumulate_fp32 = self.accum > 1
        self.guard = StepGuard(device, self.world_size, cfg.train.spike_sigma, cfg.train.spike_window)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides model and optimizer tensors (plain JSON types)."""
        return {
            "step": self.state.step,
            "tokens": self.state.tokens,
            **self.guard.state_dict(),
            "loader": self.loader.state_dict(),
            "world_size": self.world_size,
            "model_config": dataclasses.asdict(self.model_config),
            "run_config": to_dict(self.cfg),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def save(self) -> Path:
        path = ckpt.save_checkpoint(
            ckpt.checkpoint_path(self.out_dir, self.state.step), self.model, self.optimizer, self.state_dict()
        )
        ckpt.prune_checkpoints(self.out_dir, self.cfg.checkpoint.keep_last)
        return path

    def resume(self) -> Path | None:
        """Load the checkpoint named by `checkpoint.resume` (auto: the latest in the run directory, if any); see
        `find_resume` for what it refuses."""
        found = find_resume(self.cfg)
        if found is None:
            return None
        path, self.config_changes = found
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        if state["model_config"] != dataclasses.asdict(self.model_config):
            raise ckpt.CheckpointError(
                f"{path}: the checkpoint's model config differs from this run's; "
                "resume with the same model settings or start a new run directory"
            )
        try:
            self.loader.load_state_dict(state["loader"], allow_data_change=self.cfg.checkpoint.allow_data_change)
        except ValueError as e:
            raise ckpt.CheckpointError(f"{path}: cannot continue the data order: {e}") from None
        self.state = TrainState(step=state["step"], tokens=state["tokens"])
        self.guard.load_state_dict(state)
        return path

    # ------------------------------------------------------------------------------------------ loop
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over `accum` micro-batches; returns (mean loss, grad norm, guard summary).

        All three stay on the device. A step whose loss or gradient norm is NaN/Inf on any rank (or a loss spike,
        when the guard is on) leaves weights and optimizer state untouched; see `guard.StepGuard`.
        """
        assert self._batches is not None
        set_lr(self.optimizer, lr_at(self.state.step, self.cfg.optim, self.max_steps))
        loss_sum = torch.zeros((), device=self.device)
        micro_batches = [next(self._batches) for _ in range(self.accum)]
        weights = self._micro_weights(micro_batches)
        for micro, batch in enumerate(micro_batches):
            batch = [t.to(self.device, non_blocking=True) for t in batch]  # inputs, targets[, positions]
            if hasattr(self.model, "set_requires_gradient_sync"):
                # FSDP2: reduce-scatter gradients only on the last micro-batch of the step.
                self.model.set_requires_gradient_sync(micro == self.accum - 1)
            with self.autocast:
                loss = causal_lm_loss(self.model, *batch)
            (loss / self.accum if weights is None else loss * weights[micro]).backward()
            loss_sum += loss.detach() if weights is None else loss.detach() * weights[micro] * self.accum
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = gradient_norm(self.optimizer)
        mean_loss = loss_sum / self.accum
        skip, summary = self.guard.check(mean_loss, grad_norm, self._stop_signal > 0)
        clipped_step(self.optimizer, grad_norm, max_norm, skip)  # nothing moves when skip is 1
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens += self.tokens_per_step
        return mean_loss, grad_norm, summary

    def _micro_weights(self, micro_batches: list) -> torch.Tensor | None:
        """Each micro-batch's share of the step's targets over all ranks, times the ranks (which gradient reduction
        averages), for a token-weighted loader; None when every micro-batch holds the same number (pretraining)."""
        if not getattr(self.loader, "token_weighted", False):
            return None
        counts = torch.tensor([int((b[1] != -100).sum()) for b in micro_batches], dtype=torch.float32)
        counts = counts.to(self.device)  # [accum]
        total = counts.sum()
        if self.world_size > 1:
            dist.all_reduce(total)
        return counts * self.world_size / total.clamp(min=1)  # [accum]

    def _request_stop(self, signum: int, frame: object) -> None:
        self._stop_signal = signum

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While training, SIGTERM and SIGINT ask for a checkpoint at the next step boundary instead of killing."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def validate(self) -> dict[str, float]:
        """Validation loss and perplexity on the held-out shards (mean over ranks).

        Runs the compiled blocks eagerly: their graphs stay the training step's, and validation batches of another
        size cost no recompilation (the same for `eval.tasks`).
        """
        ev = self.cfg.eval
        assert self.validation is not None
        # Rank r scores windows r, r + world, ...: batches / world per rank covers the windows of one rank.
        batches = self.validation.batches(ev.batch_size, -(-ev.batches // self.world_size), self.rank, self.world_size)
        with torch.compiler.set_stance("force_eager"):
            result = mean_loss(self.model, batches, device=self.device, autocast=self.autocast)
        self.model.train()
        return result

    def _flush(
        self, pending: list, logger: MetricsLogger, meter: Throughput, *, report: bool = False
    ) -> dict[str, float]:
        """Bring buffered per-step losses to the host (one sync) and write one metrics row per step; {} if none.

        With `report` the last row is also shown on the console (`MetricsLogger.report`).
        """
        if not pending:
            return {}
        losses = torch.stack([p[1] for p in pending])
        norms = torch.stack([p[2] for p in pending]).float()
        summaries = torch.stack([p[5] for p in pending]).tolist()
        if self.world_size > 1:
            dist.all_reduce(losses, op=dist.ReduceOp.SUM)
            losses /= self.world_size
        tokens_per_s, mfu = meter.update(self.state.tokens)
        # Host-side allocator counter: reading it does not synchronise with the device.
        memory = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        row: dict[str, Any] = {}
        for (step, _, _, lr, tokens, _), loss, norm, summary in zip(
            pending, losses.tolist(), norms.tolist(), summaries
        ):
            row = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": norm,
                "tokens": tokens,
                "tokens_per_s": tokens_per_s,
                "skipped_steps": int(summary[0]),
            }
            if self.guard.spike_sigma > 0:
                row["spike_steps"] = int(summary[1])
            if mfu is not None:
                row["mfu"] = mfu
            if memory is not None:
                row["max_memory_gib"] = memory
            logger.log(row)
        pending.clear()
        if report:
            logger.report(row)
        return row

    def _log_validation(self, logger: MetricsLogger) -> dict[str, float]:
        result = self.validate()
        logger.log({"step": self.state.step, "tokens": self.state.tokens, **result})
        logger.print(f"step {self.state.step:>6} | val loss {result['val_loss']:.4f} | ppl {result['val_ppl']:.2f}")
        return {**result, "val_step": self.state.step}

    def _log_tasks(self, logger: MetricsLogger) -> dict[str, float]:
        """Score `eval.tasks` as lm-evaluation-harness would (all ranks call this) and log accuracy vs tokens."""
        from llamita.evaluate.harness import evaluate_tasks, scalar_metrics

        ev = self.cfg.eval
        with torch.compiler.set_stance("force_eager"):  # see `validate`
            result = evaluate_tasks(
                self.model,
                self.tokenizer,
                ev.tasks,
                limit=ev.task_limit or None,
                device=self.device,
                autocast_dtype=self.autocast_dtype,
            )
        flat = scalar_metrics(result)
        logger.log({"step": self.state.step, "tokens": self.state.tokens, **flat})
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in flat.items())
        logger.print(f"step {self.state.step:>6} | {shown}")
        return {**flat, "task_step": self.state.step}

    def _record_config_changes(self, path: Path, logger: MetricsLogger) -> None:
        """Print what this run changed in the config of the checkpoint it resumed and append it, with the step and
        the whole new config, to `CONFIG_CHANGES_FILE` (rank 0)."""
        record = self.out_dir / CONFIG_CHANGES_FILE
        shown = "; ".join(
            describe_change(k, *v) + (" (changes the run's math)" if changes_math(k) else "")
            for k, v in self.config_changes.items()
        )
        logger.print(f"config changed since {path.name}: {shown}; recorded in {record}")
        if self.rank != 0:
            return
        sides = ("checkpoint", "new")
        row = {
            "step": self.state.step,
            "checkpoint": str(path),
            "changes": {k: {s: x for s, x in zip(sides, v) if x is not UNSET} for k, v in self.config_changes.items()},
            "config": to_dict(self.cfg),
        }
        with record.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def fit(self) -> dict[str, Any]:
        """Train to `max_steps`; return the latest metrics, each group with the step it was measured at.

        The summary holds `step` and `tokens` (the last optimizer step of the run) with the training row of that step
        (`loss`, `lr`, `grad_norm`, `tokens_per_s`, `skipped_steps`, ... when this call trained); the latest
        validation of this call (`val_loss`, `val_ppl`) at `val_step`; the latest `eval.tasks` scores (`eval/...`)
        at `task_step`; and `stopped: true` after a stop by SIGTERM/SIGINT.
        """
        resumed = self.resume()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = self.cfg.log
        logger = MetricsLogger(
            self.out_dir,
            self.max_steps,
            start_step=self.state.step,
            tensorboard=log.tensorboard,
            progress=log.progress,
            enabled=self.rank == 0,
        )
        mc = self.model_config
        logger.print(
            f"model {mc.num_params / 1e6:.2f}M params ({mc.num_non_embedding_params / 1e6:.2f}M non-embedding), "
            f"{mc.flops_per_token(self.cfg.data.seq_len) / 1e6:.1f} MFLOPs/token | "
            f"{self.tokens_per_step:,} tokens/step = {self.cfg.train.micro_batch} seq x {self.accum} accum x "
            f"{self.world_size} ranks x {self.cfg.data.seq_len} tokens | {self.max_steps:,} steps on "
            f"{self.device.type}{f' ({self.autocast_dtype} autocast)' if self.autocast_dtype else ''}"
        )
        if resumed is not None:
            logger.print(f"resumed from {resumed} at step {self.state.step}")
            if self.config_changes:
                self._record_config_changes(resumed, logger)
        peak = peak_flops(self.device)  # one GPU's; tokens/s counts every rank's tokens
        meter = Throughput(mc.flops_per_token(self.cfg.data.seq_len), peak * self.world_size if peak else None)
        meter.update(self.state.tokens)
        self.model.train()
        self._batches = iter(self.loader)
        pending: list = []
        last: dict[str, Any] = {}
        with self._stop_on_signals():
            try:
                self._train_loop(logger, meter, pending, last)
            finally:
                close = getattr(self.loader, "close", None)
                if close is not None:
                    close()
                logger.close()
        last["step"], last["tokens"] = self.state.step, self.state.tokens
        return last

    def _train_loop(self, logger: MetricsLogger, meter: Throughput, pending: list, last: dict[str, Any]) -> None:
        log = self.cfg.log
        if self.state.step == 0 and self.validation is not None and self.cfg.eval.interval > 0:
            last.update(self._log_validation(logger))
            meter.update(self.state.tokens)
        previous: HostCopy | None = None  # the guard summary of the step before, on its way to the host
        while self.state.step < self.max_steps:
            loss, grad_norm, summary = self.train_step()
            lr = self.optimizer.param_groups[0]["lr"]
            pending.append((self.state.step, loss, grad_norm, lr, self.state.tokens, summary))
            step, done = self.state.step, self.state.step == self.max_steps
            # Read step-1's outcome now that `step` is enqueued: the device has finished it (or nearly).
            _, _, streak, stop = previous.values() if previous is not None else (0, 0, 0, 0)
            previous = HostCopy(summary)
            too_bad = streak >= self.cfg.train.max_bad_steps > 0
            if stop or too_bad:
                last.update(self._flush(pending, logger, meter, report=True))
                path = self.save()
                logger.plot()
                if too_bad:
                    raise FloatingPointError(
                        f"{int(streak)} consecutive steps up to step {step - 1} had a NaN/Inf loss or gradient "
                        f"norm{' or a loss spike' if self.guard.spike_sigma > 0 else ''} and were skipped "
                        f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); stopped after step {step}. {path} "
                        "holds the weights and optimizer of the last good step, with the data position after the "
                        "bad batches. Lower optim.lr or check the data, then run the same command to resume"
                    )
                name = signal.Signals(self._stop_signal).name if self._stop_signal else "a signal on another rank"
                logger.print(f"stopped by {name} at step {step}; saved {path}; run the same command to resume")
                last["stopped"] = True
                return
            if step % log.interval == 0 or done:
                last.update(self._flush(pending, logger, meter, report=True))
            eval_due = self.cfg.eval.interval > 0 and step % self.cfg.eval.interval == 0
            if self.validation is not None and (eval_due or done):
                last.update(self._flush(pending, logger, meter))
                last.update(self._log_validation(logger))
                meter.update(self.state.tokens)  # keep eval time out of training throughput
            ev = self.cfg.eval
            if ev.tasks and ((ev.task_interval > 0 and step % ev.task_interval == 0) or done):
                last.update(self._flush(pending, logger, meter))
                last.update(self._log_tasks(logger))
                meter.update(self.state.tokens)
            ckpt_due = self.cfg.checkpoint.interval > 0 and step % self.cfg.checkpoint.interval == 0
            if ckpt_due or done:
                last.update(self._flush(pending, logger, meter))
                self.save()
                logger.plot()  # the end of a run always saves, so its plot is complete
                meter.update(self.state.tokens)
            logger.advance(step)
