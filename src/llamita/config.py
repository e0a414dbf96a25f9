"""Run configuration: nested dataclasses grouped by concern, loaded from a YAML recipe plus dotted overrides.

A recipe is a YAML file whose top-level keys are the sections below (``data``, ``model``, ``optim``, ...). The CLI
applies ``--config recipe.yaml`` and then overrides such as ``--optim.lr 3e-4``. Every field carries a one-line
docstring (the string literal under it); :func:`field_docs` reads them so that ``llamita pretrain --help`` can
list every key. YAML is parsed with ``yaml.safe_load``: a recipe cannot import or run code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import keyword
import re
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A recipe or override that cannot be applied; the message names the file and the field."""


@dataclass
class SourceConfig:
    name: str = ""
    """Name of the source, used in mixture weights and logs (e.g. slimpajama)."""
    path: str = ""
    """Directory written by `llamita prepare` (holds manifest.json, train/ and val/ shards)."""
    weight: float = 1.0
    """Sampling weight of this source when no `data.stages` are given."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """Prepared sources to train on, each {name, path, weight}."""
    stages: list[dict] = field(default_factory=list)
    """Optional mixture schedule: list of {steps, weights, end_weights}; a stage with end_weights ramps linearly."""
    tokenizer: str = ""
    """Tokenizer directory (tokenizer.json or tokenizer.model); copied into the run directory."""
    seq_len: int = 2048
    """Training sequence length in tokens."""
    prefetch: int = 4
    """Batches the loader prepares ahead of the trainer."""
    verify_tokens: bool = True
    """Check every train/val token id < vocab at start: one read of the shards over ranks; off for multi-TB corpora."""


@dataclass
class ModelSection:
    preset: str = "demo"
    """Model preset: debug, demo, tinyllama-120m, tinyllama-1.1b."""
    vocab_size: int | None = None
    """Vocabulary size; default: the tokenizer's vocabulary size."""
    tie_embeddings: bool | None = None
    """Share the input embedding and the output head; default: the preset's choice."""


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    """adamw (8 bytes of fp32 moments per parameter), or adamw8bit: torchao's AdamW8bit, moments quantized
    block-wise to 8 bits (2 bytes per parameter; needs `pip install 'llamita[quant]'`)."""
    lr: float = 4e-4
    """Peak learning rate after warmup."""
    min_lr: float = 4e-5
    """Learning rate at the end of the decay (cosine or wsd)."""
    warmup_steps: int = 2000
    """Linear warmup steps from 0 to `lr` (with `train.batch_stages`: steps of `train.global_batch_tokens`)."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warmup: cosine decay to `min_lr`; wsd (MiniCPM's warmup-stable-decay: `lr` until the last
    `decay_fraction`, then down to `min_lr`); or constant `lr`. A function of tokens seen, not of steps."""
    decay_fraction: float = 0.2
    """wsd: the last fraction of the schedule spent decaying from `lr` to `min_lr`."""
    decay_shape: Literal["linear", "1-sqrt"] = "1-sqrt"
    """wsd: the decay's shape, linear or 1-sqrt (lr x (1 - sqrt(progress)), Hägele et al. 2024)."""
    schedule_tokens: int = 0
    """Tokens the LR schedule spans (its decay ends there); 0: this run's length. A run that is one stage of
    several (TinyLlama v1.1: base, stage 2, cooldown) sets the whole lineage's length, so each stage continues it."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices (not to norm weights)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""


@dataclass
class TrainConfig:
    global_batch_tokens: int = 2_097_152
    """Tokens per optimizer step over all ranks; gradient accumulation is derived from it."""
    micro_batch: int = 8
    """Sequences per forward/backward on one rank."""
    batch_stages: list[dict] = field(default_factory=list)
    """Optional batch-size schedule: list of {from_tokens, global_batch_tokens}; a step that starts at or past
    `from_tokens` tokens seen takes that global batch (before the first: `global_batch_tokens`)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 derives it from `max_tokens`."""
    max_tokens: int = 0
    """Total training tokens (used when `max_steps` is 0): the run ends after its last step that fits in them."""
    seed: int = 42
    """Seed for initialisation and data order."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype: auto (bf16 on GPU, fp32 on CPU; bf16 with `weights` bf16), bf16, fp32. bf16 on a CPU is
    autocast over fp32 weights and pays only with AVX512-BF16 or AMX (the demo recipe uses it)."""
    weights: Literal["fp32", "bf16"] = "fp32"
    """fp32 master weights (compute in `dtype`), or bf16: the parameters themselves, and so their gradients, in bf16
    (no fp32 master, no compute copies, no autocast), updated with stochastic rounding by torchao's optimizers."""
    threads: int = 0
    """CPU threads for torch (0 keeps torch's default)."""
    max_bad_steps: int = 5
    """Stop (saving a checkpoint) after this many consecutive skipped steps (NaN/Inf loss or grad norm, or loss
    spikes); 0 never stops. The host learns of a bad step one step late, so the run stops one step after the
    streak is reached."""
    spike_sigma: float = 0.0
    """Loss-spike guard: skip a step whose loss exceeds the mean + spike_sigma x std of the last `spike_window`
    applied steps (0 disables; 4-6 is typical). The window is saved in checkpoints."""
    spike_window: int = 100
    """Applied steps in the loss-spike window; the guard acts once the window is full."""


