"""Pretraining entry: tokenizer -> data -> model -> parallelize -> optimizer -> trainer -> fit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llamita.config import ConfigError, RunConfig, check_config, save_config
from llamita.data.loader import DataLoader
from llamita.data.mixture import Mixture, MixtureError
from llamita.data.prepare import load_manifest, shard_paths
from llamita.data.shards import ShardError, read_shard
from llamita.evaluate.perplexity import ShardValidation
from llamita.model import Llama, ModelConfig, get_preset
from llamita.tokenizer import Tokenizer
from llamita.train.copies import ComputeCopies
from llamita.train.optim import BatchSchedule, build_optimizer
from llamita.train.parallel import (
    DistEnv,
    ParallelPlan,
    build_mesh,
    end_distributed,
    first_failure,
    init_distributed,
    parallelize,
    plan_parallel,
)
from llamita.train.trainer import Trainer, find_branch, find_resume


def build_model_config(cfg: RunConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The architecture, its vocabulary covering the tokenizer's and its context covering `data.seq_len`.

    A fresh run takes `model.preset` with the tokenizer's vocabulary and `data.seq_len` as its context (the
    lengths it is trained on, which exports and evaluation then use); a run with `init.from` takes the architecture
    of the weights it starts from (an HF directory's config.json, or the checkpoint's model config) and keeps their
    context when it trains on shorter windows.
    """
    if cfg.init.from_:
        from llamita.interop.init_weights import read_model_config

        preset = read_model_config(cfg.init.from_)
        if cfg.model.vocab_size not in (None, preset.vocab_size):
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} differs from the {preset.vocab_size} of init.from "
                f"({cfg.init.from_}); leave model.vocab_size unset when starting from pretrained weights"
            )
        vocab = preset.vocab_size
    else:
        preset = get_preset(cfg.model.preset)
        vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    context = max(preset.max_seq_len, cfg.data.seq_len) if cfg.init.from_ else cfg.data.seq_len
    changes: dict[str, Any] = {"vocab_size": vocab, "max_seq_len": context}
    if cfg.model.tie_embeddings is not None:
        changes["tie_embeddings"] = cfg.model.tie_embeddings
    return dataclasses.replace(preset, **changes)


def build_model(config: ModelConfig, device: torch.device, seed: int) -> Llama:
    """Build on the meta device (no memory), materialise on `device`, then initialise from `seed`.

    Every rank draws the same full weights before FSDP2 shards them, so a run starts from the same model whatever
    the number of ranks.
    """
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(generator)
    return model


