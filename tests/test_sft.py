"""`llamita sft` end to end on CPU: the pretraining trainer with packed chat rows, exact resume mid-epoch, LoRA,
and a chat model whose HF export answers in transformers as `llamita chat` does."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from llamita.cli import main
from llamita.config import load_config
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics
from pretrain_runs import finish, torchrun


@pytest.fixture(scope="module")
def base_run(debug_config, tmp_path_factory):
    """A short pretraining run of the debug preset to fine-tune."""
    from llamita.pretrain import pretrain

    cfg = debug_config(tmp_path_factory.mktemp("sft_base") / "run", **{"train.max_steps": "6", "eval.interval": "0"})
    pretrain(cfg)
    return cfg.out_dir


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with path.open("w") as f:
        for i in range(60):
            messages = [
                {"role": "user", "content": f"what is {i} plus one?"},
                {"role": "assistant", "content": f"{i} plus one is {i + 1}."},
            ]
            if i % 2:
                messages += [{"role": "user", "content": "and twice that?"},
                             {"role": "assistant", "content": f"twice is {2 * (i + 1)}."}]  # fmt: skip
            f.write(json.dumps({"messages": messages}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")  # rejected
        f.write("{not json\n")  # rejected
    return path


def _cfg(out, base_run, chat_file, **overrides):
    values = {"out_dir": str(out), "init.from": base_run, "sft.data": f"['{chat_file}']", **overrides}
    return load_config("sft-debug", values)


def test_sft_trains_on_assistant_tokens_reports_rejects_and_resumes_exactly(base_run, chat_file, tmp_path, capsys):
    from llamita.sft import sft

    cfg = _cfg(tmp_path / "full", base_run, chat_file)
    result = sft(cfg)
    printed = capsys.readouterr().out
    assert "2 record(s) rejected" in printed and "packing efficiency" in printed
    rows = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    assert result["step"] == rows[-1]["step"] > 4 and result["val_loss"] < 10
    losses = {r["step"]: r["loss"] for r in rows}
    assert losses[max(losses)] < losses[1]
    tok = json.loads((tmp_path / "full" / "tokenizer" / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in tok["chat_template"]
    # Interrupted after step 4 (its checkpoint kept, the later ones gone): the resumed run's steps equal the
    # uninterrupted run's.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed)
    for folder in ckpt.list_checkpoints(resumed):
        if folder.name != "step_00000004":
            shutil.rmtree(folder)
    sft(_cfg(resumed, base_run, chat_file))
    again = {r["step"]: r["loss"] for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r}
    assert again == losses


def test_sft_with_lora_trains_only_the_adapters(base_run, chat_file, tmp_path):
    from llamita.sft import sft
    from llamita.train.checkpoint import read_state

    base = {k: v.clone() for k, v in _weights(base_run).items()}
    sft(_cfg(tmp_path / "lora", base_run, chat_file, **{"lora.rank": "4", "train.max_steps": "3"}))
    tuned = _weights(tmp_path / "lora")
    assert any("lora_A" in k for k in tuned)
    for name, weight in base.items():
        torch.testing.assert_close(tuned[name], weight, rtol=0, atol=0)  # the base never moves
    assert read_state(ckpt.resolve_checkpoint(tmp_path / "lora"))["step"] == 3


def _weights(run) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    folder = ckpt.resolve_checkpoint(run)
    meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    names = [k.removeprefix("model.") for k in meta if k.startswith("model.")]
    out = {n: torch.empty(meta[f"model.{n}"].size, dtype=meta[f"model.{n}"].properties.dtype) for n in names}
    dcp.load({"model": out}, checkpoint_id=folder)
    return out


def test_sft_errors_are_one_line(base_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--config", "sft-debug", "--out_dir", str(tmp_path / "x"), "--init.from", base_run])
    assert e.value.code == 2 and "sft.data is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sft", "--config", "sft-debug", "--sft.data", "[x.jsonl]"])
    assert e.value.code == 2 and "init.from is empty" in capsys.readouterr().err


def test_a_chat_model_answers_in_transformers_as_llamita_chat(base_run, chat_file, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from llamita.interop import export_hf

    out = tmp_path / "chat"
    main(["sft", "--config", "sft-debug", "--out_dir", str(out), "--init.from", base_run,
          "--sft.data", f"['{chat_file}']", "--train.max_steps", "8"])  # fmt: skip
    capsys.readouterr()
    question = "what is 7 plus one?"
    main(["chat", "--checkpoint", str(out), "--prompt", question, "--greedy", "--max-new-tokens", "12"])
    ours = capsys.readouterr().out.rstrip("\n")
    hf_dir = export_hf(out, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
    gen = model.generate(**prompt, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id)
    reply = tok.decode(gen[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert ours == reply
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eos_token_id  # zephyr ends a turn with </s>
    gguf = pytest.importorskip("gguf")
    from llamita.interop import export_gguf

    reader = gguf.GGUFReader(export_gguf(out, tmp_path / "chat.gguf"))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == tok.chat_template


def test_a_lora_run_exports_merged_and_as_a_peft_adapter(base_run, chat_file, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from llamita.interop import export_hf
    from llamita.pretrained import load_pretrained
    from llamita.sft import sft

    run = tmp_path / "lora"
    sft(_cfg(run, base_run, chat_file, **{"lora.rank": "4", "train.max_steps": "4", "optim.lr": "1e-2"}))
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    ours = load_pretrained(run).model(ids)  # adapters merged in
    base = load_pretrained(base_run).model(ids)
    assert (ours - base).abs().max() > 1e-3  # the adapters changed the model
    merged = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "merged"))
    torch.testing.assert_close(merged(ids).logits, ours, rtol=1e-4, atol=1e-4)
    main(["export", "hf", "--checkpoint", str(run), "--out", str(tmp_path / "adapter"), "--adapter"])
    on_base = transformers.AutoModelForCausalLM.from_pretrained(export_hf(base_run, tmp_path / "base"))
    with_adapter = peft.PeftModel.from_pretrained(on_base, tmp_path / "adapter")
    torch.testing.assert_close(with_adapter(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_sft_from_a_hugging_face_directory_and_the_terminal_chat(base_run, chat_file, tmp_path):
    import io

    from llamita.inference import LLM, SamplingParams
    from llamita.inference.chat import ChatSession, run_terminal
    from llamita.interop import export_hf
    from llamita.sft import sft

    hf_dir = export_hf(base_run, tmp_path / "base-hf")
    result = sft(_cfg(tmp_path / "from-hf", str(hf_dir), chat_file, **{"train.max_steps": "3"}))
    assert result["step"] == 3
    session = ChatSession(LLM(tmp_path / "from-hf", max_batch=1), SamplingParams(temperature=0.0, max_tokens=5))
    stdin = io.StringIO("/system be brief\nwhat is 3 plus one?\nand twice that?\n/reset\n/quit\n")
    stdout = io.StringIO()
    run_terminal(session, stdin, stdout)
    shown = stdout.getvalue()
    assert shown.count("assistant> ") == 2 and "(system message set; conversation cleared)" in shown
    assert "(conversation cleared)" in shown and session.messages == []
    # The second question was asked with the first exchange and the system message before it.
    session.system = "be brief"
    answer = "".join(session.reply("what is 3 plus one?"))
    assert session.messages == [
        {"role": "user", "content": "what is 3 plus one?"},
        {"role": "assistant", "content": answer},
    ]


# ------------------------------------------------------------------------------------- 2 gloo processes on CPU
def test_two_ranks_score_every_held_out_row_once_and_give_one_ranks_validation(base_run, chat_file, tmp_path, capsys):
    """FSDP2 over 2 gloo ranks with an odd number of held-out rows, one a batch: rank 0 scores one row more, rank 1
    runs a padding batch in its place, and the validation losses before and after a step are one process's."""
    from llamita.sft import sft

    short = {"sft.packing": "false", "train.max_steps": "1", "eval.interval": "1", "eval.batch_size": "1",
             "eval.batches": "100", "checkpoint.interval": "0", "train.threads": "1"}  # fmt: skip
    sft(_cfg(tmp_path / "one", base_run, chat_file, **short))
    held_out = int(re.search(r"(\d+) held out", capsys.readouterr().out).group(1))  # a row each, unpacked
    assert held_out % 2 == 1
    script = tmp_path / "driver.py"
    script.write_text("import sys\nfrom llamita.config import load_config\nfrom llamita.sft import sft\n"
                      "sft(load_config(sys.argv[1]))\n")  # fmt: skip
    finish(torchrun(_cfg(tmp_path / "two", base_run, chat_file, **short), script=script))

    one, two = (
        [r for r in read_metrics(tmp_path / run / "metrics.jsonl") if "val_loss" in r] for run in ("one", "two")
    )
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1]
    assert [r["val_tokens"] for r in two] == [r["val_tokens"] for r in one]
    assert [r["val_loss"] for r in two] == pytest.approx([r["val_loss"] for r in one], abs=1e-5)
