"""The lm-eval adapter: lm-eval's own run with ``--model llamita`` equals its run with ``--model hf``."""

from __future__ import annotations

import pytest
from eval_fixture_data import one_thread

TOL = 1e-4


@pytest.fixture(scope="module")
def adapter_run(task_manager, eval_model):
    import lm_eval

    import llamita.evaluate.lm_eval_adapter  # noqa: F401  (registers "llamita")

    with one_thread():
        return lm_eval.simple_evaluate(
            model="llamita",
            model_args=f"checkpoint={eval_model['hf_dir']},device=cpu",
            tasks=["fx_hellaswag", "fx_winogrande", "fx_mmlu"],
            num_fewshot=2,
            task_manager=task_manager,
            log_samples=True,
            batch_size=3,
        )


@pytest.mark.parametrize("task", ["fx_hellaswag", "fx_winogrande", "fx_mmlu_anatomy", "fx_mmlu_high_school_physics"])
def test_adapter_run_equals_hf_backend(task, adapter_run, lm_eval_hf_runs):
    reference = lm_eval_hf_runs[2]
    theirs = {s["doc_id"]: s for s in reference["samples"][task]}
    for sample in adapter_run["samples"][task]:
        ref = theirs[sample["doc_id"]]
        assert sample["arguments"] == ref["arguments"]
        for (ours, ours_greedy), (hf, hf_greedy) in zip([r[0] for r in sample["resps"]], [r[0] for r in ref["resps"]]):
            assert ours == pytest.approx(hf, abs=TOL) and ours_greedy == hf_greedy
    for metric, value in reference["results"][task].items():
        if metric.startswith("acc"):
            assert adapter_run["results"][task][metric] == pytest.approx(value, abs=1e-12)
    assert adapter_run["results"]["fx_mmlu"]["acc,none"] == reference["results"]["fx_mmlu"]["acc,none"]


@pytest.fixture(scope="module")
def both_models(hf_env, eval_model):
    from lm_eval.models.huggingface import HFLM

    from llamita.evaluate.lm_eval_adapter import LlamitaLM

    hf = HFLM(pretrained=str(eval_model["hf_dir"]), dtype="float32", device="cpu", batch_size=2)
    return hf, LlamitaLM(checkpoint=str(eval_model["hf_dir"]), device="cpu", batch_size=2)


def test_loglikelihood_rolling_equals_hf_backend(both_models):
    from lm_eval.api.instance import Instance

    hf, ours = both_models
    texts = ["the river flows to the sea. " * 40, "a bird", "keep the bread in a sealed bag"]
    requests = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts]
    for a, b in zip(ours.loglikelihood_rolling(requests, disable_tqdm=True), hf.loglikelihood_rolling(requests)):
        assert a == pytest.approx(b, abs=TOL)


def test_generate_until_equals_hf_backend(both_models):
    from lm_eval.api.instance import Instance

    hf, ours = both_models
    requests = [
        Instance("generate_until", {}, ("Question: which river\nAnswer:", {"until": ["\n"], "max_gen_toks": 12}), 0),
        Instance(
            "generate_until",
            {},
            ("the woman in the kitchen", {"until": ["."], "do_sample": False, "max_gen_toks": 40}),
            0,
        ),
    ]
    assert ours.generate_until(requests, disable_tqdm=True) == hf.generate_until(requests)
