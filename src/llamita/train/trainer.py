"""The training loop: micro-steps with gradient accumulation, clipping, schedule, validation, logging, checkpoints.

The trainer receives a model that is already built, initialised and (for multi-GPU) wrapped from outside; it
never constructs parallelism itself. Per-step losses stay on the device until a log interval flushes them. Whether
a step may change the weights (NaN/Inf, loss spikes) is decided on the device by `guard.StepGuard` and handed to
the fused AdamW kernel; the host reads each step's outcome one step late, so it keeps running up to one step
ahead of the device (torchao's optimizers, for bf16 weights or 8-bit moments, take no device flag: each step's
skip decision is read on the host, `optim.clipped_step`). SIGTERM/SIGINT make every rank save a checkpoint at
the same step boundary and return. A resume refuses a config that changes the run's math since the checkpoint
unless `checkpoint.allow_config_change` (`find_resume`). A branch (`init.branch_from`, `find_branch`) starts a new
run from another run's checkpoint with its weights, optimizer, step and tokens, and a new data order. The global
batch follows `train.batch_stages` and the learning rate the tokens seen (`optim.BatchSchedule`, `optim.LRSchedule`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from llamita.config import (
    UNSET,
    ConfigError,
    RunConfig,
    changes_math,
    describe_change,
    resume_changes,
    to_dict,
)
from llamita.evaluate.perplexity import mean_loss
from llamita.model.config import ModelConfig
from llamita.tokenizer import Tokenizer
from llamita.train import checkpoint as ckpt
from llamita.train.guard import HostCopy, StepGuard
from llamita.train.metrics import MetricsLogger, Throughput, peak_flops
from llamita.train.optim import BatchSchedule, LRSchedule, clipped_step, gradient_norm, set_lr


def causal_lm_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over the targets that are not -100; inputs and targets are [B, T].

    The model computes it (chunked, from its output head) so the full logits are never materialised. `positions`
    ([B, T], restarting at 0 at each document) marks packed documents, which then attend only to themselves.
    """
    return model(inputs, targets=targets, positions=positions)  # scalar


class Objective(Protocol):
    """What the trainer minimises: `CausalLM` (pretraining, SFT), `chat.preference_objective.PreferenceObjective`
    (DPO and its variants)."""

    def loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A micro-batch's scalar loss (a mean over what `count` counts) and its metrics (device scalars, means over
        the same), from the loader's batch on the device."""
        ...

    def count(self, batch: Sequence[torch.Tensor]) -> int:
        """What the loss averages over in one host micro-batch: weights micro-batches of a `token_weighted` loader."""
        ...

    def validate(
        self,
        model: nn.Module,
        batches: Iterable[tuple[torch.Tensor, ...]],
        *,
        device: torch.device,
        autocast: contextlib.AbstractContextManager | None = None,
    ) -> dict[str, float]:
        """The scores of a held-out set's batches (at least `val_loss`), summed over ranks."""
        ...


class CausalLM:
    """Next-token cross-entropy on the targets that are not -100 (`causal_lm_loss`), validated by `mean_loss`."""

    def loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return causal_lm_loss(model, *batch), {}

    def count(self, batch: Sequence[torch.Tensor]) -> int:
        return int((batch[1] != -100).sum())

    def validate(
        self,
        model: nn.Module,
        batches: Iterable[tuple[torch.Tensor, ...]],
        *,
        device: torch.device,
        autocast: contextlib.AbstractContextManager | None = None,
    ) -> dict[str, float]:
        return mean_loss(model, batches, device=device, autocast=autocast)


class Validation(Protocol):
    """A held-out set the trainer scores (`evaluate.perplexity.ShardValidation`, `chat.packing.PackedValidation`).

    One with a `sources` mapping ({name: Validation}, `pretrain.SourcesValidation`) has each part scored on its own
    too, as `val_loss/<name>`.
    """

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


