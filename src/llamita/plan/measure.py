"""`llamita plan cost --measure`: the training throughput of a shape on this machine, through the real trainer.

A short `llamita pretrain` run of the preset on synthetic text (a small tokenizer, the preset's full vocabulary in
the model, so the output head costs what it will), with the run's own loader, guard, logging and checkpoint-free
settings; the tokens/s of the steps after warm-up (compilation, allocator growth) is the answer. Nothing of it is
guessed, and nothing is kept: the run lives in a temporary folder.
"""

from __future__ import annotations

import random
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llamita.plan.errors import PlanError

WORDS = "the of and to in is for on that with as by at from this be are it an or was which code data model".split()


@dataclass(frozen=True)
class Measurement:
    tokens_per_s: float
    """Median tokens/s of the timed steps, all processes together (one process here)."""
    steps: int
    """Steps timed (after `warmup`)."""
    warmup: int
    """Steps run before timing."""
    device: str
    """Where it ran."""


def measure_throughput(
    preset: str,
    *,
    seq_len: int,
    micro_batch: int,
    steps: int = 20,
    warmup: int = 5,
    device: str = "auto",
    overrides: dict[str, str] | None = None,
) -> Measurement:
    """Tokens/s of `llamita pretrain` for `preset` at `seq_len` x `micro_batch` (one micro-batch per step).

    Args:
        preset: a model preset.
        seq_len: training sequence length.
        micro_batch: sequences per step.
        steps: steps timed after warm-up.
        warmup: steps run first and not timed.
        device: cpu, cuda or auto.
        overrides: further config keys (e.g. ``{"parallel.compile": "true"}``) as `llamita pretrain` takes them.

    Raises:
        PlanError: fewer than 1 timed step.
    """
    from llamita.config import load_config
    from llamita.data.prepare import prepare_source
    from llamita.model import get_preset
    from llamita.pretrain import pretrain
    from llamita.tokenizer import MIN_VOCAB_SIZE, train_tokenizer
    from llamita.train.metrics import read_metrics
    from llamita.train.parallel import pick_device

    if steps < 1 or warmup < 0:
        raise PlanError(f"measure: steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    total = steps + warmup
    with tempfile.TemporaryDirectory(prefix="llamita-measure-") as tmp:
        root = Path(tmp)
        rng = random.Random(0)
        corpus = root / "corpus.txt"
        # One pass of text covers every window the run reads: (total steps + validation) x batch, with room.
        n_words = int(1.5 * (total + 1) * micro_batch * (seq_len + 1)) + 10_000
        corpus.write_text(" ".join(rng.choice(WORDS) for _ in range(n_words)))
        tok = root / "tok"
        tokenizer = train_tokenizer([corpus], MIN_VOCAB_SIZE + 64, tok)
        data = root / "data"
        prepare_source("synthetic", [str(corpus)], tok, data, val_fraction=0.0, progress=False)
        values = {
            "out_dir": str(root / "run"),
            "data.tokenizer": str(tok),
            "data.sources": f"[{{name: synthetic, path: '{data}'}}]",
            "data.seq_len": str(seq_len),
            "model.preset": preset,
            "model.vocab_size": str(max(get_preset(preset).vocab_size, tokenizer.vocab_size)),
            "train.micro_batch": str(micro_batch),
            "train.global_batch_tokens": str(seq_len * micro_batch),
            "train.max_steps": str(total),
            "train.device": device,
            "optim.warmup_steps": "1",
            "eval.interval": "0",
            "checkpoint.interval": "0",
            "checkpoint.keep_last": "1",
            "log.interval": "1",
            "log.tensorboard": "false",
            "log.progress": "false",
            **(overrides or {}),
        }
        pretrain(load_config("debug", values))
        rows = [r for r in read_metrics(root / "run" / "metrics.jsonl") if "tokens_per_s" in r]
        # With log.interval 1 row i's rate covers step i alone (the final checkpoint is saved after its row).
        timed = [r["tokens_per_s"] for r in rows if r["step"] > warmup]
    return Measurement(statistics.median(timed), len(timed), warmup, pick_device(device).type)
