"""The questions `llamita plan` answers, each a function returning a flat {label: value} result, and its table.

Each answer is built from `laws` (how big, how long), `memory` (does it fit), `cost` (GPU-hours, dollars) and
`runs` (your own runs, for a fitted law); `render` prints any of them as a two-column table, `--json` prints the
dict itself.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llamita.model.config import ModelConfig, get_preset
from llamita.plan import laws
from llamita.plan.cost import serving_cost, training_time
from llamita.plan.errors import PlanError
from llamita.plan.gpus import GPUS, parse_gpus
from llamita.plan.memory import largest_micro_batch, memory_per_gpu
from llamita.plan.runs import read_run_points

Answer = dict[str, Any]


def model_of(preset: str | None, params: float | None) -> ModelConfig | int:
    """The model a question is about: a preset's config, or a bare parameter count (6·N FLOPs per token)."""
    if (preset is None) == (params is None):
        raise PlanError("give the model as --preset NAME or as --params N (one of them)")
    if preset is not None:
        try:
            return get_preset(preset)
        except ValueError as e:
            raise PlanError(f"--preset: {e}") from None
    if not params > 0:
        raise PlanError(f"--params must be a positive number of parameters, got {params}")
    return int(params)


def optimal(law: laws.ScalingLaw, *, flops: float | None = None, loss: float | None = None) -> Answer:
    """The compute-optimal model for a FLOP budget or a target loss (C = 6·N·D)."""
    if (flops is None) == (loss is None):
        raise PlanError("give a budget as --flops C or a target as --loss L (one of them)")
    found = laws.optimal_for_flops(law, flops) if flops is not None else laws.optimal_for_loss(law, loss)
    return {"law": law.name, **found.as_dict()}


def inference(
    law: laws.ScalingLaw,
    *,
    inference_tokens: float,
    loss: float | None = None,
    params: float | None = None,
) -> Answer:
    """Sardana & Frankle's optimum: least training + inference FLOPs for a loss and an expected inference volume.

    The loss is given, or is that of the compute-optimal model of `params` parameters ("a Chinchilla-quality 13B").
    """
    if (loss is None) == (params is None):
        raise PlanError("give the quality as --loss L, or as --params N (that of the compute-optimal N model)")
    target = loss if loss is not None else laws.optimal_for_params(law, params).loss
    found = laws.inference_optimal(law, target, inference_tokens)
    return {"law": law.name, **found.as_dict()}


def cost(
    model: ModelConfig | int,
    *,
    tokens: float,
    gpus: str,
    tokens_per_s_per_gpu: float,
    throughput_source: str,
    price_per_gpu_hour: float | None = None,
    seq_len: int | None = None,
) -> Answer:
    """GPU-hours, wall-clock hours and dollars of a run at a measured (or stated) per-GPU throughput."""
    count_or_kind: int | str = int(gpus) if gpus.strip().isdigit() else gpus  # "8" or "8xH100"
    found = training_time(model, tokens, count_or_kind, tokens_per_s_per_gpu, price_per_gpu_hour, seq_len=seq_len)
    params = model.num_params if isinstance(model, ModelConfig) else model
    return {"params": params, **vars(found), "throughput_source": throughput_source}


def memory(config: ModelConfig, *, gpu: str | None = None, **options: Any) -> Answer:
    """Memory per GPU of a training step, term by term, whether it fits each card, and the largest micro-batch."""
    estimate = memory_per_gpu(config, **options)
    peak = estimate.forward if estimate.peak_phase == "forward" else estimate.backward
    answer: Answer = {
        "params": config.num_params,
        **{k: v for k, v in vars(estimate).items() if k not in ("forward", "backward")},
        **{f"peak {k.removesuffix('_gib')} (GiB)": v for k, v in vars(peak).items()},
    }
    cards = [parse_gpus(gpu)[1]] if gpu else list(GPUS.values())
    fixed = {k: v for k, v in options.items() if k != "micro_batch"}
    for card in cards:
        answer[f"fits {card.name} ({card.memory_gib:g} GiB)"] = estimate.total_gib <= card.memory_gib
        answer[f"largest micro-batch on {card.name}"] = largest_micro_batch(config, card.memory_gib, **fixed)
    return answer


def serve(tokens_per_s: float, *, price_per_gpu_hour: float, gpus: int = 1) -> Answer:
    """Dollars per million generated tokens at a measured serving throughput."""
    return vars(serving_cost(tokens_per_s, price_per_gpu_hour, gpus))


def fit(runs: list[str], out: str | Path, *, bootstrap: int = 200, seed: int = 0) -> Answer:
    """Fit L(N, D) to the final validation losses of your runs (Hoffmann's approach 3) and save it as a law file."""
    points = read_run_points(runs)
    law = laws.fit_law([(p.n_params, p.n_tokens, p.loss) for p in points], n_bootstrap=bootstrap, seed=seed)
    path = laws.save_law(law, out)
    answer: Answer = {"law file": str(path), "runs": len(points)}
    for name, value in law.constants().items():
        low, high = law.fit.intervals[name] if law.fit is not None else (math.nan, math.nan)
        answer[name] = value
        answer[f"{name} 95% interval"] = f"{_number(low)} .. {_number(high)}"
    misfit = {Path(p.run).name: float(law.loss(p.n_params, p.n_tokens)) / p.loss - 1 for p in points}
    worst = max(misfit, key=lambda run: abs(misfit[run]))
    answer["largest misfit"] = f"{worst}: {100 * misfit[worst]:+.2f}%"
    return answer


def render(title: str, answer: Answer) -> str:
    """A Markdown table of an answer: FLOPs in powers of ten, model and data sizes in B/T, hours with commas."""
    lines = [f"## {title}", "", "| | |", "|---|---:|"]
    lines += [f"| {key} | {_number(value, flops='flops' in key)} |" for key, value in answer.items()]
    return "\n".join(lines)


def _number(value: Any, flops: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    size = abs(value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if size >= 1e15 or (flops and size >= 1e3):
        return f"{value:.3e}"
    if size >= 1e9:
        return f"{value / 1e12:.3g}T" if size >= 1e12 else f"{value / 1e9:.3g}B"
    if size >= 1e3:
        return f"{value:,.0f}"
    return f"{value:.4g}"