def find_branch(cfg: RunConfig) -> Path:
    """The checkpoint `init.branch_from` names (a run directory: its latest complete one), checked to hold an
    optimizer and data state (`config.check_config` has checked that it is not in `cfg.out_dir`).

    Raises:
        CheckpointError: no such checkpoint, or it holds weights only.
    """
    path = ckpt.resolve_checkpoint(cfg.init.branch_from)
    if "loader" not in ckpt.read_state(path):
        raise ckpt.CheckpointError(
            f"init.branch_from: {path} holds weights only (no optimizer or data state); start from it with "
            f"--init.from {path} instead (fresh optimizer and schedule)"
        )
    return path


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
        tokenizer: the run's tokenizer, for `eval.tasks`.
        objective: what to minimise and how to validate (`Objective`); default `CausalLM`. Its metrics are
            averaged over the step's micro-batches and ranks as the loss is, and logged in each training row.
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
        objective: Objective | None = None,
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
        self.batch = BatchSchedule.of(cfg.train)
        self.lr = LRSchedule.of(cfg.optim, self.batch, max_steps)
        self.accum = 0  # this step's gradient accumulation and global batch in tokens: `_set_batch`
        self.tokens_per_step = 0
        self.state = TrainState()
        self.branched_from: dict[str, Any] | None = None  # the parent checkpoint of a branch (`branch`)
        self.autocast: contextlib.AbstractContextManager = (
            contextlib.nullcontext() if autocast is None else torch.autocast(device.type, dtype=autocast)
        )
        self.autocast_dtype = autocast
        self.tokenizer = tokenizer
        self.objective: Objective = objective if objective is not None else CausalLM()
        self.step_metrics: dict[str, torch.Tensor] = {}  # the last step's objective metrics, on the device
        if cfg.eval.tasks and tokenizer is None:
            raise ValueError("eval.tasks needs the tokenizer: pass tokenizer= to the Trainer")
        self._batches: Iterator | None = None
        self.config_changes: dict[str, tuple[Any, Any]] = {}  # since the checkpoint `resume` loaded
        self._stop_signal = 0  # set by a SIGTERM/SIGINT handler while `fit` runs
        self._set_batch()
        self.guard = StepGuard(device, self.world_size, cfg.train.spike_sigma, cfg.train.spike_window)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides model and optimizer tensors (plain JSON types)."""
        return {
            "step": self.state.step,
            "tokens": self.state.tokens,
            **self.guard.state_dict(),
            "loader": self.loader.state_dict(),
            **({"branched_from": self.branched_from} if self.branched_from else {}),
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
        self.branched_from = state.get("branched_from")
        return path

    def branch(self) -> tuple[Path, dict[str, int]]:
        """Start this run from the checkpoint `init.branch_from` names (`find_branch`): its weights, optimizer,
        RNG, step, tokens and guard window, and a new data order at its position (`DataLoader.branch_from`).

        Returns:
            The parent checkpoint, and the draws of each source whose order continues the parent's.

        Raises:
            CheckpointError: the parent's model config differs from this run's, or its data position does not fit
                this run's batch sizes.
            ConfigError: this loader cannot branch.
        """
        if not hasattr(self.loader, "branch_from"):
            raise ConfigError(f"init.branch_from: {type(self.loader).__name__} data cannot branch; use init.from")
        path = find_branch(self.cfg)
        ours = dataclasses.asdict(self.model_config)
        theirs = ckpt.read_state(path)["model_config"]
        diff = [f"{k}: {theirs.get(k)!r} (parent) != {v!r}" for k, v in ours.items() if theirs.get(k) != v]
        if diff:
            raise ckpt.CheckpointError(
                f"init.branch_from: {path} holds another model than this run's ({'; '.join(diff)}); a branch "
                "continues the parent's weights and optimizer, so set model.* and data.seq_len as in its "
                f"config ({path.parent.parent / 'config.yaml'}), or use init.from for other weights"
            )
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        try:
            carried = self.loader.branch_from(state["loader"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"init.branch_from: {path}: cannot branch the data order: {e}") from None
        self.state = TrainState(step=state["step"], tokens=state["tokens"])
        self.guard.load_state_dict(state)
        changes = {k: v for k, v in resume_changes(state["run_config"], self.cfg).items() if changes_math(k)}
        self.branched_from = {
            "checkpoint": str(path),
            "step": self.state.step,
            "tokens": self.state.tokens,
            "changes": {k: {s: x for s, x in zip(("parent", "new"), v) if x is not UNSET} for k, v in changes.items()},
            **({"parent": state["branched_from"]} if "branched_from" in state else {}),
        }
        return path, carried

    def _set_batch(self) -> bool:
        """Take the global batch and accumulation of the step about to run from the batch schedule; True when they
        changed. The accumulation is derived and checked against the loader's."""
        tokens = self.batch.at(self.state.tokens)
        if tokens == self.tokens_per_step:
            return False
        self.tokens_per_step = tokens
        self.accum = tokens // (self.cfg.data.seq_len * self.cfg.train.micro_batch * self.world_size)
        if self.accum != self.loader.micro_steps_per_step:
            raise RuntimeError(
                f"the loader yields {self.loader.micro_steps_per_step} micro-batches per step at {self.state.tokens} "
                f"tokens, the batch schedule {self.accum} ({tokens} tokens per step); build the loader with "
                "the run's batch schedule"
            )
        copies = getattr(self.optimizer, "copies", None)
        if copies is not None:  # bf16 gradients of several micro-batches are summed in fp32
            copies.accumulate_fp32 = self.accum > 1
        return True

    # ------------------------------------------------------------------------------------------ loop
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over `accum` micro-batches; returns (mean loss, grad norm, guard summary).

        All three stay on the device. A step whose loss or gradient norm is NaN/Inf on any rank (or a loss spike,
        when the guard is on) leaves weights and optimizer state untouched; see `guard.StepGuard`.
        """
        assert self._batches is not None
        set_lr(self.optimizer, self.lr.at(self.state.tokens))
        loss_sum = torch.zeros((), device=self.device)
        step_metrics: dict[str, torch.Tensor] = {}
        micro_batches = [next(self._batches) for _ in range(self.accum)]
        weights = self._micro_weights(micro_batches)
        for micro, batch in enumerate(micro_batches):
            batch = [t.to(self.device, non_blocking=True) for t in batch]  # inputs, targets[, positions]
            if hasattr(self.model, "set_requires_gradient_sync"):
                # FSDP2: reduce-scatter gradients only on the last micro-batch of the step.
                self.model.set_requires_gradient_sync(micro == self.accum - 1)
            with self.autocast:
                loss, metrics = self.objective.loss(self.model, batch)
            (loss / self.accum if weights is None else loss * weights[micro]).backward()
            loss_sum += loss.detach() if weights is None else loss.detach() * weights[micro] * self.accum
            for name, value in metrics.items():  # weighted as the loss: their step value is a mean over ranks
                share = value / self.accum if weights is None else value * weights[micro]
                step_metrics[name] = step_metrics[name] + share if name in step_metrics else share
        self.step_metrics = step_metrics
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
        """Each micro-batch's share of what the step's loss averages over (the objective's `count`: targets; pairs for
        DPO) over all ranks, times the ranks (which gradient reduction averages), for a token-weighted loader; None
        when every micro-batch holds the same number (pretraining)."""
        if not getattr(self.loader, "token_weighted", False):
            return None
        counts = torch.tensor([self.objective.count(b) for b in micro_batches], dtype=torch.float32)
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
        """Validation loss and perplexity on the held-out shards (mean over ranks), and `val_loss/<name>` for each
        part of a validation set with `sources`.

        Runs the compiled blocks eagerly: their graphs stay the training step's, and validation batches of another
        size cost no recompilation (the same for `eval.tasks`).
        """
        ev = self.cfg.eval
        assert self.validation is not None
        parts = {"": self.validation, **getattr(self.validation, "sources", {})}
        result: dict[str, float] = {}
        for name, part in parts.items():
            # Rank r scores windows r, r + world, ...: batches / world per rank covers the windows of one rank.
            batches = part.batches(ev.batch_size, -(-ev.batches // self.world_size), self.rank, self.world_size)
            with torch.compiler.set_stance("force_eager"):
                scores = self.objective.validate(self.model, batches, device=self.device, autocast=self.autocast)
            result.update(scores if not name else {f"val_loss/{name}": scores["val_loss"]})
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
        names = list(pending[0][7])  # the objective's metrics, the same every step
        extras = torch.stack([torch.stack(list(p[7].values())) for p in pending]) if names else None  # [steps, k]
        if self.world_size > 1:
            dist.all_reduce(losses, op=dist.ReduceOp.SUM)
            losses /= self.world_size
            if extras is not None:
                dist.all_reduce(extras, op=dist.ReduceOp.SUM)
                extras /= self.world_size
        tokens_per_s, mfu = meter.update(self.state.tokens)
        # Host-side allocator counter: reading it does not synchronise with the device.
        memory = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        row: dict[str, Any] = {}
        for (step, _, _, lr, tokens, _, batch, _), loss, norm, summary, extra in zip(
            pending, losses.tolist(), norms.tolist(), summaries, extras.tolist() if names else [[]] * len(pending)
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
            if len(self.batch.stages) > 1:
                row["batch_tokens"] = batch
            if self.guard.spike_sigma > 0:
                row["spike_steps"] = int(summary[1])
            if mfu is not None:
                row["mfu"] = mfu
            if memory is not None:
                row["max_memory_gib"] = memory
            row.update(zip(names, extra))
            logger.log(row)
        pending.clear()
        if report:
            logger.report(row)
        return row

    def _log_validation(self, logger: MetricsLogger) -> dict[str, float]:
        result = self.validate()
        logger.log({"step": self.state.step, "tokens": self.state.tokens, **result})
        parts = "".join(f" | {k.removeprefix('val_loss/')} {v:.4f}" for k, v in result.items() if "/" in k)
        ppl = f" | ppl {result['val_ppl']:.2f}" if "val_ppl" in result else ""
        logger.print(f"step {self.state.step:>6} | val loss {result['val_loss']:.4f}{ppl}{parts}")
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
        branched = self.branch() if resumed is None and self.cfg.init.branch_from else None
        self._set_batch()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = self.cfg.log
        logger = MetricsLogger(
            self.out_dir,
            self.max_steps,
            start_step=self.state.step,
            tensorboard=log.tensorboard,
            progress=log.progress,
            enabled=self.rank == 0,
            wandb=self.cfg if log.wandb else None,
        )
        mc = self.model_config
        logger.print(
            f"model {mc.num_params / 1e6:.2f}M params ({mc.num_non_embedding_params / 1e6:.2f}M non-embedding), "
            f"{mc.flops_per_token(self.cfg.data.seq_len) / 1e6:.1f} MFLOPs/token | "
            f"{self.tokens_per_step:,} tokens/step = {self.cfg.train.micro_batch} seq x {self.accum} accum x "
            f"{self.world_size} ranks x {self.cfg.data.seq_len} tokens | {self.max_steps:,} steps on "
            f"{self.device.type}{f' ({self.autocast_dtype} autocast)' if self.autocast_dtype else ''} | "
            f"{self.cfg.train.weights} weights, {self.cfg.optim.name}"
        )
        if len(self.batch.stages) > 1:
            stages = ", ".join(f"{batch:,} from {start:,}" for start, batch in self.batch.stages[1:])
            logger.print(f"batch schedule (tokens/step from tokens seen): {self.batch.first:,} from 0, {stages}")
        if resumed is not None:
            logger.print(f"resumed from {resumed} at step {self.state.step}")
            if self.config_changes:
                self._record_config_changes(resumed, logger)
        if branched is not None:
            self._log_branch(*branched, logger)
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

    def _log_branch(self, path: Path, carried: dict[str, int], logger: MetricsLogger) -> None:
        """Say where this branch starts and what it changed, and record it as a metrics row."""
        assert self.branched_from is not None
        continued = ", ".join(f"{name} at draw {n:,}" for name, n in carried.items()) or "none"
        logger.print(
            f"branched from {path} at step {self.state.step} ({self.state.tokens:,} tokens): weights, optimizer and "
            f"schedule continue; new data order (sources continuing the parent's: {continued})"
        )
        changes = self.branched_from["changes"]
        if changes:
            shown = "; ".join(
                describe_change(k, v.get("parent", UNSET), v.get("new", UNSET)) for k, v in changes.items()
            )
            logger.print(f"changed from the parent's config: {shown}")
        logger.log({"step": self.state.step, "tokens": self.state.tokens, "branched_from": str(path)})

    def _train_loop(self, logger: MetricsLogger, meter: Throughput, pending: list, last: dict[str, Any]) -> None:
        log = self.cfg.log
        if self.state.step == 0 and self.validation is not None and self.cfg.eval.interval > 0:
            last.update(self._log_validation(logger))
            meter.update(self.state.tokens)
        previous: HostCopy | None = None  # the guard summary of the step before, on its way to the host
        while self.state.step < self.max_steps:
            before = (self.tokens_per_step, self.accum)
            if self._set_batch():
                logger.print(
                    f"step {self.state.step + 1:>6} | tokens {self.state.tokens:,} | global batch {before[0]:,} -> "
                    f"{self.tokens_per_step:,} tokens | accumulation {before[1]} -> {self.accum}"
                )
            loss, grad_norm, summary = self.train_step()
            lr = float(self.optimizer.param_groups[0]["lr"])  # a CPU tensor in torchao's optimizers: no sync
            row = (self.state.step, loss, grad_norm, lr, self.state.tokens, summary, self.tokens_per_step)
            pending.append((*row, self.step_metrics))
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