def resolve_steps(cfg: RunConfig) -> int:
    """Optimizer steps of the run from `train.max_steps` or `train.max_tokens` (the steps that fit in it, with
    the batch schedule's sizes)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    if cfg.train.max_tokens > 0:
        return max(1, BatchSchedule.of(cfg.train).steps_within(cfg.train.max_tokens))
    raise ConfigError("set train.max_steps or train.max_tokens to a positive number")


def global_batch_sequences(cfg: RunConfig, world_size: int) -> int:
    """Sequences of the first optimizer step; every global token batch (`train.global_batch_tokens` and each of
    `train.batch_stages`) must split into whole micro-batches on every rank."""
    per_micro = cfg.data.seq_len * cfg.train.micro_batch * world_size
    keys = ["train.global_batch_tokens"] + [
        f"train.batch_stages[{i}].global_batch_tokens" for i in range(len(cfg.train.batch_stages))
    ]
    for key, batch in zip(keys, BatchSchedule.of(cfg.train).sizes, strict=True):
        if batch % per_micro:
            raise ConfigError(
                f"{key}={batch} is not a multiple of data.seq_len x train.micro_batch x ranks = "
                f"{cfg.data.seq_len} x {cfg.train.micro_batch} x {world_size} = {per_micro}; pick a multiple such "
                f"as {max(1, round(batch / per_micro)) * per_micro}"
            )
    return cfg.train.global_batch_tokens // cfg.data.seq_len


def build_mixture(cfg: RunConfig) -> Mixture:
    """The source weights per step: `data.stages` if given, else each source's constant `weight`.

    Raises:
        ConfigError: naming the config field (``data.stages[1].weights.web``, ``data.sources[0].weight``) that
            makes the mixture invalid, e.g. a negative weight, or a stage naming a source not in `data.sources`.
    """
    names = [s.name for s in cfg.data.sources]
    try:
        if cfg.data.stages:
            return Mixture.from_config(cfg.data.stages, sources=names)
        return Mixture.constant({s.name: s.weight for s in cfg.data.sources})
    except MixtureError as e:
        if cfg.data.stages:
            where = e.where("data.stages")
        else:
            where = "data.sources" if e.source is None else f"data.sources[{names.index(e.source)}].weight"
        raise ConfigError(f"{where}: {e.problem}") from None


@dataclasses.dataclass(frozen=True)
class SourcesValidation:
    """The validation shards of every source as one stream, and of each source on its own (`eval.per_source`).

    The trainer scores `batches` as `val_loss` and each of `sources` as `val_loss/<name>`.
    """

    whole: ShardValidation
    sources: dict[str, ShardValidation]

    def batches(self, batch_size: int, max_batches: int | None, rank: int, world: int) -> Iterator:
        return self.whole.batches(batch_size, max_batches, rank, world)


def build_data(
    cfg: RunConfig, tokenizer: Tokenizer, rank: int, world_size: int, device: torch.device
) -> tuple[DataLoader, ShardValidation | SourcesValidation | None]:
    """The training loader over the mixture of prepared sources, and the validation set: the validation shards of
    all sources (and with `eval.per_source` of each one), None when no source has any.

    The config is checked (names, paths, mixture) and every manifest read before any shard is.
    """
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty; add prepared sources ({name, path, weight}) to the recipe")
    first: dict[str, int] = {}
    for i, src in enumerate(cfg.data.sources):
        if not src.name or not src.path:
            raise ConfigError(f"data.sources[{i}]: both name and path are required")
        if src.name in first:
            j = first[src.name]
            raise ConfigError(
                f"data.sources[{j}] ({cfg.data.sources[j].path}) and data.sources[{i}] ({src.path}) are both named "
                f"{src.name!r}; give every source its own name (the mixture and the loader state are keyed by it)"
            )
        first[src.name] = i
    mixture = build_mixture(cfg)
    global_batch = global_batch_sequences(cfg, world_size)
    window = cfg.data.seq_len + 1
    train, val, checksums = {}, [], {}
    val_tokens = 0
    per_source: dict[str, list[Path]] = {}
    for i, src in enumerate(cfg.data.sources):
        manifest = load_manifest(Path(src.path))
        if manifest["tokenizer"]["fingerprint"] != tokenizer.fingerprint():
            raise ConfigError(
                f"data.sources[{i}] ({src.path}) was prepared with a different tokenizer than "
                f"{cfg.data.tokenizer}; run `llamita prepare` again with this tokenizer"
            )
        train[src.name] = shard_paths(Path(src.path), "train")
        if not train[src.name]:
            raise ConfigError(
                f"data.sources[{i}] ({src.name!r}, {src.path}) has no training shards (0 train tokens); run "
                "`llamita prepare` again on inputs that hold documents, or remove the source"
            )
        train_tokens = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")
        if train_tokens < window:
            raise ConfigError(
                f"data.sources[{i}] ({src.name!r}, {src.path}) holds {train_tokens} training tokens, fewer than one "
                f"window of data.seq_len + 1 = {window}; add data to it, lower data.seq_len, or remove the source"
            )
        # The manifest's sha256 of each shard: a resume refuses shards replaced since the checkpoint.
        checksums[src.name] = [s["sha256"] for s in manifest["shards"] if s["split"] == "train"]
        own = shard_paths(Path(src.path), "val")
        own_tokens = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "val")
        if cfg.eval.per_source and own:
            if own_tokens // window < world_size:
                raise ConfigError(
                    f"data.sources[{i}] ({src.name!r}, {src.path}) holds {own_tokens} validation tokens, fewer than "
                    f"one window of data.seq_len + 1 = {window} per rank ({world_size} rank(s)), for eval.per_source; "
                    "prepare it with a larger --val-fraction, lower data.seq_len, or set eval.per_source=false"
                )
            per_source[src.name] = own
        val += own
        val_tokens += own_tokens
    if val and val_tokens // window < world_size:
        raise ConfigError(
            f"the validation shards of data.sources hold {val_tokens} tokens, fewer than one window of "
            f"data.seq_len + 1 = {window} per rank ({world_size} rank(s)), so no validation loss could be computed; "
            "prepare with a larger --val-fraction or lower data.seq_len"
        )
    verify_shards(
        [path for paths in train.values() for path in paths] + val,
        tokenizer.vocab_size,
        rank,
        world_size,
        check_tokens=cfg.data.verify_tokens,
    )
    loader = DataLoader(
        train,
        mixture,
        seq_len=cfg.data.seq_len,
        micro_batch=cfg.train.micro_batch,
        global_batch=global_batch,
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed,
        vocab_size=tokenizer.vocab_size,
        prefetch=cfg.data.prefetch,
        pin_memory=device.type == "cuda",
        checksums=checksums,
        batch_schedule=BatchSchedule.of(cfg.train) if cfg.train.batch_stages else None,
    )
    if not val:
        return loader, None
    # The shards were written for the tokenizer's vocabulary, which the model's may exceed (padding).
    whole = ShardValidation(val, cfg.data.seq_len, tokenizer.vocab_size)
    if not cfg.eval.per_source:
        return loader, whole
    sources = {
        name: ShardValidation(paths, cfg.data.seq_len, tokenizer.vocab_size) for name, paths in per_source.items()
    }
    return loader, SourcesValidation(whole, sources)


def verify_shards(paths: list[Path], vocab_size: int, rank: int, world_size: int, check_tokens: bool) -> None:
    """Check the shards before training: every header and size, and the token ids of this rank's share.

    Headers are cheap, so every rank reads all of them. With `check_tokens` each rank reads every token of the shards
    ``paths[rank::world_size]`` (the cost of `data.verify_tokens`); the ranks then share what they found, so all of
    them stop with the same error instead of one rank failing while the others wait for it.

    Raises:
        ShardError: naming the first bad shard (header, size, vocabulary, or a token id >= `vocab_size`).
    """
    for path in paths:
        read_shard(path, vocab_size=vocab_size, check_tokens=False)
    error = None
    if check_tokens:
        for path in paths[rank::world_size]:
            try:
                read_shard(path, vocab_size=vocab_size)
            except ShardError as e:
                error = str(e)
                break
        failure = first_failure(error)
        if failure is not None:
            raise ShardError(failure[1])


def check_eval_tasks(cfg: RunConfig) -> None:
    """Refuse unknown tasks or missing task data in `eval.tasks` now, not after hours of training."""
    if not cfg.eval.tasks:
        return
    from llamita.evaluate.tasks import SUITE

    unknown = sorted(set(cfg.eval.tasks) - set(SUITE))
    if unknown:
        raise ConfigError(f"eval.tasks: unknown task(s) {unknown}; choose from {', '.join(SUITE)}")
    missing = [f"{task}: {path}" for task, path in cfg.eval.tasks.items() if not Path(path).exists()]
    if missing:
        raise ConfigError(f"eval.tasks: no such file or directory for {'; '.join(missing)}")


def pretrain(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) the pretraining described by `cfg`, on this process's rank; return the final metrics.

    Launched by torchrun, every process calls this; it leaves no process group behind that it created.
    """
    return leaving_no_process_group(_pretrain, cfg)


