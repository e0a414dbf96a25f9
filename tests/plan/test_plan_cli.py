"""`llamita plan`: every question from the command line, the references' numbers, and errors as one line."""

from __future__ import annotations

import json

import pytest

from llamita.cli import main


def _answer(capsys, *argv: str) -> dict:
    main(["plan", *argv, "--json"])
    return json.loads(capsys.readouterr().out)


def _error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(["plan", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llamita plan: error: ") and "\n" not in err
    return err


def test_the_references_numbers_from_the_command_line(capsys):
    # TinyLlama: 24k tokens/s per A100 -> ~3,456 A100-hours per 300B tokens; a Chinchilla-optimal 1.1B (22B tokens)
    # in ~32 hours on 8 A100s.
    tl = _answer(capsys, "cost", "--preset", "tinyllama-1.1b", "--tokens", "300e9", "--gpus", "A100-40G",
                 "--tokens-per-s", "24000")  # fmt: skip
    assert tl["gpu_hours"] == pytest.approx(3456, rel=0.01)
    eight = _answer(capsys, "cost", "--preset", "tinyllama-1.1b", "--tokens", "22e9", "--gpus", "8xA100-40G",
                    "--tokens-per-s", "24000")  # fmt: skip
    assert eight["wall_hours"] == pytest.approx(32, rel=0.01)
    # Open-Llama: a 7B model at 3,290 tokens/s per GPU, 500B tokens: ~43,000 GPU-hours, ~$67,725 at $12.6 / 8 GPUs.
    ol = _answer(capsys, "cost", "--params", "7e9", "--tokens", "500e9", "--gpus", "8xA100-80G",
                 "--tokens-per-s", "3290", "--price", str(12.6 / 8))  # fmt: skip
    assert ol["gpu_hours"] == pytest.approx(43_000, rel=0.02) and ol["dollars"] == pytest.approx(67_725, rel=0.02)
    # Chinchilla's budget under both laws; Sardana & Frankle's 13B -> ~8B at 0.34/0.28 (about 10% fewer FLOPs).
    for law, n_params in [("hoffmann", 32.19e9), ("besiroglu", 72.25e9)]:
        assert _answer(capsys, "optimal", "--flops", "5.76e23", "--law", law)["n_params"] == pytest.approx(
            n_params, rel=0.01
        )
    sf = _answer(capsys, "inference", "--params", "13e9", "--inference-tokens", "2e12")
    assert sf["n_params"] == pytest.approx(8.0e9, rel=0.02) and sf["flops_saved_fraction"] == pytest.approx(
        0.10, abs=0.01
    )


def test_memory_and_serving(capsys):
    mem = _answer(capsys, "memory", "--preset", "tinyllama-1.1b", "--seq-len", "2048", "--micro-batch", "8")
    assert mem["peak_allocated_gib"] == pytest.approx(35.7, rel=0.01)  # bench/results/2026-11-24-compute-copies
    assert mem["fits H100-80G (79.1 GiB)"] and not mem["fits RTX4090-24G (23.6 GiB)"]
    serve = _answer(capsys, "serve", "--tokens-per-s", "1000", "--price", "3.6")
    assert serve["dollars_per_million_tokens"] == pytest.approx(1.0)
    main(["plan", "memory", "--preset", "debug", "--gpu", "H100"])
    assert "| largest micro-batch on H100-80G |" in capsys.readouterr().out


def _fake_run(root, n_params_preset: str, tokens: int, loss: float):
    """A run directory as `llamita pretrain` leaves it, as far as `plan fit` reads it: a checkpoint's trainer state
    with the model config, and metrics.jsonl with the final validation row."""
    import dataclasses

    from llamita.model import get_preset

    folder = root / "checkpoints" / "step_00000010"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"")
    (folder / "trainer_state.json").write_text(
        json.dumps({"step": 10, "model_config": dataclasses.asdict(get_preset(n_params_preset))})
    )
    rows = [{"step": 0, "tokens": 0, "val_loss": 9.0}, {"step": 10, "tokens": tokens, "loss": loss + 0.1}]
    rows.append({"step": 10, "tokens": tokens, "val_loss": loss})
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def test_fit_your_runs_then_ask_with_the_fitted_law(capsys, tmp_path):
    from llamita.model import get_preset
    from llamita.plan.laws import ScalingLaw

    truth = ScalingLaw(E=1.5, A=60.0, B=300.0, alpha=0.35, beta=0.3)
    runs = []
    for preset in ["sweep-xs", "sweep-s", "sweep-m", "sweep-l"]:
        for tokens in [10**6, 4 * 10**6, 16 * 10**6]:
            loss = float(truth.loss(get_preset(preset).num_params, tokens))
            runs.append(_fake_run(tmp_path / f"{preset}-{tokens}", preset, tokens, loss))
    law = tmp_path / "law.json"
    fitted = _answer(capsys, "fit", *runs, "--out", str(law), "--bootstrap", "20")
    assert fitted["runs"] == 12 and law.is_file()
    assert fitted["alpha"] == pytest.approx(0.35, rel=0.02) and fitted["beta"] == pytest.approx(0.3, rel=0.02)
    answer = _answer(capsys, "optimal", "--flops", "1e17", "--law", str(law))
    expected = _answer(capsys, "optimal", "--flops", "1e17", "--law", "hoffmann")  # another law, another answer
    assert answer["law"] == "fitted" and answer["n_params"] != pytest.approx(expected["n_params"], rel=0.1)
    main(["plan", "plot", "--law", str(law), "--out", str(tmp_path / "p.png"), "--planned", "1e6,1e8"])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert "no metrics.jsonl" in _error(capsys, "fit", str(tmp_path), "--out", str(law))
    presets = ["sweep-xs", "sweep-s"] * 3  # losses that rise with the tokens: no law fits
    rising = [_fake_run(tmp_path / f"up{i}", p, 10**6 * (i + 1), 3.0 + 0.1 * i) for i, p in enumerate(presets)]
    assert "the loss does not fall with training tokens" in _error(capsys, "fit", *rising, "--out", str(law))


def test_a_real_run_is_a_point(debug_config, tmp_path):
    from llamita.plan.runs import read_run_point
    from llamita.pretrain import pretrain

    cfg = debug_config(tmp_path / "run", **{"train.max_steps": "4", "eval.interval": "2"})
    result = pretrain(cfg)
    point = read_run_point(cfg.out_dir)
    assert (point.step, point.n_tokens, point.loss) == (4, 4 * cfg.train.global_batch_tokens, result["val_loss"])
    assert point.n_params == 123_712 + 2 * (400 - 256) * 64  # the debug preset with the tests' 400-token vocabulary


def test_measure_times_the_real_trainer(capsys):
    main(["plan", "cost", "--preset", "debug", "--tokens", "1e6", "--measure", "--seq-len", "32", "--micro-batch", "2",
          "--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| loss " in out  # the training rows of the timed llamita pretrain run
    answer = json.loads(out[out.index("\n{\n") :])
    assert answer["tokens_per_s_per_gpu"] > 0 and answer["throughput_source"].startswith("measured here (cpu")
    assert answer["gpu_hours"] == pytest.approx(1e6 / answer["tokens_per_s_per_gpu"] / 3600)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["optimal", "--flops", "-1"], "FLOP budget must be a finite positive number"),
        (["optimal", "--loss", "1.5"], "irreducible loss E = 1.69"),
        (["optimal"], "--flops C or a target as --loss L"),
        (["optimal", "--flops", "1e20", "--law", "nope"], "unknown scaling law 'nope'"),
        (["cost", "--preset", "debug", "--tokens", "1e9", "--gpus", "8xB200", "--tokens-per-s", "1"], "unknown GPU"),
        (["cost", "--preset", "debug", "--tokens", "-5", "--tokens-per-s", "1"], "tokens"),
        (["cost", "--preset", "debug", "--tokens", "1e9"], "give the throughput one way"),
        (
            [
                "cost",
                "--preset",
                "tinyllama-1.1b",
                "--tokens",
                "1e9",
                "--gpus",
                "8xA100-40G",
                "--throughput",
                "bench/results/2026-11-24-compute-copies.json",
            ],
            "measured on NVIDIA H100",
        ),  # fmt: skip
        (["memory", "--preset", "nope"], "--preset: unknown model preset"),
        (["serve", "--tokens-per-s", "0", "--price", "1"], "tokens_per_s"),
    ],
)
def test_bad_questions_are_one_line_errors(capsys, argv, needle):
    assert needle in _error(capsys, *argv)
