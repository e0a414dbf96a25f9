"""`llamita evaluate` with --tasks, --text and --compare on a Hugging Face directory; its user errors."""

from __future__ import annotations

import gzip
import json

import pytest

from llamita.cli import main


def _run_tasks(eval_model, eval_data, out, *extra):
    data = [f"{t}={eval_data['native'][t]}" for t in ("hellaswag", "winogrande", "mmlu")]
    args = ["evaluate", "--checkpoint", str(eval_model["hf_dir"]), "--tasks", "hellaswag,winogrande,mmlu"]
    main([*args, "--data", *data, "--device", "cpu", "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_tasks_write_json_and_markdown_and_compare(eval_model, eval_data, tmp_path, capsys):
    zero = _run_tasks(eval_model, eval_data, tmp_path / "zero.json")
    two = _run_tasks(eval_model, eval_data, tmp_path / "two.json", "--num-fewshot", "2", "--batch-size", "7")
    printed = capsys.readouterr().out
    assert "| Model | HellaSwag | Obqa | WinoGrande | ARC_c | ARC_e | boolq | piqa | avg |" in printed
    assert "| hellaswag | acc_norm |" in printed and "| - anatomy | acc |" in printed
    assert zero["num_fewshot"] == 0 and two["num_fewshot"] == 2 and two["batch_size"] == 7
    assert zero["checkpoint"] == str(eval_model["hf_dir"]) and zero["dtype"] == "float32"
    assert set(zero["results"]) == {"hellaswag", "winogrande", "mmlu", "mmlu_anatomy", "mmlu_high_school_physics"}
    assert zero["average"]["metrics"] == {"hellaswag": "acc_norm", "winogrande": "acc"}
    assert not zero["average"]["complete"]
    assert (tmp_path / "zero.md").read_text().startswith("| Model |")

    main(["evaluate", "--compare", str(tmp_path / "zero.json"), str(tmp_path / "two.json")])
    table = capsys.readouterr().out
    assert table.startswith("| Task | Metric | zero | two | Δ |")
    hellaswag = next(line for line in table.splitlines() if line.startswith("| hellaswag | acc_norm |"))
    cells = [c.strip() for c in hellaswag.strip("|").split("|")]
    assert float(cells[2]) == pytest.approx(100 * zero["results"]["hellaswag"]["acc_norm"], abs=0.01)
    assert table.rstrip().splitlines()[-1].startswith("| avg (TinyLlama) |")


def test_text_perplexity(eval_model, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("the river flows to the sea. " * 20, encoding="utf-8")
    main(["evaluate", "--checkpoint", str(eval_model["hf_dir"]), "--text", str(text), "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert result["text_bytes"] == len(text.read_bytes()) and 0 < result["text_bits_per_byte"] < 20


def test_text_perplexity_of_a_directory_and_a_glob(eval_model, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("the river flows to the sea. " * 10, encoding="utf-8")
    (docs / "b.txt.gz").write_bytes(gzip.compress(("a small boat on the lake. " * 10).encode()))
    (docs / "notes.json").write_text("{}")
    n_bytes = len((docs / "a.txt").read_bytes()) + len(gzip.decompress((docs / "b.txt.gz").read_bytes()))
    base = ["evaluate", "--checkpoint", str(eval_model["hf_dir"]), "--device", "cpu", "--text"]

    main([*base, str(docs)])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["text_documents"] == 2 and result["text_bytes"] == n_bytes
    notes = str(docs.resolve() / "notes.json")
    assert result["text_skipped"] == {"unsupported_type": {"count": 1, "examples": [notes]}}
    assert "llamita evaluate: skipped 1 path(s)" in captured.err and "notes.json" in captured.err

    main([*base, str(docs / "*.txt*")])
    globbed = json.loads(capsys.readouterr().out)
    assert globbed["text_loss"] == pytest.approx(result["text_loss"]) and "text_skipped" not in globbed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "hellaswag,squad"], "unknown task(s) squad"),
        (["--tasks", "piqa", "--data", "piqa=/nonexistent/piqa"], "valid.jsonl"),
        (["--tasks", "piqa", "--data", "boolq=/x"], "--data given for boolq"),
    ],
)
def test_user_errors_are_one_line(args, message, eval_model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(eval_model["hf_dir"]), "--device", "cpu", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_checkpoint_is_required_without_compare(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--tasks", "piqa"])
    assert "--checkpoint is required" in capsys.readouterr().err


def test_val_loss_without_validation_shards_is_a_clear_error(eval_model, tmp_path, capsys):
    from llamita.data.prepare import prepare_source
    from llamita.interop import import_hf

    imported = tmp_path / "imported"
    import_hf(eval_model["hf_dir"], imported)  # a run that names no data sources
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(imported)])
    assert exit_info.value.code == 2
    assert "the run names no data sources" in capsys.readouterr().err

    docs = tmp_path / "docs.txt"
    docs.write_text("a document that lands in the train split only\n")
    no_val = tmp_path / "no_val"
    prepare_source("x", [str(docs)], eval_model["hf_dir"], no_val, val_fraction=0.0, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(imported), "--data", str(no_val), "--seq-len", "16"])
    assert exit_info.value.code == 2
    assert f"no val shards in {no_val}" in capsys.readouterr().err
