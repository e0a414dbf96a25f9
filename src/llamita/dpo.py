"""Preference tuning entry (DPO and its variants): init.from -> tokenizer + template -> preference pairs -> trees in
packed rows -> model [+ LoRA] -> parallelize -> optimizer -> reference log-probs (once, stored) -> the pretraining
Trainer with the preference objective, fit.

The steps are SFT's (`sft`), the Trainer, checkpoints, guards and metrics pretraining's. DPO plugs in its batches
(each pair a tree: the prompt once and both answers, `chat.packing.pack_pairs`), its objective
(`chat.preference_objective`: one forward pass per micro-batch, only answer tokens through the output head) and
its reference: the starting model's log-probs of every pair, computed before the first step and stored in the run
directory (`chat.reference_logps`), so only one model is in memory while training; or, with
`dpo.reference: live`, a frozen copy of the starting model run on every batch as TRL does.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from typing import Any

import torch
from torch import nn

from llamita.chat.packing import PackedValidation, Pair, TreeRows, fit_pair, pack_pairs
from llamita.chat.preference_loss import PreferenceLoss
from llamita.chat.preference_objective import PreferenceObjective
from llamita.chat.preferences import Preference, PreferenceRejects, read_preferences
from llamita.chat.reference_logps import reference_logps
from llamita.chat.templates import render_answers
from llamita.config import ConfigError, RunConfig
from llamita.pretrain import RunStart, leaving_no_process_group, start_run
from llamita.sft import (
    add_lora,
    chat_loader,
    chat_tokenizer,
    check_chat_run,
    held_out,
    load_chat_model,
    prepare_training,
    rank0_print,
    save_run_files,
)
from llamita.tokenizer import Tokenizer
from llamita.train.parallel import build_mesh, parallelize
from llamita.train.trainer import Trainer


def build_preference_data(
    cfg: RunConfig, tokenizer: Tokenizer, template: str, log: Any = print
) -> tuple[TreeRows, TreeRows | None, dict[str, Any]]:
    """Read, render, fit, split and pack the preference pairs of `dpo.data`; report rejects and packing.

    Pairs are numbered (their ids, the rows of the stored reference log-probs) training pairs first, in reading
    order, then the held-out ones: `dpo.val_split` of the same inputs, or `dpo.val_fraction` of them by a hash of
    their text.

    Returns:
        Training rows, held-out rows (None when nothing is held out), and a report (counts by reason, packing
        efficiency) that is also printed.

    Raises:
        ConfigError: no pair left to train on; the message counts the reasons.
    """
    d = cfg.dpo
    if not d.data:
        raise ConfigError("dpo.data is empty: name the preference files (e.g. --dpo.data '[data/prefs/*.jsonl]')")
    rejects = PreferenceRejects()
    truncated = 0
    train: list[Pair] = []
    held: list[Pair] = []

    def add(pref: Preference, to: list[Pair]) -> None:
        nonlocal truncated
        try:
            prompt, (chosen, rejected) = render_answers(pref.prompt, [pref.chosen, pref.rejected], template, tokenizer)
        except ValueError:
            rejects.add(pref.file, "template_error", pref.where)
            return
        pair = Pair(tuple(prompt), tuple(chosen), tuple(rejected), -1, pref.source)
        fit = fit_pair(pair, d.max_length, d.max_prompt_length, d.over_length)
        if fit is None or len(fit) > cfg.data.seq_len:
            rejects.add(pref.file, "over_length", pref.where)
            return
        truncated += fit is not pair
        to.append(fit)

    for pref in read_preferences(d.data, format=d.format, split=d.split or None, rejects=rejects):
        split_off = not d.val_split and held_out(_text(pref), cfg.train.seed, d.val_fraction)
        add(pref, held if split_off else train)
    if d.val_split:
        for pref in read_preferences(d.data, format=d.format, split=d.val_split, rejects=rejects):
            add(pref, held)
    numbered = [dataclasses.replace(p, id=i) for i, p in enumerate(train + held)]
    pad = tokenizer.eos_id
    rows, stats = pack_pairs(numbered[: len(train)], cfg.data.seq_len, pad_id=pad, packing=d.packing)
    val_rows, val_stats = pack_pairs(numbered[len(train) :], cfg.data.seq_len, pad_id=pad, packing=d.packing)
    report = {
        "pairs": stats.conversations,
        "rows": stats.rows,
        "held_out": val_stats.conversations,
        "scored_tokens": stats.trained_tokens,
        "packing_efficiency": stats.efficiency(cfg.data.seq_len),
        "truncated": truncated,
        "rejected": rejects.total,
        "rejects": rejects.to_dict(),
    }
    log(
        f"preference data: {stats.conversations:,} pairs -> {stats.rows:,} rows of {cfg.data.seq_len} slots "
        f"({stats.conversations / max(1, stats.rows):.1f} pairs per row, packing efficiency "
        f"{100 * report['packing_efficiency']:.1f}%, {stats.trained_tokens:,} answer tokens), "
        f"{val_stats.conversations:,} held out, {truncated} truncated (dpo.over_length); " + rejects.summary()
    )
    if stats.rows == 0:
        raise ConfigError(
            f"dpo.data: no pair to train on ({rejects.total} record(s) rejected"
            f"{': ' + rejects.summary() if rejects.total else ''}; data.seq_len={cfg.data.seq_len}, "
            f"dpo.max_length={d.max_length}, dpo.over_length={d.over_length})"
        )
    return rows, (val_rows if val_stats.rows else None), report


def _text(pref: Preference) -> str:
    """What a pair's split is hashed from: its whole content."""
    return json.dumps([list(pref.prompt), pref.chosen, pref.rejected], ensure_ascii=False)


