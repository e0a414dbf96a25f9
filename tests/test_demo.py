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
    chat = {"data.seq_len": "128", "train.global_batch_tokens": "1024", "train.micro_batch": "8",
            "train.max_steps": "6", "eval.interval": "3", "log.progress": "false"}  # fmt: skip
    dpo = {**chat, "train.max_steps": "4", "eval.interval": "2"}
    summary = run_demo(out, max_steps=20, corpus_mb=0.25, vocab_size=512, overrides=small, chat_overrides=chat,
                       dpo_overrides=dpo)  # fmt: skip
    assert summary["step"] == 20
    assert summary["chat"]["step"] == 6 and summary["chat"]["val_loss"] > 0
    preferences = summary["preferences"]
    assert preferences["step"] == 4 and 0 <= preferences["accuracy_before"] <= 1
    assert (out / "dpo" / "reference_logps.npy").is_file()
    assert (out / "chat" / "tokenizer" / "tokenizer_config.json").read_text().count("<|assistant|>") >= 1
    assert summary["final_val_loss"] < summary["first_val_loss"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    assert ckpt.resolve_checkpoint(out).name == "step_00000020"
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tb").glob("events.out.tfevents.*"))
    for name in ("prose", "code"):
        assert (out / "data" / name / "manifest.json").is_file()
    # A second run finds every stage done and changes nothing.
    again = run_demo(out, max_steps=20, corpus_mb=0.25, vocab_size=512, overrides=small, chat_overrides=chat,
                     dpo_overrides=dpo)  # fmt: skip
    assert again["step"] == 20 and again["chat"]["step"] == 6 and again["preferences"]["step"] == 4
    assert again["preferences"]["accuracy_after"] == preferences["accuracy_after"]


def test_demo_trains_in_fp32_on_cpus_without_native_bf16(tmp_path, monkeypatch, capsys):
    """The recipe asks for bf16 autocast; where the CPU would emulate bf16 the demo switches to fp32 and says so."""
    import llamita.train.parallel as parallel

    monkeypatch.setattr(parallel, "cpu_has_native_bf16", lambda: False)
    small = {
        "model.preset": "debug",
        "data.seq_len": "32",
        "train.global_batch_tokens": "256",
        "train.micro_batch": "8",
    }
    small |= {"eval.interval": "0", "checkpoint.interval": "0", "log.progress": "false"}
    run_demo(tmp_path / "demo", max_steps=2, corpus_mb=0.05, vocab_size=400, overrides=small, chat_stage=False)
    out = capsys.readouterr().out
    assert "training in fp32" in out
    model_line = next(line for line in out.splitlines() if " steps on cpu" in line)
    assert "autocast" not in model_line
    assert "dtype: fp32" in (tmp_path / "demo" / "config.yaml").read_text()
