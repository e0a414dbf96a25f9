"""llamita's task evaluation against lm-evaluation-harness's own run (HF backend) on the same documents.

Per document: the same requests (contexts with few-shot examples, continuations), log-likelihoods within 1e-4,
the same acc / acc_norm; per task: the same values and standard errors; MMLU's group aggregate too.
"""

from __future__ import annotations

import pytest

from llamita.evaluate.harness import evaluate_tasks
from llamita.evaluate.tasks import SUITE

TOL = 1e-4


@pytest.fixture(scope="module")
def llamita_runs(eval_model, eval_data):
    """evaluate_tasks on the published-format files, 0 and 2 shots, with samples."""
    tasks = {name: eval_data["native"][name] for name in SUITE}
    return {
        shots: evaluate_tasks(
            eval_model["model"], eval_model["tokenizer"], tasks, batch_size=5, num_fewshot=shots, log_samples=True
        )
        for shots in (0, 2)
    }


def _lm_eval_samples(run: dict, task: str) -> dict[int, dict]:
    return {s["doc_id"]: s for s in run["samples"][f"fx_{task}"]}


SUBTASKS = [t for t in SUITE if t != "mmlu"] + ["mmlu_anatomy", "mmlu_high_school_physics"]


@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("task", SUBTASKS)
def test_documents_match_lm_eval(task, shots, llamita_runs, lm_eval_hf_runs):
    ours = llamita_runs[shots]["samples"][task]
    theirs = _lm_eval_samples(lm_eval_hf_runs[shots], task)
    assert len(ours) == len(theirs) > 0
    for sample in ours:
        ref = theirs[sample["doc_id"]]
        assert [tuple(a) for a in sample["arguments"]] == [tuple(a) for a in ref["arguments"]]  # prompts, shots
        ref_lls = [resp[0][0] for resp in ref["resps"]]
        assert max(abs(a - b) for a, b in zip(sample["loglikelihoods"], ref_lls)) < TOL
        for metric in ("acc", "acc_norm"):
            assert sample.get(metric) == ref.get(metric), (task, sample["doc_id"], metric)


@pytest.mark.parametrize("shots", [0, 2])
def test_task_metrics_match_lm_eval(shots, llamita_runs, lm_eval_hf_runs):
    ours = llamita_runs[shots]["results"]
    theirs = lm_eval_hf_runs[shots]["results"]
    for task in [*SUBTASKS, "mmlu"]:
        ref = theirs[f"fx_{task}"]
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" not in ref:
                assert metric not in ours[task]
                continue
            assert ours[task][metric] == ref[f"{metric},none"], (task, metric)
            assert ours[task][f"{metric}_stderr"] == pytest.approx(ref[f"{metric}_stderr,none"], abs=1e-12)
        assert ours[task]["n"] == ref["sample_len"]


def test_few_shot_prompts_exclude_the_evaluated_document(llamita_runs, eval_data):
    """The validation doc that repeats a training doc never sees itself among its shots (HellaSwag's last doc)."""
    last = llamita_runs[2]["samples"]["hellaswag"][-1]
    context = last["arguments"][0][0]
    shots, question = context.rsplit("\n\n", 1)
    assert question not in shots


def test_limit_takes_the_first_documents_with_the_same_shots(eval_model, eval_data, llamita_runs):
    tasks = {"hellaswag": eval_data["native"]["hellaswag"], "mmlu": eval_data["native"]["mmlu"]}
    limited = evaluate_tasks(
        eval_model["model"], eval_model["tokenizer"], tasks, limit=2, num_fewshot=2, log_samples=True
    )
    for task in ("hellaswag", "mmlu_anatomy"):
        full = llamita_runs[2]["samples"][task][:2]
        assert [s["arguments"] for s in limited["samples"][task]] == [s["arguments"] for s in full]
    assert limited["results"]["hellaswag"]["n"] == 2 and limited["results"]["mmlu"]["n"] == 4
