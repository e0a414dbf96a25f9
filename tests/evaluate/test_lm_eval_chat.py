"""The lm-eval adapter with chat templates: ``--apply_chat_template`` (with ``--system_instruction`` and
``--fewshot_as_multiturn``) renders requests with the model's own template exactly as lm-eval's HF backend does."""

from __future__ import annotations

import shutil

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
