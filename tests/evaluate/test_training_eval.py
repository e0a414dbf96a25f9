"""Zero-shot task accuracy during pretraining (`eval.tasks`): logged against tokens, checked before training."""

from __future__ import annotations

import pytest
from eval_fixture_data import write_native

from llamita.config import ConfigError
from llamita.pretrain import pretrain
from llamita.train.metrics import read_metrics


def test_task_accuracy_is_logged_at_intervals(prepared, debug_config, tmp_path):
    data = write_native(tmp_path / "eval")
    tasks = f"{{hellaswag: '{data['hellaswag']}', boolq: '{data['boolq']}'}}"
    cfg = debug_config(
        tmp_path / "run",
        **{"train.max_steps": "4", "eval.tasks": tasks, "eval.task_interval": "2", "eval.interval": "0"},
    )
    pretrain(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/hellaswag/acc_norm" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["tokens"] == r["step"] * cfg.train.global_batch_tokens
        assert 0.0 <= r["eval/hellaswag/acc_norm"] <= 1.0 and 0.0 <= r["eval/boolq/acc"] <= 1.0
        assert "eval/tinyllama_avg" not in r or 0.0 <= r["eval/tinyllama_avg"] <= 1.0


@pytest.mark.parametrize(
    ("tasks", "needle"),
    [("{nosuchtask: /tmp}", "unknown task"), ("{hellaswag: /does/not/exist}", "no such file")],
)
def test_bad_tasks_are_refused_before_training(prepared, debug_config, tmp_path, tasks, needle):
    cfg = debug_config(tmp_path / "run", **{"eval.tasks": tasks})
    with pytest.raises(ConfigError, match=needle):
        pretrain(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
