"""What training and serving cost in time and money, from a throughput; MFU; throughputs read from bench results.

The throughput is the planner's one measured input: tokens per second per GPU, given as a number, read from a
`bench/train_throughput.py` results file (`throughput_from_bench`), or measured through the trainer. Runs on many
GPUs are assumed to keep the per-GPU throughput (data parallelism scales linearly here), so time and money follow
by division: GPU-hours = tokens / (tokens/s per GPU) / 3600, wall hours = GPU-hours / GPUs.

No torch import: the CLI plans without loading torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from llamita.model.config import ModelConfig
from llamita.plan.errors import PlanError
from llamita.plan.gpus import GPU, parse_gpus


@dataclass(frozen=True)
class TrainingCost:
    """Time and money to train on `tokens`."""

    tokens: float
    """Training tokens."""
    gpus: int
    """GPUs training together."""
    gpu: str | None
    """Catalogue name of the GPU, when `gpus` named one."""
    tokens_per_s_per_gpu: float
    """Throughput of one GPU."""
    gpu_hours: float
    """GPU-hours: tokens / throughput of one GPU."""
    wall_hours: float
    """Hours on the clock: gpu_hours / gpus."""
    price_per_gpu_hour: float | None
    """Dollars per GPU-hour, when given."""
    dollars: float | None
    """gpu_hours * price_per_gpu_hour, when a price was given."""
    flops: float
    """Training FLOPs: tokens * FLOPs per token (`ModelConfig.flops_per_token`, or 6 per parameter)."""
    mfu: float | None
    """Model FLOPs utilisation implied by the throughput, when the GPU is known."""


@dataclass(frozen=True)
class ServingCost:
    """What generating tokens costs at a sustained throughput."""

    tokens_per_s: float
    """Tokens per second over all `gpus`."""
    gpus: int
    """GPUs serving together."""
    price_per_gpu_hour: float
    """Dollars per GPU-hour."""
    dollars_per_hour: float
    """gpus * price_per_gpu_hour."""
    dollars_per_million_tokens: float
    """dollars_per_hour / (tokens per hour / 1e6)."""


@dataclass(frozen=True)
class BenchThroughput:
    """One run of a `bench/train_throughput.py` results file."""

    tokens_per_s: float
    """Training tokens per second of the run, on one GPU."""
    run: str
    """The run's name in the file, e.g. `llamita-bf16`."""
    system: str
    """The system benchmarked: llamita, litgpt, hf."""
    device: str | None
    """`torch.cuda.get_device_name()` of the GPU it ran on."""
    preset: str
    """Model preset of the benchmark shape."""
    seq_len: int
    """Tokens per sequence."""
    micro_batch: int
    """Sequences per step."""
    peak_gib: float | None
    """`torch.cuda.max_memory_allocated` over the timed steps, GiB."""
    path: str
    """The file it was read from."""


def training_time(
    model: ModelConfig | int,
    tokens: float,
    gpus: int | str,
    tokens_per_s_per_gpu: float,
    price_per_gpu_hour: float | None = None,
    *,
    seq_len: int | None = None,
) -> TrainingCost:
    """GPU-hours, wall-clock hours and dollars to train `model` on `tokens` at a per-GPU throughput.

    Args:
        model: The model's config, or its parameter count (then 6 FLOPs per parameter per token).
        tokens: Training tokens.
        gpus: Number of GPUs, or `COUNTxGPU` such as `16xA100-40G` (then the MFU is reported too).
        tokens_per_s_per_gpu: Throughput of one GPU: a number, `throughput_from_bench(...).tokens_per_s`, or a
            measurement.
        price_per_gpu_hour: Dollars per GPU-hour; None leaves `dollars` unset.
        seq_len: Sequence length for a config's FLOPs per token; defaults to its `max_seq_len`.

    Returns:
        The time and cost.

    Raises:
        PlanError: A number is not positive (price: negative), or the GPU is unknown; the message names the option.
    """
    tokens = _positive(tokens, "tokens")
    throughput = _positive(tokens_per_s_per_gpu, "tokens_per_s_per_gpu")
    count, gpu = _gpus(gpus)
    if price_per_gpu_hour is not None:
        price_per_gpu_hour = _non_negative(price_per_gpu_hour, "price_per_gpu_hour")
    per_token = _flops_per_token(model, seq_len)
    gpu_hours = tokens / throughput / 3600
    return TrainingCost(
        tokens=tokens,
        gpus=count,
        gpu=gpu.name if gpu else None,
        tokens_per_s_per_gpu=throughput,
        gpu_hours=gpu_hours,
        wall_hours=gpu_hours / count,
        price_per_gpu_hour=price_per_gpu_hour,
        dollars=None if price_per_gpu_hour is None else gpu_hours * price_per_gpu_hour,
        flops=tokens * per_token,
        mfu=throughput * per_token / gpu.peak_bf16_flops if gpu else None,
    )


