"""Scaling laws L(N, D) = E + A/N^alpha + B/D^beta: named laws, fitting, and the allocations they imply.

N is the number of parameters, D the number of training tokens, and training costs C = 6·N·D FLOPs.

- `ScalingLaw` holds the five constants; `get_law` gives a named law (`hoffmann`, `besiroglu`) or one fitted
  and saved to JSON by `save_law`.
- `optimal_for_flops`, `optimal_for_loss`, `optimal_for_params`: the compute-optimal ("Chinchilla") model for a
  FLOP budget, a target loss, or a model size.
- `inference_optimal`: the model that reaches a loss with the fewest FLOPs over its life, training plus serving
  (Sardana & Frankle 2024, arXiv 2401.00448).
- `fit_law`: Hoffmann et al.'s approach 3 (Huber loss on log loss, L-BFGS from a grid of starts) with bootstrap
  intervals.
- `iso_loss_plot`: iso-loss contours over (N, D) with these allocations marked.

numpy only: the planner runs without torch.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llamita.plan.errors import PlanError

PARAMETERS = ("E", "A", "B", "alpha", "beta")
# The variables fit_law optimises, in this order: log E, log A, alpha, log B, beta.
_THETA = ("e", "a", "alpha", "b", "beta")
FORMAT = "llamita.scaling_law"
FORMAT_VERSION = 1

# Hoffmann et al. 2022, section D.2: L-BFGS from every point of this grid over (alpha, beta, e, a, b), 4500 starts.
PAPER_GRID: Mapping[str, tuple[float, ...]] = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
# 72 starts spanning the paper grid's range: on the tests' synthetic runs it finds the paper grid's optimum in a
# tenth of the time (the tests check this).
COARSE_GRID: Mapping[str, tuple[float, ...]] = {
    "alpha": (0.5, 1.5),
    "beta": (0.5, 1.5),
    "e": (-0.5, 0.5),
    "a": (0.0, 10.0, 20.0),
    "b": (0.0, 10.0, 20.0),
}


@dataclass(frozen=True)
class LawFit:
    """How a fitted law was obtained: the runs it was fitted on and its bootstrap intervals."""

    points: tuple[tuple[float, float, float], ...]
    """The runs, as (parameters N, training tokens D, final loss)."""
    intervals: dict[str, tuple[float, float]] = field(hash=False)
    """Bootstrap percentile interval (low, high) of each of E, A, B, alpha, beta."""
    replicates: tuple[tuple[float, float, float, float, float], ...]
    """Each bootstrap refit's (E, A, B, alpha, beta), for intervals of anything derived from the law."""
    confidence: float
    """Coverage of the intervals, e.g. 0.95."""
    n_bootstrap: int
    """Number of bootstrap refits behind the intervals."""
    seed: int | None
    """Seed of the bootstrap resampling."""
    huber_delta: float
    """Huber threshold on the log-loss residuals."""
    n_starts: int
    """Number of L-BFGS starts (grid points) per fit."""
    objective: float
    """Summed Huber loss at the optimum."""


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta for N parameters trained on D tokens."""

    E: float
    """Irreducible loss: the loss of an infinite model trained on infinite data."""
    A: float
    """Coefficient of the model-size term."""
    B: float
    """Coefficient of the data term."""
    alpha: float
    """Exponent of the model-size term."""
    beta: float
    """Exponent of the data term."""
    name: str = "custom"
    """Short name shown in tables."""
    source: str = ""
    """Where the constants come from: a paper, or the file a fitted law was read from."""
    fit: LawFit | None = None
    """For a fitted law: the runs and the bootstrap intervals."""

    def loss(self, n_params: float | np.ndarray, n_tokens: float | np.ndarray) -> float | np.ndarray:
        """Predicted loss of `n_params` parameters trained on `n_tokens` tokens (floats or arrays)."""
        return self.E + self.A / np.power(n_params, self.alpha) + self.B / np.power(n_tokens, self.beta)

    @property
    def params_exponent(self) -> float:
        """a in N_opt ∝ C^a: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def tokens_exponent(self) -> float:
        """b in D_opt ∝ C^b: alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    def constants(self) -> dict[str, float]:
        """The five constants by name, for tables and JSON."""
        return {name: float(getattr(self, name)) for name in PARAMETERS}


LAWS: dict[str, ScalingLaw] = {
    "hoffmann": ScalingLaw(
        E=1.69,
        A=406.4,
        B=410.7,
        alpha=0.34,
        beta=0.28,
        name="hoffmann",
        source="Hoffmann et al. 2022 (Chinchilla), arXiv 2203.15556, approach 3",
    ),
    "besiroglu": ScalingLaw(
        E=1.8172,
        A=482.01,
        B=2085.43,
        alpha=0.3478,
        beta=0.3658,
        name="besiroglu",
        source="Besiroglu et al. 2024, Chinchilla scaling: a replication attempt, arXiv 2404.10102",
    ),
}


@dataclass(frozen=True)
class Allocation:
    """A model size and token count, the training FLOPs 6·N·D they cost and the loss the law predicts."""

    n_params: float
    """Parameters N."""
    n_tokens: float
    """Training tokens D."""
    flops: float
    """Training FLOPs, 6·N·D."""
    loss: float
    """Predicted loss L(N, D)."""

    @property
    def tokens_per_param(self) -> float:
        """D / N (about 20 for Chinchilla)."""
        return self.n_tokens / self.n_params

    def as_dict(self) -> dict[str, float]:
        """Fields plus tokens_per_param, for tables and `--json`."""
        return {**asdict(self), "tokens_per_param": self.tokens_per_param}


@dataclass(frozen=True)
class InferencePlan:
    """The model that reaches a loss with the fewest FLOPs over its life, against the compute-optimal one."""

    loss: float
    """The loss both models reach."""
    inference_tokens: float
    """Tokens the model is expected to process in inference (prompt and generated)."""
    n_params: float
    """Parameters of the inference-aware model."""
    n_tokens: float
    """Its training tokens."""
    train_flops: float
    """6·N·D_train."""
    inference_flops: float
    """2·N·D_inference."""
    total_flops: float
    """train_flops + inference_flops."""
    chinchilla_params: float
    """Parameters of the compute-optimal model with the same loss."""
    chinchilla_tokens: float
    """Its training tokens."""
    chinchilla_total_flops: float
    """Its training plus inference FLOPs for the same inference tokens."""
    flops_saved: float
    """chinchilla_total_flops - total_flops (never negative)."""
    flops_saved_fraction: float
    """flops_saved / chinchilla_total_flops."""

    def as_dict(self) -> dict[str, float]:
        """Fields by name, for tables and `--json`."""
        return asdict(self)


def get_law(name_or_path: str | Path) -> ScalingLaw:
    """A named law or a law saved by `save_law`.

    Args:
        name_or_path: one of `LAWS` (`hoffmann`, `besiroglu`), or the path of a JSON file written by `save_law`.

    Returns:
        The law.

    Raises:
        PlanError: the name is unknown and no such file exists, or the file is not a valid law.
    """
    key = str(name_or_path)
    if key in LAWS:
        return LAWS[key]
    path = Path(key)
    if path.is_file():
        return load_law(path)
    raise PlanError(
        f"unknown scaling law {key!r}: choose one of {', '.join(LAWS)}, "
        "or give the path of a JSON file written by fitting a law (`save_law`)"
    )


def save_law(law: ScalingLaw, path: str | Path) -> Path:
    """Write a law, with its fit (runs and intervals) if it has one, to a JSON file that `load_law` reads.

    Args:
        law: the law to write.
        path: destination file; parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    record: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "name": law.name, "source": law.source}
    record.update(law.constants())
    if law.fit is not None:
        record["fit"] = asdict(law.fit)  # tuples become JSON lists
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_law(path: str | Path) -> ScalingLaw:
    """Read a law written by `save_law`.

    Args:
        path: the JSON file.

    Returns:
        The law, its `source` set to the file, with its `fit` if the file has one.

    Raises:
        PlanError: the file is missing, not JSON, or lacks or mistypes a field (named in the message).
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"{path}: no such scaling-law file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlanError(f"{path}: not a scaling-law JSON file ({error})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise PlanError(f'{path}: not a scaling-law file (expected "format": "{FORMAT}"); write it with save_law')
    if record.get("version") != FORMAT_VERSION:
        raise PlanError(f"{path}: scaling-law format version {record.get('version')!r}, this llamita reads 1")
    try:
        constants = {name: _positive(record[name], name) for name in PARAMETERS}
        fit = None
        if record.get("fit") is not None:
            raw = record["fit"]
            fit = LawFit(
                points=tuple(tuple(float(x) for x in point) for point in raw["points"]),
                intervals={name: (float(low), float(high)) for name, (low, high) in raw["intervals"].items()},
                replicates=tuple(tuple(float(x) for x in row) for row in raw["replicates"]),
                confidence=float(raw["confidence"]),
                n_bootstrap=int(raw["n_bootstrap"]),
                seed=None if raw["seed"] is None else int(raw["seed"]),
                huber_delta=float(raw["huber_delta"]),
                n_starts=int(raw["n_starts"]),
                objective=float(raw["objective"]),
            )
    except KeyError as error:
        raise PlanError(f"{path}: missing field {error}; write the file with save_law") from None
    except (TypeError, ValueError) as error:
        raise PlanError(f"{path}: {error}") from None
    return ScalingLaw(**constants, name=str(record.get("name", path.stem)), source=str(path), fit=fit)


def _positive(value: Any, what: str) -> float:
    """`value` as a finite positive float, or a PlanError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PlanError(f"{what} must be a finite positive number, got {value!r}")
    return float(value)