@dataclass
class InitConfig:
    from_: str = ""
    """Weights to start from (HF Llama dir or llamita checkpoint); fresh optimizer, schedule and data order."""
    branch_from: str = ""
    """Branch from another run's checkpoint (its run dir: the latest one): weights, optimizer, step and tokens
    continue, with this run's data mixture as a new data order; the parent's directory is only read."""


@dataclass
class ParallelConfig:
    fsdp: Literal["auto", "on", "off"] = "auto"
    """FSDP2 sharding: auto (on with >1 process, or on one CUDA GPU when `copies` is off), on, off."""
    copies: Literal["auto", "on", "off"] = "auto"
    """One process in bf16: bf16 compute copies of the fp32 weights, written by the optimizer (auto: on one GPU
    without activation checkpointing)."""
    dp_replicate: int = 1
    """HSDP replicas: shard within groups of world/dp_replicate ranks, replicate across them (= nodes)."""
    reshard_after_forward: bool = True
    """Free gathered block weights after forward (ZeRO-3); false keeps them for backward (ZeRO-2, more memory)."""
    activation_checkpoint: Literal["none", "selective", "full"] = "none"
    """Recompute activations in backward: none, selective (keep matmul/attention outputs), full (every block)."""
    compile: bool = False
    """torch.compile each transformer block."""
    float8: bool = False
    """float8 matmuls in the blocks' linear layers through torchao (GPUs with compute capability >= 8.9)."""


@dataclass
class EvalConfig:
    interval: int = 1000
    """Run validation every this many steps (0 disables; always run at the end)."""
    batches: int = 20
    """Validation batches per evaluation, over all ranks (a multiple of the ranks gives the same windows)."""
    batch_size: int = 8
    """Sequences per validation batch."""
    per_source: bool = False
    """Also score each source's validation shards on their own (`eval.batches` each), logged as val_loss/<name>."""
    tasks: dict = field(default_factory=dict)
    """Zero-shot tasks scored during training, {task: data dir} (e.g. {hellaswag: data/eval/hellaswag})."""
    task_interval: int = 0
    """Score `eval.tasks` every this many steps (0: only at the end of the run)."""
    task_limit: int = 0
    """Documents per task in those evaluations (0: all)."""


@dataclass
class CheckpointConfig:
    interval: int = 1000
    """Save a checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints (0 keeps all)."""
    resume: str = "auto"
    """auto (latest complete checkpoint in the run directory, if any), none, or a checkpoint path."""
    allow_data_change: bool = False
    """Resume even if the training shards differ from the checkpoint's (names, token counts or sha256)."""
    allow_config_change: bool = False
    """Resume even if settings that change the run's math (see config.RESUME_FREE) differ from the checkpoint's."""


@dataclass
class LogConfig:
    interval: int = 10
    """Log loss, lr, grad norm and throughput every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard events to <out_dir>/tb."""
    progress: bool = True
    """Show a progress bar when stdout is a terminal; otherwise (or when false) print a line every `interval`."""
    wandb: bool = False
    """Also log every metrics.jsonl row to Weights & Biases (needs `pip install 'llamita[wandb]'`)."""
    wandb_project: str = "llamita"
    """The W&B project of the run."""
    wandb_entity: str = ""
    """The W&B team or user that owns the project; empty: your default entity."""
    wandb_name: str = ""
    """The W&B run's display name; empty: the name of out_dir."""
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    """online, offline (files only, no network; `wandb sync` uploads them later), or auto: $WANDB_MODE, else online."""


