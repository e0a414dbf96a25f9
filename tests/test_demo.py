"""The embedded demo end to end at a reduced size."""

from __future__ import annotations

from llamita.demo import run_demo
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics


def test_demo_pipeline_small(tmp_path):
    out = tmp_path / "demo"
    small = {
        "model.preset": "debug",
        "data.seq_len": "64",
        "train.global_batch_tokens": "1024",
        "train.micro_batch": "8",
        "eval.interval": "10",
        "eval.batches": "4",
        "checkpoint.interval": "10",
        "log.progress": "false",
    }
    summary = run_demo(out, max_steps=20, corpus_mb=0.25, vocab_size=512, overrides=small)
    assert summary["step"] == 20
    assert summary["final_val_loss"] < summary["first_val_loss"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    assert ckpt.resolve_checkpoint(out).name == "step_00000020"
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tb").glob("events.out.tfevents.*"))
    for name in ("prose", "code"):
        assert (out / "data" / name / "manifest.json").is_file()
    # A second run finds every stage done and changes nothing.
    again = run_demo(out, max_steps=20, corpus_mb=0.25, vocab_size=512, overrides=small)
    assert again["step"] == 20
