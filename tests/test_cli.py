"""The `llamita` command: every subcommand's help, override parsing, and the pipeline end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

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


def _small_source(root):
    """A directory with one .jsonl of 20 documents and one broken line, and a .json file prepare does not read."""
    root.mkdir()
    lines = [json.dumps({"text": f"document {i}: the quick brown fox jumps over the lazy dog"}) for i in range(20)]
    (root / "a.jsonl").write_text("\n".join([*lines, "{broken"]) + "\n")
    (root / "notes.json").write_text("{}")
    return root


def test_prepare_reports_rejects_and_skipped_files_once(prepared, tmp_path):
    # A subprocess: the second copy came from logging's last-resort handler, which pytest's log capture replaces.
    src = _small_source(tmp_path / "in")
    args = ["prepare", "--name", "x", "--input", str(src), "--tokenizer", str(prepared["tokenizer"])]
    run = subprocess.run(
        [sys.executable, "-m", "llamita.cli", *args, "--out", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("1 record(s) rejected") == 1
    assert run.stderr.count("skipped 1 path(s)") == 1 and "notes.json" in run.stderr


def test_prepare_without_documents_exits_2_naming_the_reasons(prepared, tmp_path, capsys):
    src = _small_source(tmp_path / "in")
    out = tmp_path / "out"
    args = ["prepare", "--name", "x", "--input", str(src), "--tokenizer", str(prepared["tokenizer"]), "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main([*args, "--text-field", "content"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "llamita prepare: error: x: no documents to train on" in err
    assert "all 21 record(s) were rejected (invalid JSON: 1; missing field 'content': 20)" in err
    assert not (out / "manifest.json").exists()


def test_train_tokenizer_reports_skipped_files(tmp_path, capsys):
    src = _small_source(tmp_path / "in")
    main(["train-tokenizer", "--input", str(src), "--vocab-size", "330", "--out", str(tmp_path / "tok")])
    captured = capsys.readouterr()
    assert "on 1 file(s)" in captured.out
    assert "llamita train-tokenizer: skipped 1 path(s)" in captured.err and "notes.json" in captured.err


# ------------------------------------------------------------------ user errors: one line, exit 2, checked early
@pytest.fixture(scope="module")
def trained_run(debug_config, tmp_path_factory):
    """A 4-step debug run (context 64) on the shared corpus."""
    from llamita.pretrain import pretrain

    cfg = debug_config(tmp_path_factory.mktemp("cli_run") / "run", **{"train.max_steps": "4", "eval.interval": "0"})
    pretrain(cfg)
    return cfg.out_dir


def _user_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"llamita {argv[0]}: error: "), err
    return err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-k", "0"], "top_k must be >= 1"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--presence-penalty", "3"], "presence_penalty must be in [-2, 2]"),
        (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1"),
    ],
)
def test_generate_checks_sampling_before_loading_the_model(capsys, tmp_path, flags, needle):
    # The checkpoint does not exist: the sampling error comes first, so nothing was loaded.
    assert needle in _user_error(capsys, ["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x", *flags])


def test_device_errors_name_the_flag_of_the_command(capsys, trained_run):
    err = _user_error(capsys, ["generate", "--checkpoint", trained_run, "--prompt", "x", "--device", "gpu"])
    assert "--device: unknown device 'gpu'" in err
    if not torch.cuda.is_available():
        err = _user_error(capsys, ["generate", "--checkpoint", trained_run, "--prompt", "x", "--device", "cuda"])
        assert "--device: cuda requested" in err and "train.device" not in err
    err = _user_error(capsys, ["pretrain", "--config", "debug", "--train.device", "gpu"])
    assert "train.device: unknown device 'gpu'" in err


def test_generate_prints_the_decoded_prompt_and_continuation(capsys, trained_run, monkeypatch):
    from llamita.inference import LLM
    from llamita.tokenizer import Tokenizer

    tok = Tokenizer.load(f"{trained_run}/tokenizer")
    prompt, text = "def f1(y):", "def f1(y): return x0"
    prompt_ids = tok.encode(prompt, bos=True)
    continuation = tok.encode(text, bos=True)[len(prompt_ids) :]  # starts with the token "▁return"
    assert tok.decode(continuation) == "return x0"  # decoded alone, its leading space is gone
    monkeypatch.setattr(LLM, "stream", lambda *args, **kwargs: iter(continuation))
    main(["generate", "--checkpoint", trained_run, "--prompt", prompt, "--max-new-tokens", "12", "--greedy"])
    assert capsys.readouterr().out == text + "\n"


def test_generate_streams_what_the_engine_makes(capsys, trained_run):
    from llamita.inference import LLM, SamplingParams
    from llamita.inference.text import text_pieces

    main(["generate", "--checkpoint", trained_run, "--prompt", "def f1(y):", "--max-new-tokens", "12", "--greedy"])
    llm = LLM(trained_run, device="cpu")
    expected = llm.generate("def f1(y):", SamplingParams(temperature=0.0, max_tokens=12))[0]
    # A 4-step model's output: its byte tokens can make a decoding that streaming cannot show piece by piece.
    pieces = text_pieces(llm.tokenizer, expected.token_ids, prefix=expected.prompt_token_ids, show_prefix=True)
    streamed = "".join(pieces) + "\n"
    assert capsys.readouterr().out == streamed
    for flags in (["--speculate", "ngram"], ["--draft", trained_run, "--gamma", "3"]):  # greedy: the same tokens
        main(["generate", "--checkpoint", trained_run, "--prompt", "def f1(y):", "--max-new-tokens", "12", "--greedy",
              *flags])  # fmt: skip
        captured = capsys.readouterr()
        assert captured.out == streamed
        assert "speculative decoding kept" in captured.err


def test_generate_a_file_of_prompts_reports_its_bad_lines(capsys, trained_run, tmp_path):
    from llamita.inference import LLM, SamplingParams

    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "def f1(y):", "id": "a"}, "{broken", {"text": "no prompt"}, {"prompt": "x " * 80},
             {"prompt": "Document 3.", "id": "b"}]  # fmt: skip
    prompts.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    main(["generate", "--checkpoint", trained_run, "--prompts", str(prompts), "--out", str(out), "--greedy",
          "--max-new-tokens", "6"])  # fmt: skip
    err = capsys.readouterr().err
    assert "skipped 3 bad line(s): line 2: invalid JSON" in err
    assert 'line 3: not an object with a "prompt" string' in err and "line 4: the prompt is" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    llm = LLM(trained_run, device="cpu")
    expected = llm.generate(["def f1(y):", "Document 3."], SamplingParams(temperature=0.0, max_tokens=6))
    assert [r["completion"] for r in rows] == [c.text for c in expected]
    assert all(r["finish_reason"] in ("stop", "length") and 1 <= r["new_tokens"] <= 6 for r in rows)
    ahead = tmp_path / "ahead.jsonl"  # decode steps run ahead of the host: the same completions
    main(["generate", "--checkpoint", trained_run, "--prompts", str(prompts), "--out", str(ahead), "--greedy",
          "--max-new-tokens", "6", "--overlap"])  # fmt: skip
    assert ahead.read_text() == out.read_text()
    capsys.readouterr()
    prompts.write_text("{broken\n")
    err = _user_error(capsys, ["generate", "--checkpoint", trained_run, "--prompts", str(prompts)])
    assert "no line holds a JSON object" in err
    err = _user_error(capsys, ["generate", "--checkpoint", trained_run])
    assert "give --prompt TEXT" in err


def test_generate_says_when_the_context_is_full(capsys, trained_run):
    prompt = " ".join(["x"] * 40)  # most of the 64-token context
    main(["generate", "--checkpoint", trained_run, "--prompt", prompt, "--max-new-tokens", "100", "--greedy"])
    err = capsys.readouterr().err
    assert "of 100 new tokens" in err and "context of 64 tokens" in err
    long_prompt = " ".join(["x"] * 200)
    err = _user_error(capsys, ["generate", "--checkpoint", trained_run, "--prompt", long_prompt])
    assert "the model's context is 64 tokens" in err


def test_a_flipped_byte_stops_every_export(capsys, trained_run, tmp_path):
    import shutil

    from llamita.train.checkpoint import list_checkpoints

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = next(p for p in list_checkpoints(run)[-1].iterdir() if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    for fmt, out in [("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")]:
        err = _user_error(capsys, ["export", fmt, "--checkpoint", str(run), "--out", str(out)])
        assert "sha256 differs from checksums.json" in err and data.name in err
        assert not out.exists() or not any(out.iterdir())


def test_exports_refuse_to_overwrite_without_force(capsys, trained_run, tmp_path):
    pytest.importorskip("gguf")
    for fmt, out in [("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")]:
        argv = ["export", fmt, "--checkpoint", trained_run, "--out", str(out)]
        main(argv)
        capsys.readouterr()
        err = _user_error(capsys, argv)
        assert "already" in err and "--force" in err
        main([*argv, "--force"])
    argv = ["train-tokenizer", "--input", str(_small_source(tmp_path / "in")), "--vocab-size", "330"]
    main([*argv, "--out", str(tmp_path / "tok")])
    capsys.readouterr()
    assert "--force" in _user_error(capsys, [*argv, "--out", str(tmp_path / "tok")])


def test_help_shows_defaults(capsys):
    shown = {}
    for cmd in ["prepare", "train-tokenizer", "pretrain"]:
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        shown[cmd] = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.001)" in shown["prepare"] and "tokenizer processes (default: 1)" in shown["prepare"]
    assert "(default: 32000)" in shown["train-tokenizer"]
    assert "--optim.lr (float, default 0.0004)" in shown["pretrain"]
    assert '--train.device (str, default "auto")' in shown["pretrain"]


BAD_COMMANDS = [  # a command line ({...}: a path the test makes) and what its error says
    ("train-tokenizer --input {raw} --vocab-size 10 --out {tmp}/t", "vocab_size=10 is too small"),
    ("prepare --name a --input {raw} --tokenizer {tok} --out {tmp}/p --workers 0", "--workers must be >= 1"),
    ("prepare --name a --input {raw} --tokenizer {tok} --out {tmp}/p --val-fraction 1.5", "--val-fraction must be in"),
    ("prepare --name= --input {raw} --tokenizer {tok} --out {tmp}/p", "--name is empty"),
    ("pretrain --config debug --train.micro_batch 0", "train.micro_batch: must be >= 1"),
    ("pretrain --config debug --optim.lr -1", "optim.lr: must be >= 0"),
    ("pretrain --config debug --log.interval 0", "log.interval: must be >= 1"),
    ("pretrain --config debug --model.preset nope", "model.preset: unknown preset 'nope'"),
    ("evaluate --checkpoint {run} --batch-size -1", "--batch-size must be >= 0"),
    ("evaluate --checkpoint {run} --seq-len 100000", "fewer than one window"),
    ("demo --steps -1 --out {tmp}/demo", "--steps must be >= 1"),
    ("export hf --checkpoint {run} --out {tmp}/hf --max-shard-gb 0", "--max-shard-gb must be > 0"),
]


@pytest.mark.parametrize(("line", "needle"), BAD_COMMANDS)
def test_user_errors_of_every_command_are_one_line_with_exit_2(capsys, prepared, trained_run, tmp_path, line, needle):
    raw = tmp_path / "raw.txt"
    raw.write_text("some text to read\n")
    values = {"raw": str(raw), "tok": str(prepared["tokenizer"]), "run": trained_run, "tmp": str(tmp_path)}
    assert needle in _user_error(capsys, [a.format(**values) for a in line.split()])
