"""Supervised fine-tuning entry: init.from -> tokenizer + template -> conversations -> packed rows -> model [+ LoRA]
-> parallelize -> optimizer -> the pretraining Trainer, fit.

The Trainer, checkpoints (exact resume), guards, metrics, parallelisms and compute copies are pretraining's; SFT
plugs in its batches (packed rows with document boundaries, `chat.packing`) and its targets (assistant tokens,
`chat.templates`). The steps after `_sft` (tokenizer and template, loader, model, LoRA, parallelism, run files) are
every chat entry's: `dpo` takes them too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llamita.chat.conversations import ConversationRejects, read_conversations
from llamita.chat.packing import Example, PackedLoader, PackedRows, PackedValidation, TreeRows, fit_length, pack
from llamita.chat.templates import add_template_tokens, get_template, render
from llamita.config import ConfigError, RunConfig, check_config, save_config
from llamita.model import ModelConfig
from llamita.model.llama import Llama
from llamita.pretrain import RunStart, build_model, global_batch_sequences, leaving_no_process_group, start_run
from llamita.tokenizer import Tokenizer
from llamita.train.copies import ComputeCopies
from llamita.train.optim import build_optimizer
from llamita.train.parallel import build_mesh, parallelize
from llamita.train.trainer import Trainer


def source_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer that belongs to the weights at `path`: an HF directory's own, or a llamita run's copy."""
    from llamita.interop.checkpoint_io import CheckpointReader

    path = Path(path)
    if (path / "config.json").is_file():
        return Tokenizer.load(path)
    return CheckpointReader(path, verify=False).tokenizer()


