"""A small world for evaluation tests: a tokenizer and tiny Llama, its Hugging Face export, every task's data
(see `eval_fixture_data`), and lm-evaluation-harness's own results on it."""

from __future__ import annotations

import os

import pytest
import torch
from eval_fixture_data import PASSAGE, one_thread, write_hf_jsonl, write_lm_eval_yamls, write_native


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


_WORDS = (
    "the a woman man kitchen knife onions dog song river sea spring snow farmers valley soil bird nest tree bread "
    "question answer which energy sun rock water ice plants book because already read keep fresh sealed bag "
    "option above none right part anatomy physics school high following multiple choice"
).split()


@pytest.fixture(scope="session")
def hf_env(tmp_path_factory):
    """lm-eval and `datasets` offline, with their caches in a temporary directory."""
    cache = tmp_path_factory.mktemp("hf_cache")
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE", "HF_HOME")}
    os.environ.update(
        HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cache / "datasets"), HF_HOME=str(cache)
    )
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _train_briefly(model: torch.nn.Module, ids: list[int], steps: int = 40, seq: int = 64) -> None:
    """A few optimizer steps, so that choices get clearly different log-likelihoods (a random model's are all
    about -log(vocab) per token, which makes near-ties common)."""
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(len(data) - seq - 1, (8,), generator=gen)
        batch = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])  # [8, seq + 1]
        logits = model(batch[:, :-1])  # [8, seq, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="session")
def eval_model(tmp_path_factory):
    """{"tokenizer", "model", "hf_dir"}: a 600-token BPE, a tiny random Llama, and its transformers export."""
    import transformers

    from llamita.model import Llama, ModelConfig
    from llamita.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("eval_model")
    rng = torch.Generator().manual_seed(0)
    corpus = root / "corpus.txt"
    lines = [" ".join(_WORDS[int(j)] for j in torch.randint(len(_WORDS), (12,), generator=rng)) for _ in range(400)]
    corpus.write_text(".\n".join(lines) + PASSAGE, encoding="utf-8")
    tokenizer = train_tokenizer([corpus], 600, root / "tokenizer")
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=172,
        max_seq_len=192,
    )
    torch.manual_seed(0)
    model = Llama(config)
    with one_thread():
        _train_briefly(model, tokenizer.encode(corpus.read_text(encoding="utf-8")))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_config_dict()))
    hf.load_state_dict(model.state_dict(), strict=True)
    hf_dir = root / "hf"
    hf.save_pretrained(hf_dir)
    tokenizer.save(hf_dir)
    return {"tokenizer": tokenizer, "model": model, "hf_dir": hf_dir}


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory):
    """{"native": task -> dir, "hf": task -> split -> jsonl, "yamls": dir of fx_* lm-eval tasks, "tasks": names}."""
    root = tmp_path_factory.mktemp("eval_data")
    hf = write_hf_jsonl(root / "hf")
    return {
        "native": write_native(root / "native"),
        "hf": hf,
        "yamls": root / "yamls",
        "tasks": write_lm_eval_yamls(root / "yamls", hf),
    }


@pytest.fixture(scope="session")
def task_manager(hf_env, eval_data):
    """lm-eval's TaskManager over the fx_* tasks only (indexing all of lm-eval's tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(eval_data["yamls"]), include_defaults=False)


@pytest.fixture(scope="session")
def lm_eval_hf_runs(task_manager, eval_model, eval_data):
    """lm-eval's own results with its HF backend on the exported model: {num_fewshot: simple_evaluate output}."""
    import lm_eval

    runs = {}
    for shots in (0, 2):
        with one_thread():
            runs[shots] = lm_eval.simple_evaluate(
                model="hf",
                model_args=f"pretrained={eval_model['hf_dir']},dtype=float32",
                tasks=eval_data["tasks"],
                num_fewshot=shots,
                task_manager=task_manager,
                log_samples=True,
                device="cpu",
                batch_size=4,
            )
    return runs
