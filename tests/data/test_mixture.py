import math

import pytest

from llamita.data.mixture import TINYLLAMA_WEIGHTS, Mixture, Stage


def test_constant_weights_are_normalised():
    m = Mixture.constant({"b": 1.0, "a": 3.0})
    assert m.sources == ("a", "b")
    assert m.weights(0) == pytest.approx({"a": 0.75, "b": 0.25})
    assert m.weights(10**9) == pytest.approx({"a": 0.75, "b": 0.25})


def test_tinyllama_weights_sum_to_one():
    w = Mixture.constant(TINYLLAMA_WEIGHTS).weights(0)
    assert math.isclose(sum(w.values()), 1.0)
    assert w["slimpajama"] == pytest.approx(0.693584)


def test_stages_switch_at_their_boundaries():
    m = Mixture([Stage(10, {"a": 1, "b": 0}), Stage(5, {"a": 0, "b": 1}), Stage(None, {"a": 1, "b": 1})])
    assert m.weights(9) == {"a": 1.0, "b": 0.0}
    assert m.weights(10) == {"a": 0.0, "b": 1.0}
    assert m.weights(14) == {"a": 0.0, "b": 1.0}
    assert m.weights(15) == {"a": 0.5, "b": 0.5}


def test_ramp_is_linear_from_first_to_last_step_and_holds_after_a_finite_last_stage():
    # End points are normalised before interpolating: {a: 2, b: 2} is {a: .5, b: .5}.
    m = Mixture([Stage(3, {"a": 1, "b": 0}), Stage(11, {"a": 1, "b": 0}, end_weights={"a": 2, "b": 2})])
    assert m.weights(3)["a"] == pytest.approx(1.0)
    assert m.weights(8)["a"] == pytest.approx(0.75)
    assert m.weights(13)["a"] == pytest.approx(0.5)
    assert m.weights(1000)["a"] == pytest.approx(0.5)
    for step in range(20):
        assert sum(m.weights(step).values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([], "at least one stage"),
        ([Stage(None, {"a": 1}), Stage(None, {"a": 1})], "stage 0: 'steps' is null"),
        ([Stage(0, {"a": 1})], "stage 0: 'steps' must be a positive integer"),
        ([Stage(None, {"a": 1}, end_weights={"a": 2})], "needs a finite 'steps'"),
        ([Stage(5, {"a": 1, "b": 1}), Stage(None, {"a": 1})], r"stage 1: .*missing \['b'\]"),
        ([Stage(5, {"a": 1}), Stage(None, {"a": 1, "c": 1})], r"stage 1: .*unknown \['c'\]"),
        ([Stage(5, {"a": 1}, end_weights={"b": 1})], r"stage 0: field 'end_weights'.*missing \['a'\]"),
        (
            [Stage(None, {"a": 1, "b": -0.5})],
            "stage 0: field 'weights' weight of 'b' must be a finite number >= 0",
        ),
        ([Stage(None, {"a": float("nan")})], "finite number"),
        ([Stage(None, {"a": 0, "b": 0})], "all weights zero"),
    ],
)
def test_invalid_stages_are_refused(stages, match):
    with pytest.raises(ValueError, match=match):
        Mixture(stages)


def test_negative_step_is_refused():
    with pytest.raises(ValueError, match="step must be >= 0"):
        Mixture.constant({"a": 1}).weights(-1)


def test_from_config_parses_stages():
    m = Mixture.from_config(
        [
            {"steps": 4, "weights": {"a": 1, "b": 0}},
            {"steps": 5, "weights": {"a": 1, "b": 0}, "end_weights": {"a": 0, "b": 1}},
            {"weights": {"a": 0, "b": 1}},
        ]
    )
    assert m.stages[1] == Stage(5, {"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0})
    assert m.stages[2].steps is None
    assert m.weights(6)["b"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"weights": {"a": 1}}, "expected a list of stages"),
        ([["a", 1]], "stage 0: expected a mapping"),
        (
            [{"steps": 3, "weights": {"a": 1}}, {"weight": {"a": 1}}],
            r"stage 1: unknown field\(s\) \['weight'\]",
        ),
        ([{"steps": 3}], "stage 0: missing field 'weights'"),
        ([{"steps": "10", "weights": {"a": 1}}], "stage 0: field 'steps' must be an integer"),
        ([{"steps": True, "weights": {"a": 1}}], "stage 0: field 'steps' must be an integer"),
        ([{"weights": {"a": "1"}}], "stage 0: field 'weights' weight of 'a' must be a number"),
        ([{"weights": {}}], "stage 0: field 'weights' must be a non-empty mapping"),
        ([{"steps": 2, "weights": {"a": 1}, "end_weights": [1]}], "stage 0: field 'end_weights' must be"),
    ],
)
def test_from_config_errors_name_stage_and_field(config, match):
    with pytest.raises(ValueError, match=match):
        Mixture.from_config(config)
