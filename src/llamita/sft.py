"""Supervised fine-tuning entry: init.from -> tokenizer + template -> conversations -> packed rows -> model [+ LoRA]
-> parallelize -> optimizer -> the pretraining Trainer, fit.

The Trainer, checkpoints (exact resume), guards, metrics, parallelisms and compute copies are pretraining's; SFT
plugs in its batches (packed rows with document boundaries, `chat.packing`) and its targets (assistant tokens,
`chat.templates`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

import torch

from llamita.chat.conversations import ConversationRejects, read_conversations
from llamita.chat.packing import Example, PackedLoader, PackedRows, PackedValidation, fit_length, pack
from llamita.chat.templates import add_template_tokens, get_template, render
from llamita.config import ConfigError, RunConfig, check_config, save_config
from llamita.model import ModelConfig
from llamita.pretrain import build_model, global_batch_sequences, leaving_no_process_group, start_run
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


def _held_out(text: str, seed: int, fraction: float) -> bool:
    """A conversation's split from a hash of its text: the same conversations are held out in every run."""
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
        (held if _held_out(rendered.text, cfg.train.seed, s.val_fraction) else train).append(fitted)
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
    start = start_run(cfg)
    env, plan, out_dir, resuming = start.env, start.plan, start.out_dir, start.resuming

    from llamita.interop.init_weights import load_init_weights, read_model_config

    tokenizer = Tokenizer.load(cfg.data.tokenizer) if cfg.data.tokenizer else source_tokenizer(cfg.init.from_)
    template = get_template(cfg.sft.template, tokenizer)
    added = add_template_tokens(tokenizer, template)
    log = print if env.rank == 0 else (lambda *a, **k: None)
    if added:
        log(f"template {cfg.sft.template}: {added} new special token(s) -> vocabulary {tokenizer.vocab_size}")
    rows, val_rows, _ = build_chat_data(cfg, tokenizer, template, log)
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
        else math.ceil(cfg.sft.epochs * len(rows) / global_batch)
    )

    base = read_model_config(cfg.init.from_)
    model_config = chat_model_config(base, tokenizer, cfg.data.seq_len)
    # The base's weights in a model of the chat context (the RoPE tables' length is no weight), then new rows for
    # the template's new tokens, started at the mean of the old ones.
    model = build_model(dataclasses.replace(base, max_seq_len=model_config.max_seq_len), env.device, cfg.train.seed)
    load_init_weights(model, cfg.init.from_)
    if model_config.vocab_size != base.vocab_size:
        from llamita.chat.vocab import resize_token_embeddings

        resize_token_embeddings(model, model_config.vocab_size)
    if cfg.lora.rank > 0:
        from llamita.chat.lora import LoRAConfig, apply_lora

        generator = torch.Generator(device=env.device).manual_seed(cfg.train.seed)
        adapted = apply_lora(model, LoRAConfig.of(cfg.lora), generator)
        log(f"LoRA rank {cfg.lora.rank} on {len(adapted)} linear layers; only the adapters train")
    mesh = build_mesh(env.world_size, cfg.parallel.dp_replicate, env.device.type) if plan.fsdp else None
    parallelize(model, cfg.parallel, mesh, env.device, param_dtype=plan.compute_dtype)
    copies = ComputeCopies(model, plan.compute_dtype) if plan.copies else None
    optimizer = build_optimizer(model, cfg.optim, env.device, copies)
    if env.rank == 0:
        tokenizer.model_max_length = model_config.max_seq_len
        tokenizer.chat_template = template
        tokenizer.save(out_dir / "tokenizer")
        if not (resuming and (out_dir / "config.yaml").is_file()):
            save_config(cfg, out_dir / "config.yaml")
    trainer = Trainer(
        cfg,
        model,
        model_config,
        optimizer,
        loader,
        PackedValidation(val_rows) if val_rows is not None else None,
        env.device,
        max_steps,
        autocast=plan.autocast_dtype,
        tokenizer=tokenizer,
    )
    return trainer.fit()
