"""The lm-eval adapter with chat templates: ``--apply_chat_template`` (with ``--system_instruction`` and
``--fewshot_as_multiturn``) renders requests with the model's own template exactly as lm-eval's HF backend does,
and lm-eval's IFEval runs through ``llamita-lm-eval`` offline when its data is on disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixture_data import one_thread

TOL = 1e-4


@pytest.fixture(scope="module")
def chat_model_dir(eval_model, tmp_path_factory):
    """The evaluation model exported with TinyLlama-Chat's (zephyr) template in its tokenizer_config.json."""
    from llamita.chat.templates import ZEPHYR
    from llamita.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("chat_model") / "hf"
    shutil.copytree(eval_model["hf_dir"], out)
    tokenizer = Tokenizer.load(out)
    tokenizer.chat_template = ZEPHYR
    tokenizer.save(out)
    return out


def test_the_chat_template_renders_as_the_hf_backend(hf_env, chat_model_dir, eval_model):
    from lm_eval.models.huggingface import HFLM

    from llamita.evaluate.lm_eval_adapter import LlamitaLM

    hf = HFLM(pretrained=str(chat_model_dir), dtype="float32", device="cpu", batch_size=2)
    ours = LlamitaLM(checkpoint=str(chat_model_dir), device="cpu", batch_size=2)
    assert ours.chat_template(True) == hf.chat_template(True) and ours.chat_template(False) is None
    histories = [
        [{"role": "user", "content": "which river?"}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "the woman"},
         {"role": "assistant", "content": "in the kitchen"}, {"role": "user", "content": "and then?"}],
        [{"role": "user", "content": "the bird"}, {"role": "assistant", "content": "flew over the "}],
    ]  # fmt: skip
    for history in histories:
        assert ours.apply_chat_template(history) == hf.apply_chat_template(history)
    assert ours.apply_chat_template(histories[2], False) == hf.apply_chat_template(histories[2], False)
    with pytest.raises(ValueError, match="has no chat_template"):
        LlamitaLM(checkpoint=str(eval_model["hf_dir"]), device="cpu").chat_template(True)


def test_a_chat_templated_multiturn_run_equals_the_hf_backends(hf_env, chat_model_dir, task_manager):
    import lm_eval

    import llamita.evaluate.lm_eval_adapter  # noqa: F401  (registers "llamita")

    def run(model: str, args: str) -> dict:
        with one_thread():
            return lm_eval.simple_evaluate(
                model=model,
                model_args=args,
                device="cpu",
                tasks=["fx_hellaswag"],
                num_fewshot=2,
                limit=6,
                apply_chat_template=True,
                system_instruction="Complete the sentence.",
                fewshot_as_multiturn=True,
                task_manager=task_manager,
                log_samples=True,
                batch_size=3,
            )

    ours = run("llamita", f"checkpoint={chat_model_dir}")
    theirs = run("hf", f"pretrained={chat_model_dir},dtype=float32")
    reference = {s["doc_id"]: s for s in theirs["samples"]["fx_hellaswag"]}
    for sample in ours["samples"]["fx_hellaswag"]:
        ref = reference[sample["doc_id"]]
        assert sample["arguments"] == ref["arguments"]
        context = sample["arguments"][0][0]  # (context, continuation) per choice
        assert context.startswith("<|system|>\nComplete the sentence.</s>") and context.endswith("<|assistant|>\n")
        for (a, _), (b, _) in zip([r[0] for r in sample["resps"]], [r[0] for r in ref["resps"]]):
            assert a == pytest.approx(b, abs=TOL)


# IFEval's own schema: the instructions below are scored without NLTK data (only `number_sentences` and
# `capital_word_frequency` need `punkt_tab`); the last prompt has two, so instruction- and prompt-level accuracy differ.
IFEVAL_DOCS = [
    {"key": 1000, "prompt": "Write a short note about the river. Do not use any commas in your response.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 1001, "prompt": "Describe a kitchen. Your entire response should be in English, and in all lowercase "
     "letters. No capital letters are allowed.", "instruction_id_list": ["change_case:english_lowercase"],
     "kwargs": [{}]},
    {"key": 1002, "prompt": "Write about the valley in spring. Include the keywords river and snow in the response.",
     "instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": ["river", "snow"]}]},
    {"key": 1003, "prompt": "Which bird builds a nest in a tree? Answer with less than 40 words and without commas.",
     "instruction_id_list": ["length_constraints:number_words", "punctuation:no_comma"],
     "kwargs": [{"relation": "less than", "num_words": 40}, {}]},
]  # fmt: skip


