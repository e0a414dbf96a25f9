"""bench/scaling.py: its arithmetic, and the whole script in its CPU smoke mode (gloo, 1 and 2 processes)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "bench" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def rows(rates: dict[int, float], steps: int, interval: int) -> list[dict]:
    """metrics.jsonl rows as the trainer writes them: every row of a log interval carries that interval's rate."""
    out = []
    for step in range(1, steps + 1):
        end = -(-step // interval) * interval
        out.append({"step": step, "loss": 1.0, "tokens": 100 * step, "tokens_per_s": rates[end], "max_memory_gib": 1})
    return out


def test_throughput_is_the_harmonic_mean_after_the_skipped_steps(scaling):
    metrics = rows({5: 10.0, 10: 20.0, 15: 100.0, 20: 300.0}, steps=20, interval=5)
    result = scaling.throughput(metrics, gpus=2, skip=10, interval=5)
    assert result["interval_rates"] == [100.0, 300.0]  # the intervals ending at steps 15 and 20
    assert result["tokens_per_s"] == pytest.approx(150.0)  # 2 equal token counts in 1/100 + 1/300 of the time
    assert result["tokens_per_s_per_gpu"] == pytest.approx(75.0)
    assert result["timed_steps"] == [11, 20]
    assert "error" in scaling.throughput(metrics, gpus=1, skip=20, interval=5)


def test_efficiency_is_per_gpu_against_the_same_layout_on_one_gpu(scaling):
    entries = [
        {"layout": "a", "gpus": 1, "tokens_per_s_per_gpu": 100.0},
        {"layout": "a", "gpus": 8, "tokens_per_s_per_gpu": 96.0},
        {"layout": "b", "gpus": 1, "tokens_per_s_per_gpu": 50.0},
        {"layout": "b", "gpus": 2, "tokens_per_s_per_gpu": 45.0},
        {"layout": "c", "gpus": 2, "tokens_per_s_per_gpu": 45.0},  # no one-GPU run: no efficiency
        {"layout": "a", "gpus": 4, "error": "skipped"},
    ]
    scaling.add_efficiency(entries)
    assert [e.get("efficiency") for e in entries] == [1.0, 0.96, 1.0, 0.9, None, None]


def test_compare_losses(scaling):
    a = [{"step": s, "loss": 2.0} for s in range(1, 5)]
    b = [{"step": s, "loss": 2.0 + (0.02 if s == 3 else 0.0)} for s in range(1, 6)]
    result = scaling.compare_losses(a, b)
    assert result["steps"] == [1, 4] and result["max_at_step"] == 3
    assert result["max_rel_gap"] == pytest.approx(0.02 / 2.02)
    assert result["mean_rel_gap"] == pytest.approx(0.02 / 2.02 / 4)
    assert scaling.compare_losses(a, b, after=3)["max_rel_gap"] == 0.0


def test_runs_go_in_order_of_importance(scaling):
    """llamita on 1 GPU, then the most GPUs down, then the peer the same way: a deadline cuts the least needed."""
    order = scaling.run_order([1, 2, 4, 8], ["fsdp2-reshard-false", "replicate", "litgpt-fsdp"])
    assert order[:4] == [(1, "fsdp2-reshard-false"), (1, "replicate"), (8, "fsdp2-reshard-false"), (8, "replicate")]
    assert order[-4:] == [(1, "litgpt-fsdp"), (8, "litgpt-fsdp"), (4, "litgpt-fsdp"), (2, "litgpt-fsdp")]


def test_tables_say_what_was_not_measured(scaling):
    results = {
        "meta": {"device": "8 x H200", "preset": "tinyllama-1.1b", "seq_len": 2048, "tokens_per_gpu": 16384},
        "throughput": [
            {
                "layout": "fsdp2-reshard-false",
                "gpus": 1,
                "global_batch_tokens": 16384,
                "tokens_per_s": 70e3,
                "tokens_per_s_per_gpu": 70e3,
                "interval_rates": [69e3, 71e3],
                "mfu": 0.5,
                "peak_gib": 35.7,
            },
            {
                "layout": "fsdp2-reshard-false",
                "gpus": 8,
                "global_batch_tokens": 131072,
                "tokens_per_s": 536e3,
                "tokens_per_s_per_gpu": 67e3,
                "interval_rates": [66e3, 68e3],
                "mfu": 0.48,
                "peak_gib": 30.1,
            },
            {"layout": "replicate", "gpus": 8, "error": "skipped: 20 s left of --deadline"},
            {"layout": "litgpt-fsdp", "gpus": None, "error": "not run: litgpt or lightning does not import"},
        ],
        "curve": {"gpus": 8, "batch_sequences": 8, "steps": 200, "error": "8 GPU: exit 1"},
        "resume": [{"saved_on": 8, "resumed_on": 1, "step": 100, "error": "not run: the uninterrupted runs failed"}],
        "runs": {"replicate 8 GPU": {"gpus": 8, "status": "skipped: 20 s left of --deadline", "wall_s": 0.0}},
    }
    scaling.add_efficiency(results["throughput"])
    text = scaling.tables(results)
    assert "| fsdp2-reshard-false | 8 | 131,072 | 536,000 | 67,000 | 95.7% | 48.0% | 30.1 | 66,000-68,000 |" in text
    assert "| replicate | 8 | | skipped: 20 s left of --deadline |" in text
    assert "not run: litgpt or lightning does not import" in text
    assert "Efficiency on 8 GPUs (goal: >= 95% on 8 GPUs): fsdp2-reshard-false 95.7%." in text
    assert "not measured: 8 GPU: exit 1" in text and "| 8 | 1 | 100 | not run: the uninterrupted runs failed |" in text


@pytest.mark.slow
def test_smoke_runs_end_to_end(prepared, tmp_path):
    """The script on CPU: three layouts on 1 and 2 processes, the loss curves and both resume directions."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("tokenizer", "prose", "code"):
        (data / name).symlink_to(prepared[name])
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "scaling.py"), "--smoke", "--loss-curve", "--resume-check"]
    cmd += ["--data", str(data), "--out", str(out), "--workdir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| resume 1->2 GPU | 2 |")  # the tables come last

    results = json.loads((out / "scaling.json").read_text())
    measured = {(e["layout"], e["gpus"]): e for e in results["throughput"] if "tokens_per_s" in e}
    for layout in ("fsdp2-reshard-false", "fsdp2-reshard-true", "replicate"):
        assert measured[(layout, 1)]["efficiency"] == 1.0
        assert measured[(layout, 2)]["tokens_per_s_per_gpu"] > 0 and "efficiency" in measured[(layout, 2)]
    assert measured[("replicate", 1)]["same_as"] == "fsdp2-reshard-false 1 GPU"
    litgpt = [e for e in results["throughput"] if e["layout"] == "litgpt-fsdp"]
    assert litgpt and all("tokens_per_s" in e or e["error"].startswith("not run") for e in litgpt)

    curve = results["curve"]
    assert curve["steps"] == [1, 8] and curve["max_rel_gap"] < 1e-5  # fp32 on CPU: equal up to rounding
    assert [(c["saved_on"], c["resumed_on"], c["resumed_at_step"]) for c in results["resume"]] == [(2, 1, 4), (1, 2, 4)]
    for check in results["resume"]:
        assert check["vs_saving_count"]["steps"] == [5, 8]
        assert check["vs_saving_count"]["max_rel_gap"] < 1e-5 and check["vs_resuming_count"]["max_rel_gap"] < 1e-5
    for name, run in results["runs"].items():
        assert run["multicast_off"]["all"] and run["multicast_off"]["processes"] >= run["gpus"], name
    assert not any(p.name.startswith("llamita-scaling-") for p in tmp_path.iterdir())  # run folders deleted