def held_out(text: str, seed: int, fraction: float) -> bool:
    """A record's split from a hash of its text: the same conversations (or pairs) are held out in every run."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def build_chat_data(
    cfg: RunConfig, tokenizer: Tokenizer, template: str, log: Any = print
) -> tuple[PackedRows, PackedRows | None, dict[str, Any]]:
    """Read, render, split and pack the conversations of `sft.data`; report rejects and packing.

    Returns:
        Training rows, held-out rows (None when `sft.val_fraction` is 0 or nothing was held out), and a report
        (counts by reason, packing efficiency) that is also printed.

    Raises:
        ConfigError: no conversation left to train on; the message counts the reasons.
    """
    s = cfg.sft
    if not s.data:
        raise ConfigError("sft.data is empty: name the conversation files (e.g. --sft.data '[data/chat/*.jsonl]')")
    rejects = ConversationRejects()
    train: list[Example] = []
    held: list[Example] = []
    truncated = 0
    for conv in read_conversations(s.data, format=s.format, split=s.split or None, rejects=rejects):
        try:
            rendered = render(list(conv.messages), template, tokenizer, train_on=s.train_on)
        except ValueError:
            rejects.add(conv.file, "template_error", conv.where)
            continue
        example = Example(tuple(rendered.ids), tuple(rendered.trainable), conv.source)
        fitted = fit_length(example, cfg.data.seq_len, s.over_length)
        if fitted is None:
            rejects.add(conv.file, "over_length", conv.where)
            continue
        truncated += fitted is not example
        if not any(fitted.trainable[1:]):
            rejects.add(conv.file, "no_trained_token", conv.where)
            continue
        (held if held_out(rendered.text, cfg.train.seed, s.val_fraction) else train).append(fitted)
    pad = tokenizer.eos_id
    rows, stats = pack(train, cfg.data.seq_len, pad_id=pad, packing=s.packing)
    val_rows, val_stats = pack(held, cfg.data.seq_len, pad_id=pad, packing=s.packing)
    report = {
        "conversations": stats.conversations,
        "rows": stats.rows,
        "held_out": val_stats.conversations,
        "trained_tokens": stats.trained_tokens,
        "packing_efficiency": stats.efficiency(cfg.data.seq_len),
        "truncated": truncated,
        "rejected": rejects.total,
        "rejects": rejects.to_dict(),
    }
    log(
        f"chat data: {stats.conversations:,} conversations -> {stats.rows:,} rows of {cfg.data.seq_len} tokens "
        f"(packing efficiency {100 * report['packing_efficiency']:.1f}%, {stats.trained_tokens:,} trained tokens), "
        f"{val_stats.conversations:,} held out, {truncated} truncated at a turn (sft.over_length); " + rejects.summary()
    )
    if stats.rows == 0:
        raise ConfigError(
            f"sft.data: no conversation to train on ({rejects.total} record(s) rejected"
            f"{': ' + rejects.summary() if rejects.total else ''}; data.seq_len={cfg.data.seq_len}, "
            f"sft.over_length={s.over_length})"
        )
    return rows, (val_rows if val_stats.rows else None), report


def chat_model_config(base: ModelConfig, tokenizer: Tokenizer, seq_len: int) -> ModelConfig:
    """The fine-tuned model's architecture: the base's, its vocabulary grown for new template tokens and its context
    for longer rows."""
    return dataclasses.replace(
        base, vocab_size=max(base.vocab_size, tokenizer.vocab_size), max_seq_len=max(base.max_seq_len, seq_len)
    )


def sft(cfg: RunConfig) -> dict[str, Any]:
    """Fine-tune `init.from` on the conversations of `sft.data` (or resume that run); return the final metrics.

    Launched by torchrun, every process calls this; it leaves no process group behind that it created.
    """
    return leaving_no_process_group(_sft, cfg)


def _sft(cfg: RunConfig) -> dict[str, Any]:
    check_chat_run(cfg)
    start = start_run(cfg)
    log = rank0_print(start)
    tokenizer, template = chat_tokenizer(cfg, cfg.sft.template, log)
    rows, val_rows, _ = build_chat_data(cfg, tokenizer, template, log)
    loader, max_steps = chat_loader(cfg, start, rows, cfg.sft.epochs)
    model, model_config = load_chat_model(cfg, tokenizer, start.env.device)
    add_lora(cfg, model, start.env.device, log)
    optimizer = prepare_training(cfg, start, model)
    save_run_files(cfg, start, tokenizer, template, model_config)
    trainer = Trainer(
        cfg,
        model,
        model_config,
        optimizer,
        loader,
        PackedValidation(val_rows) if val_rows is not None else None,
        start.env.device,
        max_steps,
        autocast=start.plan.autocast_dtype,
        tokenizer=tokenizer,
    )
    return trainer.fit()


# ------------------------------------------------------------------------ the steps every chat entry takes (sft, dpo)
def check_chat_run(cfg: RunConfig) -> None:
    """Refuse a fine-tuning config that cannot run: no `init.from`, or LoRA with float8 or with dropout under
    activation checkpointing."""
    check_config(cfg)  # before the checks below read the config
    if not cfg.init.from_:
        raise ConfigError("init.from is empty: name the model to fine-tune (a llamita run, checkpoint or HF dir)")
    if cfg.lora.rank > 0 and cfg.parallel.float8:
        raise ConfigError("lora.rank with parallel.float8: float8 would replace the adapted layers; choose one")
    if cfg.lora.dropout > 0 and cfg.parallel.activation_checkpoint != "none":
        raise ConfigError(
            "lora.dropout with parallel.activation_checkpoint: the recomputed blocks would draw other dropout masks "
            "than the forward did; set lora.dropout 0 or parallel.activation_checkpoint none"
        )


def rank0_print(start: RunStart) -> Callable[..., None]:
    """`print` on rank 0, nothing elsewhere."""
    return print if start.env.rank == 0 else (lambda *a, **k: None)


def chat_tokenizer(cfg: RunConfig, template_spec: str, log: Callable[..., None]) -> tuple[Tokenizer, str]:
    """The run's tokenizer (`data.tokenizer`, else `init.from`'s) with the special tokens of the chat template
    `template_spec` added, and the template's Jinja source."""
    tokenizer = Tokenizer.load(cfg.data.tokenizer) if cfg.data.tokenizer else source_tokenizer(cfg.init.from_)
    template = get_template(template_spec, tokenizer)
    added = add_template_tokens(tokenizer, template)
    if added:
        log(f"template {template_spec}: {added} new special token(s) -> vocabulary {tokenizer.vocab_size}")
    return tokenizer, template


