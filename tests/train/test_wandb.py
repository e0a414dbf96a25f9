"""Weights & Biases as a second logger (`log.wandb`): offline runs read back with wandb's own reader of its .wandb
files hold the rows of metrics.jsonl, the resolved config, and one run id across a resume."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llamita.config import ConfigError, load_config, to_dict
from llamita.pretrain import pretrain
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import WANDB_RUN_ID_FILE, MetricsLogger, read_metrics


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B with every file under tmp_path and no way to the network: no API key, mode left to the test (the runs
    say `log.wandb_mode=offline`), and a server address that nothing listens on should anything try to go online."""
    wandb = pytest.importorskip("wandb", reason="needs the wandb extra: pip install 'llamita[wandb]'")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in ("CACHE", "CONFIG", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no crash reports to Sentry either
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    yield
    wandb.teardown()  # W&B reads the environment once per setup: the next test's must be read afresh


def wandb_runs(out_dir: Path, wait_s: float = 60.0) -> list[dict[str, Any]]:
    """`read_wandb_runs`, again until every file holds its run's exit record (its last): W&B's service process
    writes the .wandb file on its own, and on a loaded machine it was seen to finish that after `finish()` had
    returned."""
    deadline = time.monotonic() + wait_s
    while True:
        runs = read_wandb_runs(out_dir)
        if all(r["exited"] for r in runs) or time.monotonic() > deadline:
            return sorted(runs, key=lambda r: r.get("start", 0))
        time.sleep(0.5)


def read_wandb_runs(out_dir: Path) -> list[dict[str, Any]]:
    """The offline W&B runs under <out_dir>/wandb, read from their .wandb files:
    {"id", "name", "project", "start", "config", "rows"} with each history row without W&B's own `_` keys."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    runs = []
    for path in (out_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        store = DataStore()
        store.open_for_scan(str(path))
        run: dict[str, Any] = {"config": {}, "rows": [], "exited": False}
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, name=record.run.display_name, project=record.run.project)
                run["start"] = record.run.start_time.ToNanoseconds()
                updates = record.run.config.update
            elif kind == "config":
                updates = record.config.update
            elif kind == "exit":
                run["exited"] = True
                continue
            elif kind == "history":
                items = {key(i): json.loads(i.value_json) for i in record.history.item}
                run["rows"].append({k: v for k, v in items.items() if not k.startswith("_")})
                continue
            else:
                continue
            run["config"].update({key(u): json.loads(u.value_json) for u in updates if key(u) != "_wandb"})
        runs.append(run)
    return runs


def test_a_run_logs_its_metrics_rows_and_config(offline, debug_config, tmp_path):
    run = tmp_path / "tiny-run"
    settings = {"train.max_steps": "6", "eval.interval": "3", "log.interval": "2"}
    cfg = debug_config(run, **settings, **{"log.wandb": "true", "log.wandb_mode": "offline"})
    pretrain(cfg)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 6]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    [logged] = wandb_runs(run)
    assert logged["rows"] == rows  # the same rows, keys and values, in the same order
    assert logged["config"] == json.loads(json.dumps(to_dict(cfg)))
    assert (logged["name"], logged["project"]) == ("tiny-run", "llamita")
    assert logged["id"] == (run / WANDB_RUN_ID_FILE).read_text().strip()


def test_a_resumed_run_continues_its_wandb_run(offline, debug_config, tmp_path):
    """Cut at the step-3 checkpoint, resumed: the resumed part has the first part's run id and the rows after step
    3 (as metrics.jsonl, which keeps each step once); a fresh start in the same directory is a new W&B run."""
    run = tmp_path / "run"
    settings = {"train.max_steps": "6", "checkpoint.interval": "3", "checkpoint.keep_last": "0", "eval.interval": "0"}
    cfg = debug_config(run, **settings, **{"log.wandb": "true", "log.wandb_mode": "offline"})
    pretrain(cfg)
    shutil.rmtree(ckpt.checkpoint_path(run, 6))
    # W&B names an offline run's folder by its start second and run id: a resume of the same id within the same
    # second would write into the first part's folder (a real run never resumes that fast).
    time.sleep(1.1)
    pretrain(cfg)
    first, resumed = wandb_runs(run)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in first["rows"]] == [1, 2, 3, 4, 5, 6, 6]  # 6 twice: training, then validation
    assert first["id"] == resumed["id"]
    assert resumed["rows"] == [r for r in rows if r["step"] > 3]
    assert first["rows"][:3] == rows[:3]

    shutil.rmtree(run / "checkpoints")
    pretrain(cfg)
    assert wandb_runs(run)[-1]["id"] != first["id"]


def test_task_rows_other_ranks_and_the_mode_from_the_environment(offline, tmp_path, monkeypatch):
    """Validation, eval/ task and branch rows go as they are (keys with slashes, strings); WANDB_MODE decides under
    `log.wandb_mode=auto`; ranks other than 0 start no W&B run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config("debug", {"out_dir": str(tmp_path / "run"), "log.wandb": "true"})
    rows = [
        {"step": 0, "tokens": 0, "branched_from": "runs/base/checkpoints/step_00000004"},
        {"step": 1, "loss": 6.25, "lr": 1e-4, "grad_norm": 0.5, "tokens": 512, "tokens_per_s": 1234.5},
        {"step": 1, "tokens": 512, "val_loss": 6.0, "val_ppl": 403.4287934927351},
        {"step": 1, "tokens": 512, "eval/hellaswag/acc_norm": 0.25, "eval/boolq/acc": 0.75},
    ]
    for rank in (1, 0):
        logger = MetricsLogger(tmp_path / "run", 1, tensorboard=False, progress=False, enabled=rank == 0, wandb=cfg)
        for row in rows:
            logger.log(row)
        logger.close()
        if rank == 1:
            assert not (tmp_path / "run").exists()
    [logged] = wandb_runs(tmp_path / "run")
    assert logged["rows"] == rows


def test_without_the_package_the_run_stops_before_training(debug_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    cfg = debug_config(tmp_path / "run", **{"train.max_steps": "2", "log.wandb": "true"})
    with pytest.raises(ConfigError, match=r"log\.wandb: .*pip install 'llamita\[wandb\]'"):
        pretrain(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