def _check_loss(law: ScalingLaw, target_loss: float) -> float:
    """`target_loss` as a float, or a PlanError if no finite model reaches it under `law`."""
    target_loss = _positive(target_loss, "target loss")
    if target_loss <= law.E:
        raise PlanError(
            f"target loss {target_loss:g} is at or below the irreducible loss E = {law.E:g} of law {law.name!r}: "
            f"no finite model reaches it; choose a target above {law.E:g}"
        )
    return target_loss


def _allocation(law: ScalingLaw, n_params: float, n_tokens: float) -> Allocation:
    return Allocation(float(n_params), float(n_tokens), 6.0 * n_params * n_tokens, float(law.loss(n_params, n_tokens)))


def _optimal_tokens(law: ScalingLaw, n_params: float | np.ndarray) -> float | np.ndarray:
    """D on the compute-optimal line for N: where alpha·A/N^alpha = beta·B/D^beta (dL = 0 along 6·N·D = C)."""
    return (law.beta * law.B * np.power(n_params, law.alpha) / (law.alpha * law.A)) ** (1.0 / law.beta)


def optimal_for_flops(law: ScalingLaw, flops: float) -> Allocation:
    """The compute-optimal model for a FLOP budget: N, D minimising L(N, D) subject to 6·N·D = C.

    Closed form: N = G·(C/6)^(beta/(alpha+beta)) with G = (alpha·A / (beta·B))^(1/(alpha+beta)), D = C/(6N).
    For Gopher's budget, 5.76e23 FLOPs, `hoffmann` (the paper's rounded constants) gives N = 32.2B, D = 2.98T,
    L = 1.931; the paper's reported approach-3 optimum, about 40B, needs its unrounded exponents (0.336 and 0.283
    give 41.7B, 2.30T). `besiroglu` gives 72.2B, 1.33T, L = 1.974.

    Args:
        law: the scaling law.
        flops: training budget C in FLOPs, > 0.

    Returns:
        The allocation and its predicted loss.

    Raises:
        PlanError: the budget is not a finite positive number.
    """
    flops = _positive(flops, "FLOP budget")
    g = (law.alpha * law.A / (law.beta * law.B)) ** (1.0 / (law.alpha + law.beta))
    n_params = g * (flops / 6.0) ** law.params_exponent
    return _allocation(law, n_params, flops / (6.0 * n_params))


