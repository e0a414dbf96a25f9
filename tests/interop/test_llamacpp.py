"""llama.cpp itself (through llama-cpp-python) runs the GGUF export: same token ids, same greedy continuation.

llama-cpp-python compiles llama.cpp when installed (about 8 minutes on 2 cores), so it is not a test dependency;
this test runs where it is installed. `bench/llamacpp_agreement.py` records the same comparison on the demo model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamita.inference import LLM, SamplingParams
from llamita.interop import export_gguf
from llamita.pretrained import load_pretrained

llama_cpp = pytest.importorskip("llama_cpp")

PROMPT = "def f3(y):\n    x0 ="
N_NEW = 32


def llama_cpp_model(path: Path, n_ctx: int) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False, seed=0)


def llama_cpp_greedy(model: llama_cpp.Llama, prompt_ids: list[int], n: int, eos_id: int) -> list[int]:
    out: list[int] = []
    for token in model.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if token == eos_id or len(out) == n:
            break
    return out


def teacher_forced_agreement(model: llama_cpp.Llama, ids: list[int], n_prompt: int) -> int:
    """How many of the positions after the prompt llama.cpp's argmax predicts the next of `ids`."""
    model.reset()
    model.eval(ids[:-1])
    predicted = model.scores[n_prompt - 1 : len(ids) - 1].argmax(-1).tolist()
    return sum(p == t for p, t in zip(predicted, ids[n_prompt:]))


@pytest.mark.slow
def test_llama_cpp_tokenizes_and_generates_like_llamita(trained_run, prepared, tmp_path):
    pre = load_pretrained(trained_run)
    eos = pre.tokenizer.eos_id
    f16 = llama_cpp_model(export_gguf(trained_run, tmp_path / "f16.gguf", "f16"), pre.model_config.max_seq_len)
    try:
        documents = [json.loads(line)["text"] for line in (prepared["tokenizer"].parent / "prose.jsonl").open()][:50]
        documents += [json.loads(line)["text"] for line in (prepared["tokenizer"].parent / "code.jsonl").open()][:50]
        documents += ["  two  spaces\n\n\ttab", "ünïcödé 日本語 ☃", "<s> is text here </s>"]
        for text in documents:
            assert f16.tokenize(text.encode(), add_bos=True, special=False) == pre.tokenizer.encode(text, bos=True)

        prompt_ids = pre.tokenizer.encode(PROMPT, bos=True)
        greedy = SamplingParams(temperature=0.0, max_tokens=N_NEW)
        ours = LLM(pre.model, pre.tokenizer, max_batch=1).generate(prompt_ids, greedy)[0].token_ids
        assert len(set(ours)) > 3
        assert llama_cpp_greedy(f16, prompt_ids, N_NEW, eos) == ours
        with torch.no_grad():
            logits = pre.model(torch.tensor([prompt_ids + ours]))[0].numpy()  # [T, V]
        f16.reset()
        f16.eval(prompt_ids + ours)
        assert abs(f16.scores[: len(prompt_ids) + len(ours)] - logits).max() < 1e-2  # fp16 weights
    finally:
        f16.close()

    q8 = llama_cpp_model(export_gguf(trained_run, tmp_path / "q8_0.gguf", "q8_0"), pre.model_config.max_seq_len)
    try:
        agree = teacher_forced_agreement(q8, prompt_ids + ours, len(prompt_ids))
        print(f"q8_0: llama.cpp's argmax equals llamita's greedy token at {agree}/{len(ours)} positions")
        assert agree >= 0.9 * len(ours)
    finally:
        q8.close()
