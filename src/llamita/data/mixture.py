"""Sampling weights over data sources as a function of the optimizer step.

A mixture is a list of stages. Each stage lasts a number of optimizer steps and either holds its weights
constant or ramps them linearly to ``end_weights``; the last stage may last until the end of training. The
weights are a pure function of the step, so a resumed run sees exactly the weights the original run saw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TINYLLAMA_WEIGHTS: dict[str, float] = {"slimpajama": 0.693584, "starcoderdata": 0.306416}
"""The TinyLlama pretraining mixture (SlimPajama without GitHub, plus StarCoderData), by tokens."""


@dataclass(frozen=True)
class Stage:
    """One phase of a mixture.

    Attributes:
        steps: How many optimizer steps the stage lasts; None means until the end of training (last
            stage only).
        weights: Relative weight of each source at the start of the stage (normalised when used).
        end_weights: If given, the weights ramp linearly from ``weights`` on the stage's first step to
            ``end_weights`` on its last step.
    """

    steps: int | None
    weights: dict[str, float]
    end_weights: dict[str, float] | None = None


class MixtureError(ValueError):
    """A malformed mixture: ``problem`` at a stage, field and source (each None where it does not apply).

    ``str()`` locates it under ``stages`` (``"stages[1].weights.web: must be ..."``); :meth:`where` puts it under
    another root, e.g. the config key ``data.stages``.
    """

    def __init__(
        self, problem: str, stage: int | None = None, field: str | None = None, source: str | None = None
    ) -> None:
        self.problem, self.stage, self.field, self.source = problem, stage, field, source
        super().__init__(f"{self.where('stages')}: {problem}")

    def where(self, root: str) -> str:
        """The location of the problem below ``root``: ``root[stage].field.source``."""
        stage = "" if self.stage is None else f"[{self.stage}]"
        field = "" if self.field is None else f".{self.field}"
        source = "" if self.source is None else f".{self.source}"
        return f"{root}{stage}{field}{source}"


class Mixture:
    """Per-step source weights built from consecutive stages.

    Args:
        stages: The stages in order. All stages must name the same sources (use weight 0 to switch one off).
        sources: The source names every stage must weigh; if None, those of the first stage.

    Raises:
        MixtureError: If the stages are empty, name different sources, have negative, non-finite or
            all-zero weights, a non-positive step count, a ramp without an end, or a stage without an end
            that is not last.
    """

    def __init__(self, stages: Sequence[Stage], sources: Sequence[str] | None = None) -> None:
        if not stages:
            raise MixtureError("at least one stage is required")
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.sources: tuple[str, ...] = tuple(sorted(self.stages[0].weights if sources is None else sources))
        self._starts: list[int] = []
        start = 0
        for i, stage in enumerate(self.stages):
            self._validate_stage(i, stage, last=i == len(self.stages) - 1)
            self._starts.append(start)
            if stage.steps is not None:
                start += stage.steps

    @classmethod
    def constant(cls, weights: Mapping[str, float]) -> Mixture:
        """A single stage with fixed weights for the whole run.

        Args:
            weights: Relative weight per source name.

        Returns:
            The mixture.
        """
        return cls([Stage(steps=None, weights=dict(weights))])

    @classmethod
    def from_config(cls, stages: Sequence[Mapping[str, Any]], sources: Sequence[str] | None = None) -> Mixture:
        """Build a mixture from YAML-style dicts.

        Each dict has ``weights`` (a mapping of source name to number), optionally ``steps`` (a positive
        integer; absent or null means until the end) and ``end_weights`` (same form as ``weights``).

        Args:
            stages: The stage dicts in order.
            sources: The source names every stage must weigh (the run's ``data.sources``); if None, those of
                the first stage.

        Returns:
            The mixture.

        Raises:
            MixtureError: Naming the stage index and field when a stage is malformed.
        """
        if isinstance(stages, Mapping) or not isinstance(stages, Sequence):
            raise MixtureError(f"expected a list of stages, got {type(stages).__name__}")
        parsed = []
        allowed = {"steps", "weights", "end_weights"}
        for i, raw in enumerate(stages):
            if not isinstance(raw, Mapping):
                raise MixtureError(f"expected a mapping, got {type(raw).__name__}", i)
            unknown = sorted(set(raw) - allowed)
            if unknown:
                raise MixtureError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}", i)
            if "weights" not in raw:
                raise MixtureError("missing field 'weights'", i)
            steps = raw.get("steps")
            if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
                raise MixtureError(f"must be an integer or null, got {steps!r}", i, "steps")
            end = raw.get("end_weights")
            parsed.append(
                Stage(
                    steps=steps,
                    weights=_parse_weights(i, "weights", raw["weights"]),
                    end_weights=None if end is None else _parse_weights(i, "end_weights", end),
                )
            )
        return cls(parsed, sources)

    def weights(self, step: int) -> dict[str, float]:
        """Normalised source weights for an optimizer step.

        Past the end of a finite last stage, that stage's final weights hold.

        Args:
            step: Optimizer step, counted from 0.

        Returns:
            Weight per source name (all sources, sorted by name), summing to 1.
        """
        if step < 0:
            raise ValueError(f"mixture: step must be >= 0, got {step}")
        i = len(self._starts) - 1
        while self._starts[i] > step:
            i -= 1
        stage = self.stages[i]
        start_w = _normalise(stage.weights)
        if stage.end_weights is None:
            return {name: start_w[name] for name in self.sources}
        end_w = _normalise(stage.end_weights)
        assert stage.steps is not None  # validated: a ramp has an end
        t = min(1.0, (step - self._starts[i]) / max(stage.steps - 1, 1))
        return {name: (1.0 - t) * start_w[name] + t * end_w[name] for name in self.sources}

    def _validate_stage(self, i: int, stage: Stage, last: bool) -> None:
        if stage.steps is None:
            if not last:
                raise MixtureError("is null (until the end of training), which only the last stage may be", i, "steps")
            if stage.end_weights is not None:
                raise MixtureError("a ramp needs a finite 'steps'", i, "end_weights")
        elif isinstance(stage.steps, bool) or not isinstance(stage.steps, int) or stage.steps <= 0:
            raise MixtureError(f"must be a positive integer, got {stage.steps!r}", i, "steps")
        fields = [("weights", stage.weights)]
        if stage.end_weights is not None:
            fields.append(("end_weights", stage.end_weights))
        for field, weights in fields:
            names = set(weights)
            missing = sorted(set(self.sources) - names)
            unknown = sorted(names - set(self.sources))
            if missing or unknown:
                raise MixtureError(
                    f"must weigh exactly the sources {list(self.sources)}; missing {missing}, unknown {unknown} "
                    "(use weight 0 to disable one)",
                    i,
                    field,
                )
            for name, w in weights.items():
                if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
                    raise MixtureError(f"must be a finite number >= 0, got {w!r}", i, field, name)
            if sum(weights.values()) <= 0:
                raise MixtureError("all weights are zero; give one a weight > 0", i, field)


def _parse_weights(i: int, field: str, raw: Any) -> dict[str, float]:
    if not isinstance(raw, Mapping) or not raw:
        raise MixtureError(f"must be a non-empty mapping of source name to weight, got {raw!r}", i, field)
    out = {}
    for name, w in raw.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise MixtureError(f"must be a number, got {w!r}", i, field, str(name))
        out[str(name)] = float(w)
    return out


def _normalise(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}