def optimal_for_params(law: ScalingLaw, n_params: float) -> Allocation:
    """The compute-optimal model of a given size: the D for which N is the optimum of its own budget 6·N·D.

    Under `hoffmann` a 13B model's compute-optimal data is 992B tokens (76 per parameter), not the 20 per
    parameter of Chinchilla's approaches 1 and 2; `besiroglu` gives 260B (20 per parameter).

    Args:
        law: the scaling law.
        n_params: parameters N, > 0.

    Returns:
        The allocation and its predicted loss.

    Raises:
        PlanError: n_params is not a finite positive number.
    """
    n_params = _positive(n_params, "number of parameters")
    return _allocation(law, n_params, _optimal_tokens(law, n_params))


def optimal_for_loss(law: ScalingLaw, target_loss: float) -> Allocation:
    """The cheapest model (fewest training FLOPs) whose predicted loss is `target_loss`.

    On the compute-optimal line the two reducible terms keep a fixed ratio, alpha·A/N^alpha = beta·B/D^beta, so
    A/N^alpha = (l - E)·beta/(alpha+beta) and B/D^beta = (l - E)·alpha/(alpha+beta): a closed form, which the
    tests check against bisection on C with `optimal_for_flops`.

    Args:
        law: the scaling law.
        target_loss: the loss to reach, above the law's irreducible loss E.

    Returns:
        The allocation; its loss equals `target_loss`.

    Raises:
        PlanError: the target is at or below E, or not a positive number.
    """
    excess = _check_loss(law, target_loss) - law.E
    total = law.alpha + law.beta
    n_params = (law.A / (excess * law.beta / total)) ** (1.0 / law.alpha)
    n_tokens = (law.B / (excess * law.alpha / total)) ** (1.0 / law.beta)
    return _allocation(law, n_params, n_tokens)


