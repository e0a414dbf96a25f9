import math

import pytest

from llamita.data.mixture import TINYLLAMA_WEIGHTS, Mixture, MixtureError, Stage


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
        ([Stage(None, {"a": 1}), Stage(None, {"a": 1})], r"stages\[0\]\.steps: is null .* only the last stage"),
        ([Stage(0, {"a": 1})], r"stages\[0\]\.steps: must be a positive integer, got 0"),
        ([Stage(None, {"a": 1}, end_weights={"a": 2})], r"stages\[0\]\.end_weights: a ramp needs a finite 'steps'"),
        ([Stage(5, {"a": 1, "b": 1}), Stage(None, {"a": 1})], r"stages\[1\]\.weights: .*missing \['b'\]"),
        ([Stage(5, {"a": 1}), Stage(None, {"a": 1, "c": 1})], r"stages\[1\]\.weights: .*unknown \['c'\]"),
        ([Stage(5, {"a": 1}, end_weights={"b": 1})], r"stages\[0\]\.end_weights: .*missing \['a'\]"),
        ([Stage(None, {"a": 1, "b": -0.5})], r"stages\[0\]\.weights\.b: must be a finite number >= 0, got -0.5"),
        ([Stage(None, {"a": float("nan")})], "finite number"),
        ([Stage(None, {"a": 0, "b": 0})], r"stages\[0\]\.weights: all weights are zero"),
    ],
)
def test_invalid_stages_are_refused(stages, match):
    with pytest.raises(MixtureError, match=match):
        Mixture(stages)


def test_stages_must_weigh_the_sources_given():
    with pytest.raises(MixtureError, match=r"stages\[0\]\.weights: .*missing \['b'\], unknown \['c'\]") as err:
        Mixture.from_config([{"weights": {"a": 1, "c": 1}}], sources=["a", "b"])
    assert err.value.where("data.stages") == "data.stages[0].weights"
    assert Mixture.from_config([{"weights": {"a": 1, "b": 0}}], sources=["b", "a"]).sources == ("a", "b")


def test_error_locations_can_be_rerooted():
    with pytest.raises(MixtureError) as err:
        Mixture.from_config([{"steps": 2, "weights": {"a": 1}}, {"weights": {"a": -1}}])
    e = err.value
    assert (e.stage, e.field, e.source) == (1, "weights", "a")
    assert e.where("data.stages") == "data.stages[1].weights.a"
    assert str(e) == f"stages[1].weights.a: {e.problem}"


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
        ({"weights": {"a": 1}}, "^stages: expected a list of stages"),
        ([["a", 1]], r"stages\[0\]: expected a mapping"),
        (
            [{"steps": 3, "weights": {"a": 1}}, {"weight": {"a": 1}}],
            r"stages\[1\]: unknown field\(s\) \['weight'\]",
        ),
        ([{"steps": 3}], r"stages\[0\]: missing field 'weights'"),
        ([{"steps": "10", "weights": {"a": 1}}], r"stages\[0\]\.steps: must be an integer"),
        ([{"steps": True, "weights": {"a": 1}}], r"stages\[0\]\.steps: must be an integer"),
        ([{"weights": {"a": "1"}}], r"stages\[0\]\.weights\.a: must be a number"),
        ([{"weights": {}}], r"stages\[0\]\.weights: must be a non-empty mapping"),
        ([{"steps": 2, "weights": {"a": 1}, "end_weights": [1]}], r"stages\[0\]\.end_weights: must be"),
    ],
)
def test_from_config_errors_name_stage_and_field(config, match):
    with pytest.raises(MixtureError, match=match):
        Mixture.from_config(config)
