"""The `llamita` command: every subcommand's help, override parsing, and the pipeline end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from llamita.cli import main, parse_overrides
from llamita.config import ConfigError

COMMANDS = ["train-tokenizer", "prepare", "pretrain", "evaluate", "generate", "demo"]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: llamita " + cmd in out
    if cmd == "pretrain":
        assert "--optim.lr" in out and "Peak learning rate" in out


def test_console_script_installed():
    exe = shutil.which("llamita") or str(__import__("pathlib").Path(sys.executable).parent / "llamita")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "pretrain" in out


def test_parse_overrides():
    assert parse_overrides(["--optim.lr", "3e-4", "--train.max_steps=5"]) == {
        "optim.lr": "3e-4",
        "train.max_steps": "5",
    }
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--optim.lr"])
    with pytest.raises(ConfigError, match="unexpected"):
        parse_overrides(["lr"])


def test_user_errors_are_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", "debug", "--optim.nope", "1"])
    assert e.value.code == 2
    assert "optim.nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "x"])
    assert "no such run directory" in capsys.readouterr().err


def test_pipeline_through_the_cli(tmp_path, capsys):
    """train-tokenizer -> prepare -> pretrain -> evaluate -> generate, each through `main`."""
    docs = tmp_path / "docs.jsonl"
    with docs.open("w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"Item {i}: the quick brown fox jumps over {i % 7} lazy dogs."}) + "\n")
    tok = tmp_path / "tok"
    main(["train-tokenizer", "--input", str(docs), "--vocab-size", "330", "--out", str(tok)])
    data = tmp_path / "data"
    main(
        [
            "prepare",
            "--name",
            "fox",
            "--input",
            str(docs),
            "--tokenizer",
            str(tok),
            "--out",
            str(data),
            "--val-fraction",
            "0.1",
            "--shard-tokens",
            "2048",
        ]
    )
    run = tmp_path / "run"
    main(
        [
            "pretrain",
            "--config",
            "debug",
            "--out_dir",
            str(run),
            "--data.tokenizer",
            str(tok),
            f"--data.sources=[{{name: fox, path: '{data}'}}]",
            "--train.max_steps",
            "6",
            "--eval.interval",
            "3",
        ]
    )
    capsys.readouterr()
    main(["evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "eval.json")])
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 6 and result["val_loss"] > 0 and result["val_tokens"] > 0
    assert json.loads((tmp_path / "eval.json").read_text())["val_loss"] == result["val_loss"]
    main(["generate", "--checkpoint", str(run), "--prompt", "Item 3:", "--max-new-tokens", "8", "--greedy"])
    assert capsys.readouterr().out.startswith("Item 3:")