def _closed_port() -> socket.socket:
    """A bound but not listening local socket: connections to its port are refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def test_ifeval_runs_offline_through_the_cli_with_the_chat_template(chat_model_dir, tmp_path):
    """`llamita-lm-eval run --tasks <ifeval on a local file> --apply_chat_template` on a machine without network:
    lm-eval's own IFEval task (its prompts, generation settings, checker and metrics) with only the data source
    changed, NLTK_DATA empty, and every HTTP(S) connection refused, so that the checker's import-time
    `nltk.download("punkt_tab")` fails at once instead of waiting on a network that is not there."""
    import lm_eval
    import transformers

    data = tmp_path / "ifeval.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in IFEVAL_DOCS), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    ifeval_yaml = Path(lm_eval.__file__).parent / "tasks" / "ifeval" / "ifeval.yaml"
    (tasks / "local_ifeval.yaml").write_text(
        f"include: {ifeval_yaml}\ntask: local_ifeval\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{train: {data}}}}}\n",  # the README's YAML
        encoding="utf-8",
    )
    nltk_data, out = tmp_path / "nltk_data", tmp_path / "out"
    nltk_data.mkdir()
    refused = _closed_port()
    proxy = f"http://127.0.0.1:{refused.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), NLTK_DATA=str(nltk_data),
        http_proxy=proxy, https_proxy=proxy, HTTP_PROXY=proxy, HTTPS_PROXY=proxy, OMP_NUM_THREADS="1",
    )  # fmt: skip
    system = "Follow the instructions."
    cli = Path(sys.executable).parent / "llamita-lm-eval"
    args = ["run", "--model", "llamita", "--model_args", f"checkpoint={chat_model_dir}", "--device", "cpu"]
    args += ["--tasks", "local_ifeval", "--include_path", str(tasks), "--apply_chat_template"]
    args += ["--system_instruction", system, "--limit", "4", "--batch_size", "4", "--gen_kwargs", "max_gen_toks=24"]
    args += ["--output_path", str(out), "--log_samples"]
    with refused:
        proc = subprocess.run([str(cli), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (nltk_data / "tokenizers").exists()  # nothing was fetched

    (results_file,) = out.glob("*/results_*.json")
    results = json.loads(results_file.read_text())
    metrics = results["results"]["local_ifeval"]
    assert results["n-samples"]["local_ifeval"] == {"original": 4, "effective": 4}
    (samples_file,) = out.glob("*/samples_local_ifeval_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["doc"]["key"] for s in samples] == [doc["key"] for doc in IFEVAL_DOCS]

    # Every prompt rendered with the checkpoint's own template, as transformers renders it.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(chat_model_dir)
    for sample in samples:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": sample["doc"]["prompt"]}]
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = sample["arguments"]["gen_args_0"]["arg_0"]
        assert prompt == expected and prompt.startswith("<|system|>\n") and prompt.endswith("<|assistant|>\n")
        assert sample["arguments"]["gen_args_0"]["arg_1"]["max_gen_toks"] == 24

    # IFEval's rules for these instructions, written out, against the checker's per-sample verdicts.
    responses = [s["resps"][0][0] for s in samples]
    assert all(r.strip() for r in responses), responses  # an empty response fails every instruction
    rules = [
        ["," not in responses[0]],
        [False if not responses[1].islower() else None],  # and English to langdetect: then the checker's verdict
        [all(re.search(k, responses[2], re.IGNORECASE) for k in ("river", "snow"))],
        [len(re.findall(r"\w+", responses[3])) < 40, "," not in responses[3]],
    ]
    for sample, rule in zip(samples, rules, strict=True):
        strict = sample["inst_level_strict_acc"]
        assert len(strict) == len(rule) and sample["prompt_level_strict_acc"] == all(strict)
        assert all(r is None or s == r for s, r in zip(strict, rule, strict=True)), (strict, rule)
        assert all(a <= b for a, b in zip(strict, sample["inst_level_loose_acc"], strict=True))

    # The four metrics: prompt level = mean over prompts, instruction level = mean over all instructions.
    for kind in ("strict", "loose"):
        prompt_level = [s[f"prompt_level_{kind}_acc"] for s in samples]
        inst_level = [v for s in samples for v in s[f"inst_level_{kind}_acc"]]
        assert metrics[f"prompt_level_{kind}_acc,none"] == pytest.approx(sum(prompt_level) / len(prompt_level))
        assert metrics[f"inst_level_{kind}_acc,none"] == pytest.approx(sum(inst_level) / len(inst_level))