def inference_optimal(law: ScalingLaw, target_loss: float, inference_tokens: float) -> InferencePlan:
    """The model reaching `target_loss` with the fewest FLOPs over its life (Sardana & Frankle 2024).

    Minimises 6·N·D_train + 2·N·D_inference subject to L(N, D_train) = target_loss. Along the constraint
    D_train(N) = (B / (l - E - A/N^alpha))^(1/beta), and the derivative of the total,
    6·D_train·(1 - (alpha/beta)·(A/N^alpha)/(l - E - A/N^alpha)) + 2·D_inference, increases with N from -inf
    (at the smallest N that can reach l) to 2·D_inference (at the compute-optimal N), so its one root is found by
    bisection on log N.

    Sardana & Frankle's example, reproduced in the tests: a Chinchilla-quality 13B model (the loss of 13B trained on
    its compute-optimal data) serving 2T tokens is better replaced by a 6.97B model trained on 1.25T tokens,
    17.4% fewer FLOPs (alpha 0.336, beta 0.283, Hoffmann's other constants); with `hoffmann` (0.34, 0.28):
    8.02B, 1.75T tokens, 10.1% fewer.

    Args:
        law: the scaling law.
        target_loss: the loss to reach, above the law's irreducible loss E.
        inference_tokens: tokens the model will process in inference over its life, >= 0.

    Returns:
        The inference-aware model and its savings over the compute-optimal model with the same loss.

    Raises:
        PlanError: the target is at or below E, or inference_tokens is negative.
    """
    target_loss = _check_loss(law, target_loss)
    if not math.isfinite(inference_tokens) or inference_tokens < 0:
        raise PlanError(f"inference tokens must be a finite number >= 0, got {inference_tokens!r}")
    chinchilla = optimal_for_loss(law, target_loss)
    excess = target_loss - law.E

    def tokens(n: float) -> float:
        return (law.B / (excess - law.A / n**law.alpha)) ** (1.0 / law.beta)

    def slope(log_n: float) -> float:
        size_term = law.A * math.exp(-law.alpha * log_n)
        room = excess - size_term  # what the data term may still contribute
        if room <= 0:
            return -math.inf
        try:
            return 6.0 * tokens(math.exp(log_n)) * (1.0 - law.alpha / law.beta * size_term / room) + 2.0 * float(
                inference_tokens
            )
        except OverflowError:  # D_train beyond float range, right above the smallest reachable N
            return -math.inf

    n_params, n_tokens = chinchilla.n_params, chinchilla.n_tokens  # the optimum when nothing is served
    if inference_tokens > 0:
        # From the smallest N that can reach the loss at all (infinite data), where the slope is -inf.
        low, high = math.log(law.A / excess) / law.alpha, math.log(chinchilla.n_params)
        for _ in range(200):
            mid = 0.5 * (low + high)
            if mid in (low, high):
                break
            low, high = (mid, high) if slope(mid) < 0 else (low, mid)
        n_params = math.exp(high)
        n_tokens = tokens(n_params)
    train_flops = 6.0 * n_params * n_tokens
    inference_flops = 2.0 * n_params * inference_tokens
    total = train_flops + inference_flops
    chinchilla_total = chinchilla.flops + 2.0 * chinchilla.n_params * inference_tokens
    saved = max(chinchilla_total - total, 0.0)
    return InferencePlan(
        loss=target_loss,
        inference_tokens=float(inference_tokens),
        n_params=n_params,
        n_tokens=n_tokens,
        train_flops=train_flops,
        inference_flops=inference_flops,
        total_flops=total,
        chinchilla_params=chinchilla.n_params,
        chinchilla_tokens=chinchilla.n_tokens,
        chinchilla_total_flops=chinchilla_total,
        flops_saved=saved,
        flops_saved_fraction=saved / chinchilla_total,
    )