def serving_cost(tokens_per_s: float, price_per_gpu_hour: float, gpus: int = 1) -> ServingCost:
    """Dollars per million generated tokens at a sustained throughput.

    Args:
        tokens_per_s: Tokens per second over all `gpus` (the engine's aggregate decode throughput).
        price_per_gpu_hour: Dollars per GPU-hour.
        gpus: GPUs serving together.

    Returns:
        The cost per hour and per million tokens.

    Raises:
        PlanError: The throughput or GPU count is not positive, or the price is negative.
    """
    tokens_per_s = _positive(tokens_per_s, "tokens_per_s")
    price_per_gpu_hour = _non_negative(price_per_gpu_hour, "price_per_gpu_hour")
    count, _ = _gpus(gpus)
    per_hour = count * price_per_gpu_hour
    return ServingCost(
        tokens_per_s=tokens_per_s,
        gpus=count,
        price_per_gpu_hour=price_per_gpu_hour,
        dollars_per_hour=per_hour,
        dollars_per_million_tokens=per_hour / (tokens_per_s * 3600 / 1e6),
    )


def mfu(tokens_per_s: float, config: ModelConfig, seq_len: int, gpu: str | GPU) -> float:
    """Model FLOPs utilisation: training FLOPs per second over the GPUs' dense bf16 peak.

    Args:
        tokens_per_s: Training tokens per second over all the GPUs named by `gpu`.
        config: The model; its `flops_per_token(seq_len)` counts the FLOPs (PaLM's accounting, as the trainer's).
        seq_len: Tokens per sequence.
        gpu: A catalogue GPU, or `[COUNTx]NAME` such as `8xH100`.

    Returns:
        The fraction of peak, e.g. 0.52.

    Raises:
        PlanError: The throughput or seq_len is not positive, or the GPU is unknown.
    """
    tokens_per_s = _positive(tokens_per_s, "tokens_per_s")
    seq_len = _positive_int(seq_len, "seq_len")
    count, kind = (1, gpu) if isinstance(gpu, GPU) else parse_gpus(gpu)
    return tokens_per_s * config.flops_per_token(seq_len) / (count * kind.peak_bf16_flops)


def throughput_from_bench(path: str | Path, system: str | None = None) -> BenchThroughput:
    """Read one run's throughput from a `bench/train_throughput.py` results file (`bench/results/*.json`).

    The file holds `{"runs": {name: {"tokens_per_s", "peak_gib", "device_name", "spec": {"system", "preset",
    "seq_len", "batch", ...}}}, "shape": {...}}`; every run is one GPU. `system` picks the run: a run's name
    (`llamita-fp8`, `litgpt-compile`), or a system (`llamita`, the default; `litgpt`; `hf`), which means its
    `SYSTEM-bf16` run if the file has one (the benchmark's headline llamita row), else its only run.

    Args:
        path: The results file.
        system: Run name or system; None: `llamita`.

    Returns:
        The run's throughput and the shape it was measured at.

    Raises:
        PlanError: The file is missing or not such a results file, or `system` names no run or several; the
            message lists the file's runs.
    """
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"{path}: no such bench results file") from None
    except (OSError, json.JSONDecodeError) as error:
        raise PlanError(f"{path}: not a bench results JSON file ({error})") from None
    runs = results.get("runs") if isinstance(results, dict) else None
    if not isinstance(runs, dict):
        raise PlanError(f'{path}: not a bench/train_throughput.py results file (no "runs" mapping of named runs)')
    timed = {name: run for name, run in runs.items() if isinstance(run, dict) and "tokens_per_s" in run}
    wanted = system or "llamita"
    if wanted in timed:
        name = wanted
    elif f"{wanted}-bf16" in timed:
        name = f"{wanted}-bf16"
    else:
        of_system = [n for n, run in timed.items() if run.get("spec", {}).get("system") == wanted]
        if len(of_system) != 1:
            what = "several runs" if of_system else "no run"
            raise PlanError(
                f"{path}: {what} of system {wanted!r}; pass system= one of the runs: {', '.join(timed) or 'none'}"
            )
        name = of_system[0]
    run = timed[name]
    spec = run.get("spec", {})
    try:
        return BenchThroughput(
            tokens_per_s=float(run["tokens_per_s"]),
            run=name,
            system=str(spec["system"]),
            device=run.get("device_name"),
            preset=str(spec["preset"]),
            seq_len=int(spec["seq_len"]),
            micro_batch=int(spec["batch"]),
            peak_gib=run.get("peak_gib"),
            path=str(path),
        )
    except KeyError as error:
        raise PlanError(f"{path}: run {name!r} lacks spec field {error}") from None


def _flops_per_token(model: ModelConfig | int, seq_len: int | None) -> float:
    """Training FLOPs per token of a config (PaLM's accounting) or a parameter count (6N)."""
    if isinstance(model, ModelConfig):
        return model.flops_per_token(None if seq_len is None else _positive_int(seq_len, "seq_len"))
    return 6.0 * _positive(model, "model (parameter count)")


def _gpus(gpus: int | str) -> tuple[int, GPU | None]:
    """(count, catalogue GPU or None) from a count or a `COUNTxGPU` string."""
    if isinstance(gpus, str):
        return parse_gpus(gpus)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise PlanError(f"gpus must be a positive integer or COUNTxGPU such as 8xH100-80G, got {gpus!r}")
    return gpus, None


def _positive_int(value: int, name: str) -> int:
    """`value` as a positive int, or a PlanError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{name} must be a positive integer, got {value!r}")
    return value


def _positive(value: float, name: str) -> float:
    """`value` as a finite positive float, or a PlanError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PlanError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def _non_negative(value: float, name: str) -> float:
    """`value` as a finite float >= 0, or a PlanError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PlanError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