def frozen_reference(cfg: RunConfig, start: RunStart, model: nn.Module) -> nn.Module:
    """`model` (a copy of the starting model) as a live reference: no gradients, eval mode, and parallelized as the
    policy is (without activation checkpointing, which only pays for a backward pass)."""
    model.requires_grad_(False)
    model.eval()
    env, plan = start.env, start.plan
    if plan.copies:  # the policy computes with bf16 copies of its weights; a frozen model can just be bf16
        model.to(plan.compute_dtype)
    mesh = build_mesh(env.world_size, cfg.parallel.dp_replicate, env.device.type) if plan.fsdp else None
    par = dataclasses.replace(cfg.parallel, activation_checkpoint="none")
    return parallelize(model, par, mesh, env.device, param_dtype=plan.compute_dtype, weights_dtype=plan.weights_dtype)


def dpo(cfg: RunConfig) -> dict[str, Any]:
    """Preference-tune `init.from` on the pairs of `dpo.data` (or resume that run); return the final metrics.

    Launched by torchrun, every process calls this; it leaves no process group behind that it created.
    """
    return leaving_no_process_group(_dpo, cfg)


def _dpo(cfg: RunConfig) -> dict[str, Any]:
    check_chat_run(cfg)
    d = cfg.dpo
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(
            f"dpo.max_prompt_length={d.max_prompt_length} must be below dpo.max_length={d.max_length}: truncation "
            "keeps that much prompt and cuts the answers to the rest"
        )
    start = start_run(cfg)
    env, plan = start.env, start.plan
    log = rank0_print(start)
    tokenizer, template = chat_tokenizer(cfg, d.template, log)
    rows, val_rows, _ = build_preference_data(cfg, tokenizer, template, log)
    loader, max_steps = chat_loader(cfg, start, rows, d.epochs)
    model, model_config = load_chat_model(cfg, tokenizer, env.device)
    loss = PreferenceLoss.of(d)
    live = copy.deepcopy(model) if loss.needs_reference and d.reference == "live" else None
    add_lora(cfg, model, env.device, log)
    optimizer = prepare_training(cfg, start, model)
    if live is not None:
        reference: Any = frozen_reference(cfg, start, live)
        log("reference: a frozen copy of the starting model, run on every batch (dpo.reference live)")
    elif loss.needs_reference:
        autocast = contextlib.nullcontext()
        if plan.autocast_dtype is not None:
            autocast = torch.autocast(env.device.type, dtype=plan.autocast_dtype)
        reference = reference_logps(
            start.out_dir,
            model,
            [rows] + ([val_rows] if val_rows is not None else []),
            batch_size=cfg.train.micro_batch,
            device=env.device,
            autocast=autocast,
            precision=str(plan.compute_dtype),
            log=log,
        )
    else:
        reference = None
        log(f"reference: none ({d.loss} is reference-free)")
    save_run_files(cfg, start, tokenizer, template, model_config)
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
        objective=PreferenceObjective(loss, reference),
    )
    return trainer.fit()