def fit_law(
    points: Iterable[tuple[float, float, float]],
    *,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int | None = 0,
    grid: Mapping[str, Sequence[float]] = PAPER_GRID,
    huber_delta: float = 1e-3,
    name: str = "fitted",
) -> ScalingLaw:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to runs as Hoffmann et al.'s approach 3 does, with bootstrap intervals.

    The law is written log L = LSE(e, a - alpha·log N, b - beta·log D) with E, A, B = exp(e), exp(a), exp(b), and
    the summed Huber loss (threshold `huber_delta`) between predicted and observed log loss is minimised by L-BFGS
    (float64) from every point of `grid`, keeping the best. All starts run as one batch: the paper's grid of 4500
    starts takes about a second on 30 runs, `COARSE_GRID` (72 starts) a tenth of that.

    Bootstrap replicate i refits the runs resampled with replacement, counts
    `np.random.default_rng(seed).multinomial(len(points), uniform, size=n_bootstrap)[i]`. Each refit starts
    L-BFGS from the distinct optima that the full fit's starts reached with an objective within twice the best,
    not from the whole grid again: a resample's objective is a perturbation of the full data's, so the basins that
    can win are the ones already competitive, and this makes hundreds of refits take about a second. The tests
    check that these refits equal refits from the whole grid.

    Args:
        points: runs as (parameters N, training tokens D, final loss); at least 5 (the law has 5 constants).
        n_bootstrap: number of bootstrap refits; 0 gives no intervals.
        confidence: coverage of the percentile intervals, in (0, 1).
        seed: seed of the resampling.
        grid: start values of alpha, beta, e, a, b; every combination is one L-BFGS start.
        huber_delta: Huber threshold on log-loss residuals (the paper's 1e-3).
        name: name of the fitted law.

    Returns:
        The law, its `fit` holding the runs, the intervals, the refits and the fit settings.

    Raises:
        PlanError: fewer than 5 runs, a non-positive or non-finite value, or a bad setting.
    """
    points = tuple((float(n), float(d), float(loss)) for n, d, loss in points)
    if len(points) < len(PARAMETERS):
        raise PlanError(
            f"fitting a scaling law needs at least {len(PARAMETERS)} runs (it has {len(PARAMETERS)} constants), "
            f"got {len(points)}; add runs of other sizes and token counts"
        )
    for i, point in enumerate(points):
        if not all(math.isfinite(x) and x > 0 for x in point):
            raise PlanError(f"run {i}: (N, D, loss) must be finite positive numbers, got {point}")
    if not 0 < confidence < 1:
        raise PlanError(f"confidence must be in (0, 1), got {confidence!r}")
    if n_bootstrap < 0:
        raise PlanError(f"n_bootstrap must be >= 0, got {n_bootstrap!r}")
    missing = set(_THETA) - set(grid)
    if missing:
        raise PlanError(f"grid lacks start values for {', '.join(sorted(missing))}")
    starts = np.array(list(itertools.product(*(grid[k] for k in _THETA))), dtype=np.float64)
    data = np.log(np.array(points, dtype=np.float64)).T  # (3, runs): log N, log D, log L

    ends, values = _minimise(starts, data, np.ones((1, len(points))), huber_delta)  # (1, starts, 5), (1, starts)
    best = values[0].argmin()
    replicates = np.empty((0, 5))
    intervals: dict[str, tuple[float, float]] = {}
    if n_bootstrap:
        competitive = ends[0][np.isfinite(values[0]) & (values[0] <= 2.0 * values[0, best])]
        warm = np.unique(np.round(competitive, 3), axis=0)
        counts = np.random.default_rng(seed).multinomial(
            len(points), np.full(len(points), 1.0 / len(points)), size=n_bootstrap
        )
        refits, refit_values = _minimise(warm, data, counts.astype(np.float64), huber_delta)
        replicates = _constants(refits[np.arange(n_bootstrap), refit_values.argmin(axis=1)])
        tail = 50.0 * (1.0 - confidence)
        low, high = np.percentile(replicates, [tail, 100.0 - tail], axis=0)
        intervals = {name: (float(lo), float(hi)) for name, lo, hi in zip(PARAMETERS, low, high)}
    fit = LawFit(
        points=points,
        intervals=intervals,
        replicates=tuple(tuple(map(float, row)) for row in replicates),
        confidence=confidence,
        n_bootstrap=n_bootstrap,
        seed=seed,
        huber_delta=huber_delta,
        n_starts=len(starts),
        objective=float(values[0, best]),
    )
    constants = _constants(ends[0, best : best + 1])[0]
    fitted = dict(zip(PARAMETERS, map(float, constants)))
    falls_with = {"alpha": "model size", "beta": "training tokens"}
    bad = [f"{k}={fitted[k]:.3g}: the loss does not fall with {falls_with[k]}" for k in falls_with if fitted[k] <= 0]
    bad += [f"{k}={v:.3g}: unbounded" for k, v in fitted.items() if not math.isfinite(v)]
    if bad:
        raise PlanError(
            f"the runs determine no law ({'; '.join(bad)}); add runs that span more sizes and token counts, each "
            "trained to its own end (its own schedule)"
        )
    return ScalingLaw(**dict(zip(PARAMETERS, map(float, constants))), name=name, source="fit_law", fit=fit)


def _constants(theta: np.ndarray) -> np.ndarray:
    """(fits, 5) of (e, a, alpha, b, beta) -> (fits, 5) of (E, A, B, alpha, beta)."""
    e, a, alpha, b, beta = theta.T
    return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=1)


def _minimise(starts: np.ndarray, data: np.ndarray, weights: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS from every start, for each row of run weights (a bootstrap replicate's counts).

    Args:
        starts: (starts, 5) values of (e, a, alpha, b, beta).
        data: (3, runs) log N, log D, log L.
        weights: (replicates, runs) weight of each run in each replicate's objective.
        delta: Huber threshold.

    Returns:
        ((replicates, starts, 5) end points, (replicates, starts) their objectives).
    """
    n_starts, n_reps = len(starts), len(weights)
    ends, values = [], []
    # Batches of replicates holding about 2M (start, run) pairs, so the temporaries stay in the tens of MB.
    chunk = max(1, 2_000_000 // (n_starts * weights.shape[1]))
    for i in range(0, n_reps, chunk):
        rows = weights[i : i + chunk]
        run_weights = np.repeat(rows, n_starts, axis=0)  # (chunk·starts, runs)
        theta, value = _lbfgs(
            lambda t, sel, w=run_weights: _huber_objective(t, data, w[sel], delta), np.tile(starts, (len(rows), 1))
        )
        ends.append(theta.reshape(len(rows), n_starts, 5))
        values.append(value.reshape(len(rows), n_starts))
    return np.concatenate(ends), np.concatenate(values)


def _huber_objective(
    theta: np.ndarray, data: np.ndarray, weights: np.ndarray, delta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Summed Huber loss of log L - LSE(e, a - alpha log N, b - beta log D), and its gradient, per row of theta.

    Args:
        theta: (fits, 5) values of (e, a, alpha, b, beta).
        data: (3, runs) log N, log D, log L.
        weights: (fits, runs) weight of each run.
        delta: Huber threshold.

    Returns:
        ((fits,) objective, (fits, 5) gradient).
    """
    log_n, log_d, log_l = data
    e, a, alpha, b, beta = (theta[:, i : i + 1] for i in range(5))  # each (fits, 1)
    size_term = a - alpha * log_n  # (fits, runs)
    data_term = b - beta * log_d  # (fits, runs)
    top = np.maximum(np.maximum(size_term, data_term), e)  # (fits, runs), for a stable log-sum-exp
    share_e, share_size, share_data = np.exp(e - top), np.exp(size_term - top), np.exp(data_term - top)
    total = share_e + share_size + share_data
    residual = top + np.log(total) - log_l  # (fits, runs): log predicted - log observed
    size = np.abs(residual)
    clipped = np.minimum(size, delta)
    huber = 0.5 * clipped**2 + delta * (size - clipped)  # 0.5 r^2 within delta, linear beyond
    # d Huber / d term = clip(residual) * softmax(term); the 1/total normalises the shares into the softmax.
    slope = weights * np.copysign(clipped, residual) / total
    by_size, by_data = slope * share_size, slope * share_data
    grad = np.stack(
        [(slope * share_e).sum(axis=1), by_size.sum(axis=1), -by_size @ log_n, by_data.sum(axis=1), -by_data @ log_d],
        axis=1,
    )
    return (weights * huber).sum(axis=1), grad


def _lbfgs(
    objective: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    *,
    memory: int = 10,
    max_iter: int = 200,
    ftol: float = 1e-9,
    gtol: float = 1e-12,
) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS with a backtracking Armijo line search, run on many independent problems at once.

    Each row of `x` is its own problem with its own history and step; rows stop when their objective stops
    improving (relative change <= ftol), their gradient vanishes (max |g| <= gtol) or no step decreases it.

    Args:
        objective: f(x_rows, row_indices) -> ((rows,) values, (rows, dim) gradients).
        x: (problems, dim) starting points.
        memory: number of (step, gradient change) pairs kept.
        max_iter: iteration limit.
        ftol: relative-change stop.
        gtol: gradient stop.

    Returns:
        ((problems, dim) final points, (problems,) final values).
    """
    x = x.copy()
    n, dim = x.shape
    value, grad = objective(x, np.arange(n))
    steps = np.zeros((memory, n, dim))
    changes = np.zeros((memory, n, dim))
    rho = np.zeros((memory, n))  # 0 marks an empty or rejected slot, which the two-loop recursion then skips
    scale = np.minimum(1.0, 1.0 / np.maximum(np.abs(grad).sum(axis=1), 1e-300))  # first step, as torch's LBFGS
    active = np.abs(grad).max(axis=1) > gtol
    for it in range(max_iter):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        # Two-loop recursion for the direction -H·g, newest pair first.
        q = grad[rows].copy()
        order = [(it - 1 - k) % memory for k in range(memory)]
        coef = {}
        for k in order:
            coef[k] = rho[k, rows] * np.einsum("ij,ij->i", steps[k, rows], q)
            q -= coef[k][:, None] * changes[k, rows]
        q *= scale[rows, None]
        for k in reversed(order):
            q += steps[k, rows] * (coef[k] - rho[k, rows] * np.einsum("ij,ij->i", changes[k, rows], q))[:, None]
        direction = -q
        descent = np.einsum("ij,ij->i", grad[rows], direction)
        uphill = descent >= 0  # a stale history: fall back to steepest descent
        if uphill.any():
            direction[uphill] = -grad[rows[uphill]] * scale[rows[uphill], None]
            descent[uphill] = np.einsum("ij,ij->i", grad[rows[uphill]], direction[uphill])
            rho[:, rows[uphill]] = 0.0
        # Backtracking: halve each row's step until its Armijo condition holds.
        t = np.ones(rows.size)
        new_x, new_value, new_grad = x[rows].copy(), value[rows].copy(), grad[rows].copy()
        pending = np.arange(rows.size)
        for _ in range(60):
            trial = x[rows[pending]] + t[pending, None] * direction[pending]
            f, g = objective(trial, rows[pending])
            ok = np.isfinite(f) & (f <= value[rows[pending]] + 1e-4 * t[pending] * descent[pending])
            done = pending[ok]
            new_x[done], new_value[done], new_grad[done] = trial[ok], f[ok], g[ok]
            pending = pending[~ok]
            if pending.size == 0:
                break
            t[pending] *= 0.5
        step = new_x - x[rows]
        change = new_grad - grad[rows]
        curvature = np.einsum("ij,ij->i", step, change)
        slot = it % memory
        good = curvature > 1e-300
        steps[slot, rows], changes[slot, rows] = step, change
        rho[slot, rows] = np.where(good, 1.0 / np.where(good, curvature, 1.0), 0.0)
        scale[rows] = np.where(good, curvature / np.maximum(np.einsum("ij,ij->i", change, change), 1e-300), scale[rows])
        improvement = value[rows] - new_value
        x[rows], value[rows], grad[rows] = new_x, new_value, new_grad
        stalled = np.zeros(rows.size, dtype=bool)
        stalled[pending] = True
        active[rows] = ~(
            stalled
            | (improvement <= ftol * np.maximum(np.abs(new_value), 1e-300))
            | (np.abs(new_grad).max(axis=1) <= gtol)
        )
    return x, value


def iso_loss_plot(
    law: ScalingLaw,
    out_png: str | Path,
    *,
    planned: tuple[float, float] | None = None,
    target_loss: float | None = None,
    inference_tokens: float | None = None,
) -> Path:
    """Draw iso-loss contours of `law` over log N and log D, with the compute-optimal line and the chosen models.

    Args:
        law: the scaling law.
        out_png: destination PNG; parent folders are created.
        planned: the user's planned (parameters N, training tokens D), marked with its loss.
        target_loss: loss for the inference-aware optimum; defaults to the planned point's loss.
        inference_tokens: if given, mark the inference-aware model for the target loss and the compute-optimal
            model with the same loss.

    Returns:
        The path written.

    Raises:
        PlanError: inference_tokens without a target loss or a planned point, or an unreachable target.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    marks: list[tuple[str, float, float, str]] = []  # (label, N, D, matplotlib marker)
    if planned is not None:
        n, d = _positive(planned[0], "planned parameters"), _positive(planned[1], "planned tokens")
        marks.append((f"planned: L = {float(law.loss(n, d)):.3f}", n, d, "o"))
        if target_loss is None:
            target_loss = float(law.loss(n, d))
    if inference_tokens is not None:
        if target_loss is None:
            raise PlanError("the inference-aware optimum needs a target loss or a planned (N, D) to take it from")
        plan = inference_optimal(law, target_loss, inference_tokens)
        marks.append((f"compute-optimal, L = {plan.loss:.3f}", plan.chinchilla_params, plan.chinchilla_tokens, "s"))
        marks.append(
            (
                f"inference-aware ({inference_tokens:.3g} tokens served): {plan.flops_saved_fraction:.1%} fewer FLOPs",
                plan.n_params,
                plan.n_tokens,
                "*",
            )
        )

    # A fitted law spans its runs, a published one 1e7..1e12 parameters and 1e9..1e14 tokens; widened to a decade
    # around every marked model.
    runs = list(law.fit.points) if law.fit is not None else []
    log_n = [math.log10(n) + s for n, _, _ in runs for s in (-0.5, 0.5)] or [7.0, 12.0]
    log_d = [math.log10(d) + s for _, d, _ in runs for s in (-0.5, 0.5)] or [9.0, 14.0]
    log_n += [math.log10(n) + s for _, n, _, _ in marks for s in (-1, 1)]
    log_d += [math.log10(d) + s for _, _, d, _ in marks for s in (-1, 1)]
    n_grid = np.logspace(min(log_n), max(log_n), 300)
    d_grid = np.logspace(min(log_d), max(log_d), 300)
    loss = law.loss(n_grid[None, :], d_grid[:, None])  # (tokens, params)

    fig = Figure(figsize=(7.5, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    levels = np.unique(np.round(np.quantile(loss, np.linspace(0.02, 0.98, 14)), 3))
    contours = ax.contour(n_grid, d_grid, loss, levels=levels, cmap="viridis")
    ax.clabel(contours, fmt="%.2f", fontsize=7)
    if target_loss is not None:  # the contour the marked models lie on
        ax.contour(n_grid, d_grid, loss, levels=[target_loss], colors="red", linestyles="dashed", linewidths=1.2)
        ax.plot([], [], color="red", ls="dashed", lw=1.2, label=f"L = {target_loss:.3f}")
    line = _optimal_tokens(law, n_grid)
    inside = (line >= d_grid[0]) & (line <= d_grid[-1])
    ax.plot(n_grid[inside], line[inside], color="black", lw=1.5, label="compute-optimal (C = 6ND)")
    if runs:
        ax.plot([n for n, _, _ in runs], [d for _, d, _ in runs], "k.", ms=6, label=f"the {len(runs)} fitted runs")
    for label, n, d, marker in marks:
        ax.plot([n], [d], marker=marker, ms=10 if marker == "*" else 7, ls="none", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("training tokens D")
    ax.set_title(
        f"iso-loss contours of {law.name}: L = {law.E:.3g} + {law.A:.4g}/N^{law.alpha:.3g}"
        f" + {law.B:.4g}/D^{law.beta:.3g}",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper right")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png
