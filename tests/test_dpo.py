"""`llamita dpo` end to end on CPU: the pretraining trainer with tree-packed preference pairs, reference log-probs
computed once and stored (reused on resume, recomputed when the data or the reference changes), the same losses as
a live reference, exact resume, preference metrics in metrics.jsonl, bad records counted."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from llamita.chat.reference_logps import META_FILE, REFERENCE_FILE
from llamita.cli import main
from llamita.config import load_config
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics


@pytest.fixture(scope="module")
def base_run(debug_config, tmp_path_factory):
    """A short pretraining run of the debug preset to preference-tune."""
    from llamita.pretrain import pretrain

    cfg = debug_config(tmp_path_factory.mktemp("dpo_base") / "run", **{"train.max_steps": "6", "eval.interval": "0"})
    pretrain(cfg)
    return cfg.out_dir


def _write_pairs(path, n: int = 60, offset: int = 1) -> None:
    """Arithmetic pairs (chosen: the right sum; rejected: off by one), in both schemas, and two bad records."""
    with path.open("w") as f:
        for i in range(n):
            question, right, wrong = (
                f"what is {i} plus one?",
                f"{i} plus one is {i + offset}.",
                f"{i} plus one is {i + 2}.",
            )
            if i % 2:
                f.write(json.dumps({"prompt": question, "chosen": right, "rejected": wrong}) + "\n")
            else:
                user = {"role": "user", "content": question}
                record = {"chosen": [user, {"role": "assistant", "content": right}],
                          "rejected": [user, {"role": "assistant", "content": wrong}]}  # fmt: skip
                f.write(json.dumps(record) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}) + "\n")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    _write_pairs(path)
    return path


def _cfg(out, base_run, pairs_file, **overrides):
    values = {"out_dir": str(out), "init.from": str(base_run), "dpo.data": f"['{pairs_file}']", **overrides}
    return load_config("dpo-debug", values)


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def dpo_run(base_run, pairs_file, tmp_path_factory):
    """A whole dpo-debug run (two epochs, every checkpoint kept) with stored reference log-probs, and its output."""
    from llamita.dpo import dpo

    out = tmp_path_factory.mktemp("dpo") / "run"
    capture = pytest.MonkeyPatch()
    printed: list[str] = []
    capture.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    try:
        result = dpo(_cfg(out, base_run, pairs_file, **{"checkpoint.keep_last": "0"}))
    finally:
        capture.undo()
    return out, result, "\n".join(printed)


def test_dpo_trains_on_stored_reference_log_probs_and_logs_preference_metrics(dpo_run):
    out, result, printed = dpo_run
    assert "2 record(s) rejected" in printed and "invalid_json=1" in printed and "same_completion=1" in printed
    assert "reference log-probs: computing them for 60 pairs (none stored" in printed
    assert (out / REFERENCE_FILE).is_file() and json.loads((out / META_FILE).read_text())["pairs"] == 60
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    # Step 1 starts from the reference itself: every log-ratio is 0, the sigmoid loss log 2 and the rewards 0.
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert train[-1]["loss"] < train[0]["loss"] and train[-1]["rewards/margins"] > 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert all(key in r for r in train)
    val = [r for r in rows if "val_loss" in r]
    assert val[0]["step"] == 0 and val[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"val_rewards/accuracies", "val_rewards/margins", "val_pairs"} <= set(val[-1])
    assert result["step"] == train[-1]["step"] > 4 and result["val_pairs"] == val[-1]["val_pairs"] > 0


def test_a_live_reference_gives_the_stored_references_losses(dpo_run, base_run, pairs_file, tmp_path, capsys):
    from llamita.dpo import dpo

    out, _, _ = dpo_run
    dpo(_cfg(tmp_path / "live", base_run, pairs_file, **{"dpo.reference": "live"}))
    assert "a frozen copy of the starting model" in capsys.readouterr().out
    assert not (tmp_path / "live" / REFERENCE_FILE).exists()
    assert _losses(tmp_path / "live") == pytest.approx(_losses(out), rel=1e-6)


def test_resume_is_exact_and_reuses_the_stored_reference_log_probs(dpo_run, base_run, pairs_file, tmp_path, capsys):
    from llamita.dpo import dpo

    out, _, _ = dpo_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    stored = (resumed / REFERENCE_FILE).read_bytes()
    for folder in ckpt.list_checkpoints(resumed):
        if folder.name != "step_00000004":
            shutil.rmtree(folder)
    dpo(_cfg(resumed, base_run, pairs_file))
    printed = capsys.readouterr().out
    assert "reference log-probs: reused" in printed and "checksum verified" in printed
    assert "resumed from" in printed
    assert _losses(resumed) == _losses(out)
    assert (resumed / REFERENCE_FILE).read_bytes() == stored


def test_changed_data_or_reference_weights_or_a_damaged_file_recompute_them(dpo_run, base_run, tmp_path, capsys):
    from llamita.dpo import dpo

    out, _, _ = dpo_run
    one_step = {"train.max_steps": "1", "eval.interval": "0", "checkpoint.resume": "none"}
    run = tmp_path / "run"
    run.mkdir()
    for name in (REFERENCE_FILE, META_FILE):
        shutil.copy(out / name, run / name)
    same, changed = tmp_path / "same.jsonl", tmp_path / "changed.jsonl"
    _write_pairs(same)
    _write_pairs(changed, offset=3)  # other chosen answers
    dpo(_cfg(run, base_run, same, **one_step))
    assert "reference log-probs: reused" in capsys.readouterr().out  # the same pairs from another file
    dpo(_cfg(run, base_run, changed, **one_step))
    assert "(the data changed since they were stored)" in capsys.readouterr().out
    dpo(_cfg(run, out, changed, **one_step))  # starting from the tuned model: another reference
    assert "(the reference weights changed since they were stored)" in capsys.readouterr().out
    damaged = bytearray((run / REFERENCE_FILE).read_bytes())
    damaged[-1] ^= 0xFF
    (run / REFERENCE_FILE).write_bytes(bytes(damaged))
    dpo(_cfg(run, out, changed, **one_step))
    assert "does not match its checksum" in capsys.readouterr().out


def test_lora_with_a_live_reference_and_the_reference_free_simpo(base_run, pairs_file, tmp_path, capsys):
    from llamita.dpo import dpo

    short = {"train.max_steps": "2", "eval.interval": "0"}
    lora = dpo(_cfg(tmp_path / "lora", base_run, pairs_file, **short, **{"lora.rank": "4", "dpo.reference": "live"}))
    assert _losses(tmp_path / "lora")[1] == pytest.approx(math.log(2), abs=1e-6) and lora["step"] == 2
    dpo(_cfg(tmp_path / "simpo", base_run, pairs_file, **short, **{"dpo.loss": "simpo", "dpo.beta": "2.0"}))
    assert "reference: none (simpo is reference-free)" in capsys.readouterr().out
    assert not (tmp_path / "simpo" / REFERENCE_FILE).exists()
    assert all(math.isfinite(v) for v in _losses(tmp_path / "simpo").values())


def test_dpo_errors_are_one_line(base_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--config", "dpo-debug", "--out_dir", str(tmp_path / "x"), "--init.from", str(base_run)])
    assert e.value.code == 2 and "dpo.data is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--config", "dpo-debug", "--dpo.data", "[x.jsonl]", "--init.from", str(base_run),
              "--dpo.max_prompt_length", "64"])  # fmt: skip
    assert e.value.code == 2 and "dpo.max_prompt_length=64 must be below dpo.max_length=64" in capsys.readouterr().err