def leaving_no_process_group(entry: Callable[[RunConfig], dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """Run a training entry (`_pretrain`, `sft._sft`), then tear down the process group it created, if any."""
    had_group = dist.is_initialized()
    finished = False
    try:
        result = entry(cfg)
        finished = True
        return result
    finally:
        if not had_group and dist.is_initialized():
            if finished:
                end_distributed()
            else:  # a rank that raised: the others raise too (`first_failure`), none waits at a last barrier
                dist.destroy_process_group()


@dataclasses.dataclass(frozen=True)
class RunStart:
    """What every training entry sets up first (`start_run`)."""

    env: DistEnv
    plan: ParallelPlan
    out_dir: Path
    resuming: bool
    """The run directory holds a checkpoint this config resumes."""
    branch: Path | None
    """The parent checkpoint when this run branches (`init.branch_from`, and nothing of its own to resume)."""


def start_run(cfg: RunConfig) -> RunStart:
    """The steps every training entry (`pretrain`, `sft`) takes before its data: check the config, join the process
    group, plan the parallelism, seed, create the run directory, and find the checkpoint to resume, which refuses a
    config that changes the run's math before any data or model is touched (it reads one trainer state), or the
    checkpoint a new branch starts from."""
    check_config(cfg)  # a config built in Python has not been through load_config's check
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    env = init_distributed(cfg.train.device)
    plan = plan_parallel(cfg, env)
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resuming = find_resume(cfg) is not None
    return RunStart(env, plan, out_dir, resuming, find_branch(cfg) if cfg.init.branch_from and not resuming else None)


def _pretrain(cfg: RunConfig) -> dict[str, Any]:
    start = start_run(cfg)
    env, plan, out_dir, resuming = start.env, start.plan, start.out_dir, start.resuming
    if start.branch is not None:  # the branch's config.yaml and checkpoints name the parent checkpoint it took
        cfg = dataclasses.replace(cfg, init=dataclasses.replace(cfg.init, branch_from=str(start.branch)))

    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty; point it at a tokenizer directory (llamita train-tokenizer)")
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    check_eval_tasks(cfg)
    loader, validation = build_data(cfg, tokenizer, env.rank, env.world_size, env.device)
    max_steps = resolve_steps(cfg)

    model_config = build_model_config(cfg, tokenizer)
    if env.rank == 0:  # the run's copy states the model's context, as its HF export does
        tokenizer.model_max_length = model_config.max_seq_len
        tokenizer.save(out_dir / "tokenizer")
    model = build_model(model_config, env.device, cfg.train.seed)
    if cfg.init.from_:
        # Continual pretraining: weights only; a checkpoint of this run (checkpoint.resume) still takes precedence.
        from llamita.interop.init_weights import load_init_weights

        load_init_weights(model, cfg.init.from_)
    mesh = build_mesh(env.world_size, cfg.parallel.dp_replicate, env.device.type) if plan.fsdp else None
    parallelize(model, cfg.parallel, mesh, env.device, param_dtype=plan.compute_dtype, weights_dtype=plan.weights_dtype)
    copies = ComputeCopies(model, plan.compute_dtype) if plan.copies else None
    optimizer = build_optimizer(model, cfg.optim, env.device, copies)
    if env.rank == 0 and not (resuming and (out_dir / "config.yaml").is_file()):
        save_config(cfg, out_dir / "config.yaml")  # a resume keeps the first start's (changes: CONFIG_CHANGES_FILE)

    trainer = Trainer(
        cfg,
        model,
        model_config,
        optimizer,
        loader,
        validation,
        env.device,
        max_steps,
        autocast=plan.autocast_dtype,
        tokenizer=tokenizer,
    )
    return trainer.fit()