def chat_loader(
    cfg: RunConfig, start: RunStart, rows: PackedRows | TreeRows, epochs: float
) -> tuple[PackedLoader, int]:
    """This rank's loader of the training rows, and the run's optimizer steps (`train.max_steps`, else
    `train.max_tokens`, else `epochs` over the rows)."""
    env = start.env
    global_batch = global_batch_sequences(cfg, env.world_size)
    loader = PackedLoader(
        rows,
        micro_batch=cfg.train.micro_batch,
        global_batch=global_batch,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.train.seed,
    )
    max_steps = cfg.train.max_steps or (
        max(1, cfg.train.max_tokens // cfg.train.global_batch_tokens)
        if cfg.train.max_tokens
        else math.ceil(epochs * len(rows) / global_batch)
    )
    return loader, max_steps


def load_chat_model(cfg: RunConfig, tokenizer: Tokenizer, device: torch.device) -> tuple[Llama, ModelConfig]:
    """`init.from`'s weights in a model of the chat vocabulary and context (`chat_model_config`), unwrapped."""
    from llamita.interop.init_weights import load_init_weights, read_model_config

    base = read_model_config(cfg.init.from_)
    model_config = chat_model_config(base, tokenizer, cfg.data.seq_len)
    # The base's weights in a model of the chat context (the RoPE tables' length is no weight), then new rows for
    # the template's new tokens, started at the mean of the old ones.
    model = build_model(dataclasses.replace(base, max_seq_len=model_config.max_seq_len), device, cfg.train.seed)
    load_init_weights(model, cfg.init.from_)
    if model_config.vocab_size != base.vocab_size:
        from llamita.chat.vocab import resize_token_embeddings

        resize_token_embeddings(model, model_config.vocab_size)
    return model, model_config


def add_lora(cfg: RunConfig, model: Llama, device: torch.device, log: Callable[..., None]) -> None:
    """LoRA adapters on `lora.targets` when `lora.rank` > 0 (only they train then)."""
    if cfg.lora.rank > 0:
        from llamita.chat.lora import LoRAConfig, apply_lora

        generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
        adapted = apply_lora(model, LoRAConfig.of(cfg.lora), generator)
        log(f"LoRA rank {cfg.lora.rank} on {len(adapted)} linear layers; only the adapters train")


def prepare_training(cfg: RunConfig, start: RunStart, model: Llama) -> torch.optim.Optimizer:
    """Parallelize `model` as the run's plan says (mesh, compile, FSDP2, compute copies) and build its optimizer."""
    env, plan = start.env, start.plan
    mesh = build_mesh(env.world_size, cfg.parallel.dp_replicate, env.device.type) if plan.fsdp else None
    parallelize(model, cfg.parallel, mesh, env.device, param_dtype=plan.compute_dtype, weights_dtype=plan.weights_dtype)
    copies = ComputeCopies(model, plan.compute_dtype) if plan.copies else None
    return build_optimizer(model, cfg.optim, env.device, copies)


def save_run_files(
    cfg: RunConfig, start: RunStart, tokenizer: Tokenizer, template: str, model_config: ModelConfig
) -> None:
    """Rank 0 writes the tokenizer (with the chat template and context) and, on a fresh start, config.yaml."""
    if start.env.rank != 0:
        return
    tokenizer.model_max_length = model_config.max_seq_len
    tokenizer.chat_template = template
    tokenizer.save(start.out_dir / "tokenizer")
    if not (start.resuming and (start.out_dir / "config.yaml").is_file()):
        save_config(cfg, start.out_dir / "config.yaml")