@dataclass
class SFTConfig:
    data: list[str] = field(default_factory=list)
    """Conversation files, directories or globs (.jsonl[.gz|.zst], .parquet, HF datasets copies), for `llamita sft`."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "openllama"] = "auto"
    """Record schema: messages (UltraChat), sharegpt (conversations/from/value), alpaca, openllama; auto detects."""
    split: str = ""
    """The split of an HF datasets copy to read (UltraChat-200k: train_sft); empty: every file."""
    template: str = "zephyr"
    """Chat template: zephyr (TinyLlama-Chat's), chatml, llama2, tokenizer (the tokenizer's own), or a Jinja file."""
    train_on: Literal["assistant", "all"] = "assistant"
    """Targets that carry loss: every assistant turn with its end-of-turn token, or every token."""
    over_length: Literal["drop", "truncate"] = "drop"
    """A conversation longer than data.seq_len: dropped (counted), or cut after its last assistant turn that fits."""
    packing: bool = True
    """Several conversations per row (attention stays inside each); false: one per row, padded."""
    val_fraction: float = 0.01
    """Conversations held out (by a hash of their text) for the validation loss on assistant tokens."""
    epochs: float = 1.0
    """Passes over the training rows, when train.max_steps and train.max_tokens are 0."""


@dataclass
class DPOConfig:
    data: list[str] = field(default_factory=list)
    """Preference files, directories or globs (.jsonl[.gz|.zst], .parquet, HF datasets copies), for `llamita dpo`."""
    format: Literal["auto", "messages", "flat"] = "auto"
    """Record schema: messages (chosen/rejected message lists, UltraFeedback-binarized), flat (prompt/chosen/rejected
    strings); auto detects."""
    split: str = ""
    """The split of an HF datasets copy to train on (UltraFeedback-binarized: train_prefs); empty: every file."""
    val_split: str = ""
    """The split held out for validation (test_prefs); empty: `dpo.val_fraction` of the pairs read."""
    val_fraction: float = 0.01
    """Pairs held out (by a hash of their text) for validation when `dpo.val_split` is empty."""
    template: str = "tokenizer"
    """Chat template: tokenizer (the SFT model's own), zephyr, chatml, llama2, or a Jinja file."""
    loss: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    """sigmoid (DPO), ipo (IPO), hinge (SLiC), or simpo (SimPO: no reference, length-normalised, target margin)."""
    beta: float = 0.1
    """DPO's beta, the weight of staying near the reference (higher: closer); IPO's tau; SimPO's reward scale (2)."""
    label_smoothing: float = 0.0
    """Assumed share of flipped preferences for sigmoid and simpo (conservative DPO, cDPO), in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin (gamma)."""
    reference: Literal["precomputed", "live"] = "precomputed"
    """precomputed: the reference's log-probs computed once before training and stored in the run (one model in
    memory); live: a frozen copy of the starting model run on every batch."""
    max_length: int = 1024
    """Longest prompt + answer in tokens (TRL's max_length); a pair's tree takes up to twice this in a row."""
    max_prompt_length: int = 512
    """Prompt tokens kept (its end) when a pair is truncated (TRL's max_prompt_length)."""
    over_length: Literal["drop", "truncate"] = "truncate"
    """A pair whose prompt + longer answer exceed max_length: truncated as TRL does, or dropped (counted)."""
    packing: bool = True
    """Several pairs per row of data.seq_len slots (each a tree: the prompt once, then both answers); false: one."""
    epochs: float = 1.0
    """Passes over the training pairs, when train.max_steps and train.max_tokens are 0."""


@dataclass
class LoRAConfig:
    rank: int = 0
    """LoRA rank; 0 fine-tunes every weight (the default)."""
    alpha: float = 16.0
    """LoRA scale numerator: the update is (alpha / rank) B A."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers that get adapters, by name."""


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    """Run directory: checkpoints, config.yaml, metrics.jsonl, TensorBoard events, tokenizer copy, loss.png."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    init: InitConfig = field(default_factory=InitConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Return {field name: docstring} from the string literals written under each dataclass field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def _field_name(key: str) -> str:
    """The dataclass field for a recipe key: a Python keyword such as `from` is spelled `from_` (PEP 8)."""
    return key + "_" if keyword.iskeyword(key) else key


def _key_name(field_name: str) -> str:
    """The recipe key of a dataclass field (the inverse of `_field_name`)."""
    stripped = field_name.removesuffix("_")
    return stripped if keyword.iskeyword(stripped) else field_name


def iter_fields(cls: type = RunConfig, prefix: str = "") -> typing.Iterator[tuple[str, Any, str]]:
    """Yield (dotted key, type, help) for every leaf field of a config dataclass tree."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{_key_name(f.name)}", tp, docs.get(f.name, "")


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The one-line reason of a YAML parse error (PyYAML's message spans several lines)."""
    return getattr(error, "problem", None) or str(error).splitlines()[0]


def _parse_yaml_value(text: str, where: str) -> Any:
    """A list or mapping given on the command line, in YAML flow style (``[{name: a, path: b}]``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(e)}): {text!r}") from None


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field type `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = _parse_yaml_value(value, where)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is dict:
        if isinstance(value, str):
            value = _parse_yaml_value(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    try:
        if tp in (int, float) and isinstance(value, bool):
            raise ValueError  # YAML's true/false is no number
        if tp is int:
            # A command-line string is read as YAML reads the same value, so 10.5 is refused in both.
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value.replace("_", ""))
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _build(cls: type, values: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {_field_name(k): v for k, v in values.items()}
    unknown = sorted(map(_key_name, set(values) - names))
    if unknown:
        section = f"section {where!r}" if where else "the top level"
        raise ConfigError(f"unknown key(s) {unknown} in {section}; valid keys: {sorted(map(_key_name, names))}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{_key_name(k)}" if where else _key_name(k)) for k, v in values.items()}
    return cls(**kwargs)


# What each numeric key accepts, as the words of the error and the test; the other keys are checked by their type.
_AT_LEAST_0 = (">= 0", lambda v: v >= 0)
_AT_LEAST_1 = (">= 1", lambda v: v >= 1)
_BETA = ("in [0, 1)", lambda v: 0 <= v < 1)
BOUNDS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "data.seq_len": _AT_LEAST_1,
    "data.prefetch": _AT_LEAST_0,
    "model.vocab_size": _AT_LEAST_1,
    "optim.lr": _AT_LEAST_0,
    "optim.min_lr": _AT_LEAST_0,
    "optim.warmup_steps": _AT_LEAST_0,
    "optim.weight_decay": _AT_LEAST_0,
    "optim.beta1": _BETA,
    "optim.beta2": _BETA,
    "optim.eps": ("> 0", lambda v: v > 0),
    "optim.grad_clip": _AT_LEAST_0,
    "optim.decay_fraction": ("in (0, 1]", lambda v: 0 < v <= 1),
    "optim.schedule_tokens": _AT_LEAST_0,
    "train.global_batch_tokens": _AT_LEAST_1,
    "train.micro_batch": _AT_LEAST_1,
    "train.max_steps": _AT_LEAST_0,
    "train.max_tokens": _AT_LEAST_0,
    "train.threads": _AT_LEAST_0,
    "train.max_bad_steps": _AT_LEAST_0,
    "train.spike_sigma": _AT_LEAST_0,
    "train.spike_window": (">= 2", lambda v: v >= 2),
    "parallel.dp_replicate": _AT_LEAST_1,
    "eval.interval": _AT_LEAST_0,
    "eval.batches": _AT_LEAST_1,
    "eval.batch_size": _AT_LEAST_1,
    "eval.task_interval": _AT_LEAST_0,
    "eval.task_limit": _AT_LEAST_0,
    "checkpoint.interval": _AT_LEAST_0,
    "checkpoint.keep_last": _AT_LEAST_0,
    "log.interval": _AT_LEAST_1,
    "sft.val_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
    "sft.epochs": ("> 0", lambda v: v > 0),
    "dpo.val_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
    "dpo.beta": ("> 0", lambda v: v > 0),
    "dpo.label_smoothing": ("in [0, 0.5)", lambda v: 0 <= v < 0.5),
    "dpo.simpo_gamma": _AT_LEAST_0,
    "dpo.max_length": (">= 2", lambda v: v >= 2),
    "dpo.max_prompt_length": _AT_LEAST_1,
    "dpo.epochs": ("> 0", lambda v: v > 0),
    "lora.rank": _AT_LEAST_0,
    "lora.alpha": ("> 0", lambda v: v > 0),
    "lora.dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
}


def get_by_path(cfg: Any, key: str) -> Any:
    """The value of a dotted key (``optim.lr``) in a config tree."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, _field_name(part))
    return node


def check_config(cfg: RunConfig) -> None:
    """Refuse values no run can use (a negative learning rate, a zero batch, an unknown preset) before any work.

    Raises:
        ConfigError: naming the first key out of its range (see `BOUNDS`) and the range.
    """
    from llamita.model.config import PRESETS

    for key, (wanted, ok) in BOUNDS.items():
        value = get_by_path(cfg, key)
        if value is not None and not ok(value):  # NaN fails every test
            raise ConfigError(f"{key}: must be {wanted}, got {value!r}")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr: {cfg.optim.min_lr:g} is above optim.lr {cfg.optim.lr:g}; it must not be")
    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {cfg.model.preset!r}; choose from {', '.join(PRESETS)}")
    if cfg.init.from_ and cfg.init.branch_from:
        raise ConfigError(
            "init.from and init.branch_from are both set; choose one: init.from takes weights only (a fresh "
            "optimizer and schedule), init.branch_from continues the parent's optimizer and schedule"
        )
    if cfg.init.branch_from:
        parent, out = Path(cfg.init.branch_from).resolve(), Path(cfg.out_dir).resolve()
        if out == parent or out in parent.parents:
            raise ConfigError(
                f"init.branch_from: {cfg.init.branch_from} is in this run's own out_dir {cfg.out_dir}; a branch "
                "writes to a directory of its own (set another out_dir), and continuing this run is a resume (drop "
                "init.branch_from)"
            )
    _check_batch_stages(cfg.train)
    _check_low_memory(cfg)


def _check_low_memory(cfg: RunConfig) -> None:
    """Refuse `train.weights` bf16 and `optim.name` adamw8bit where they cannot work, and either without torchao."""
    import importlib.util

    bf16, eight = cfg.train.weights == "bf16", cfg.optim.name == "adamw8bit"
    if bf16 and cfg.train.dtype == "fp32":
        raise ConfigError(
            "train.weights=bf16 computes in bf16 (the weights are bf16); set train.dtype bf16 or auto, or "
            "train.weights fp32 for fp32 compute"
        )
    if (bf16 or eight) and cfg.parallel.copies == "on":
        what = "train.weights=bf16 has no fp32 masters to copy" if bf16 else "optim.name=adamw8bit has no copies"
        raise ConfigError(
            f"parallel.copies=on: {what} (the copies' optimizer is fp32 AdamW); set parallel.copies auto or off"
        )
    if (bf16 or eight) and importlib.util.find_spec("torchao") is None:
        key = "optim.name=adamw8bit" if eight else "train.weights=bf16"
        raise ConfigError(f"{key} steps with torchao's optimizers: pip install 'llamita[quant]'")


def _check_batch_stages(train: TrainConfig) -> None:
    """Refuse a `train.batch_stages` entry that is not {from_tokens, global_batch_tokens} with positive integers
    and `from_tokens` strictly increasing."""
    previous = 0
    for i, stage in enumerate(train.batch_stages):
        where = f"train.batch_stages[{i}]"
        keys = {"from_tokens", "global_batch_tokens"}
        if not isinstance(stage, dict) or set(stage) != keys:
            raise ConfigError(f"{where}: expected a mapping with exactly the keys {sorted(keys)}, got {stage!r}")
        for key in sorted(keys):
            value = stage[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not float(value).is_integer() or value < 1:
                raise ConfigError(f"{where}.{key}: must be an integer >= 1, got {value!r}")
        if stage["from_tokens"] <= previous:
            raise ConfigError(
                f"{where}.from_tokens: {stage['from_tokens']} must be above the previous stage's ({previous}); "
                "list the stages in the order they start"
            )
        previous = stage["from_tokens"]


def resolve_recipe(name_or_path: str) -> Path:
    """Return the recipe file for a path or a bundled recipe name (``demo``, ``tinyllama-1.1b``, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe {name_or_path!r} not found: not a file, and not one of the bundled recipes {names}")


def load_config(recipe: str | None = None, overrides: dict[str, str] | None = None) -> RunConfig:
    """Build a RunConfig from an optional YAML recipe and dotted overrides (``{"optim.lr": "3e-4"}``)."""
    values: dict = {}
    if recipe is not None:
        path = resolve_recipe(recipe)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(values).__name__}")
        try:
            cfg = _build(RunConfig, values, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    else:
        cfg = RunConfig()
    for key, raw in (overrides or {}).items():
        set_by_path(cfg, key, raw)
    check_config(cfg)
    return cfg


def set_by_path(cfg: Any, key: str, raw: Any) -> None:
    """Set a dotted key (``optim.lr``) on a config tree, converting `raw` to the field's type."""
    *parents, leaf = key.split(".")
    leaf = _field_name(leaf)
    node = cfg
    for part in parents:
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            raise ConfigError(f"unknown config key {key!r} (no section {part!r}); see `llamita pretrain --help`")
        node = getattr(node, part)
    hints = typing.get_type_hints(type(node)) if dataclasses.is_dataclass(node) else {}
    if leaf not in hints or dataclasses.is_dataclass(hints[leaf]):
        raise ConfigError(f"unknown config key {key!r}; see `llamita pretrain --help` for the valid keys")
    setattr(node, leaf, _convert(raw, hints[leaf], key))


def to_dict(cfg: Any) -> dict:
    """The config tree as plain dicts and lists (for YAML/JSON), keyed by recipe keys (`from`, not `from_`)."""

    def keys(value: Any) -> Any:
        if isinstance(value, dict):
            return {_key_name(k): keys(v) for k, v in value.items()}
        if isinstance(value, list):
            return [keys(v) for v in value]
        return value

    return keys(dataclasses.asdict(cfg))


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML; `load_config(str(path))` reads it back."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig from `to_dict`'s output (e.g. the copy saved with a checkpoint)."""
    return _build(RunConfig, values, "")


RESUME_FREE = (
    "out_dir",
    "data.tokenizer",
    "data.sources[].path",
    "data.prefetch",
    "data.verify_tokens",
    "train.micro_batch",
    "train.device",
    "train.threads",
    "train.max_bad_steps",
    "parallel.fsdp",
    "parallel.copies",
    "parallel.dp_replicate",
    "parallel.reshard_after_forward",
    "parallel.activation_checkpoint",
    "parallel.compile",
    "eval",
    "checkpoint",
    "log",
    "init",
    "sft.data",
    "dpo.data",
    "dpo.reference",
)
"""Keys (and sections) a resume may change freely: where things are, how fast and how often, not what is computed.

Paths may move because their contents are checked (the tokenizer against each manifest, the shards against the
checkpoint's sha256, chat conversations and preference pairs through the packed rows' fingerprint; a live and a
stored reference give the same log-probs); `train.micro_batch` and the parallel layout change the accumulation as
another number of ranks does, with the same global batch. Every other
key (model, optim, the schedule's steps and tokens, seed, dtype, the spike guard, float8, sequence length, sources'
names and weights, stages, sft, dpo and lora settings) changes the run's math: a resume that changes one needs
`checkpoint.allow_config_change`.
"""

RESUME_IGNORED = ("checkpoint.resume", "init.from", "init.branch_from")
"""Keys never compared on resume: they say where a run starts, not what it computes."""

UNSET = object()
"""The value of a key one side of `resume_changes` lacks (a list entry the other config does not have)."""


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of the scalars in `to_dict` output; list entries are keyed ``data.sources[1].name``."""
    if isinstance(value, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    return {key: leaf for k, v in items for key, leaf in _leaves(v, k).items()}


def resume_changes(saved: dict, cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """What `cfg` changes in the config a checkpoint was saved with: {dotted key: (saved value, new value)}.

    Args:
        saved: `to_dict` output, e.g. a checkpoint's ``run_config``; a key it lacks (a field added since) counts at
            its default. A list entry only one side has is `UNSET` on the other.
        cfg: the config of the run that resumes.
    """
    old = _leaves(to_dict(RunConfig())) | _leaves(saved)
    new = _leaves(to_dict(cfg))
    keys = [*new, *(k for k in old if k not in new)]
    changes = {k: (old.get(k, UNSET), new.get(k, UNSET)) for k in keys if k not in RESUME_IGNORED}
    return {k: (a, b) for k, (a, b) in changes.items() if a != b}


def changes_math(key: str) -> bool:
    """Whether a resume that changes `key` (a `resume_changes` key) changes the run's math; see `RESUME_FREE`."""
    generic = re.sub(r"\[\d+\]", "[]", key)
    return not any(generic == free or generic.startswith(free + ".") for free in RESUME_FREE)


def describe_change(key: str, old: Any, new: Any) -> str:
    """``optim.lr: 0.001 -> 0.005``, values as JSON writes them."""

    def show(value: Any) -> str:
        return "unset" if value is UNSET else json.dumps(value)

    return f"{key}: {show(old)} -> {show(new)}"
