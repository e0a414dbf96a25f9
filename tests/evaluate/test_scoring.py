"""The scorer against a plain full-sequence forward, lm-eval's rolling windows, and text perplexity by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llamita.evaluate import scoring
from llamita.evaluate.perplexity import text_perplexity
from llamita.evaluate.scoring import encode_pairs, rolling_windows, score_pairs
from llamita.model import Llama, ModelConfig

CONFIG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=24)


@torch.no_grad()
def _reference(model: Llama, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """lm-eval's HF computation: one full, left-truncated sequence through the model, in float64."""
    L = model.config.max_seq_len
    full = (context + continuation)[-(L + 1) :]
    logits = model(torch.tensor([full[:-1]])).double()[0, -len(continuation) :]  # [C, V]
    logp = F.log_softmax(logits, dim=-1)
    target = torch.tensor(continuation)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("row_tokens", [4, 512])  # a segment per row, and many segments packed in a row
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_score_pairs_equals_full_sequences(batch_size, row_tokens, monkeypatch):
    monkeypatch.setattr(scoring, "ROW_TOKENS", row_tokens)
    torch.manual_seed(0)
    model = Llama(CONFIG).eval()
    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(CONFIG.vocab_size, (n,), generator=gen).tolist()

    pairs = []
    for n_ctx in (1, 5, 5, 23, 30):  # shared contexts, a context that fills the window, one cut from the left
        context = ids(n_ctx)
        pairs += [(context, ids(n)) for n in (1, 2, 4, 7)]
    pairs.append((ids(3), ids(CONFIG.max_seq_len)))  # a continuation as long as the window
    greedy = model(torch.tensor([pairs[0][0]]))[0, -1].argmax().item()
    pairs.append((pairs[0][0], [greedy]))
    done: list[int] = []
    scores = score_pairs(model, pairs, batch_size=batch_size, on_batch=done.extend)
    assert sorted(done) == list(range(len(pairs)))
    for (context, continuation), (lp, is_greedy) in zip(pairs, scores):
        ref_lp, ref_greedy = _reference(model, context, continuation)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert is_greedy == ref_greedy
    assert scores[-1][1]


def test_plan_packs_segments_into_rows_within_the_batch_size():
    gen = torch.Generator().manual_seed(2)
    pairs = []
    for _ in range(10):
        context = torch.randint(97, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
        pairs += [(context, [1] * int(torch.randint(1, 6, (1,), generator=gen))) for _ in range(4)]
    batches = scoring._plan_batches(pairs, max_len=24, batch_size=8)
    seen = [i for rows in batches for row in rows for seg in row.segments for i in seg.requests]
    assert sorted(seen) == list(range(len(pairs)))  # every request once
    for rows in batches:
        assert sum(len(seg.requests) for row in rows for seg in row.segments) <= 8
        for row in rows:
            assert row.length == sum(seg.length for seg in row.segments) <= max(scoring.ROW_TOKENS, 24)
            for seg in row.segments:  # the context once, then each continuation but its last token
                assert seg.length == len(seg.context) + sum(len(pairs[i][1]) - 1 for i in seg.requests)
    assert any(len(row.segments) > 1 for rows in batches for row in rows)  # packing happened
    assert len(batches) == 5  # 40 requests, 8 per pass, questions of 4 choices kept together


def test_score_pairs_rejects_a_continuation_longer_than_the_window():
    model = Llama(CONFIG)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        score_pairs(model, [([1], list(range(CONFIG.max_seq_len + 1)))], batch_size=2)


@pytest.mark.parametrize("n_tokens", [0, 1, 5, 24, 25, 48, 49, 70])
def test_rolling_windows_are_lm_evals(n_tokens):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 100 + n_tokens))
    expected = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, 24, 1)]
    assert rolling_windows(tokens, 1, 24) == [(list(a), list(b)) for a, b in expected]


def test_encode_pairs_moves_trailing_space_and_adds_bos(eval_model):
    tok = eval_model["tokenizer"]
    [(context, continuation)] = encode_pairs(tok, [("Question: the river\nAnswer: ", "sea")])
    assert context == [tok.bos_id] + tok.encode("Question: the river\nAnswer:")
    assert context + continuation == [tok.bos_id] + tok.encode("Question: the river\nAnswer: sea")
    [(context, _)] = encode_pairs(tok, [("<s>the river", " sea")])  # already starts with BOS: none added
    assert context == tok.encode("<s>the river")


def test_text_perplexity_and_bits_per_byte(eval_model, tmp_path):
    model, tok = eval_model["model"], eval_model["tokenizer"]
    texts = ["the river flows to the sea " * 30, "a bird builds a nest. é ünïcode"]
    (tmp_path / "a.txt").write_text(texts[0], encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(f'{{"text": "{texts[1]}"}}\n', encoding="utf-8")
    result = text_perplexity(model, tok, [tmp_path / "a.txt", tmp_path / "b.jsonl"], batch_size=4)

    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    L = model.config.max_seq_len
    nll, n_tokens = 0.0, 0
    for text in texts:  # lm-eval's windows, each scored by a plain forward in float64
        ids = tok.encode(text)
        for context, target in map(make_disjoint_window, get_rolling_token_windows(ids, tok.bos_id, L, 1)):
            nll -= _reference(model, list(context), list(target))[0]
        n_tokens += len(ids)
    assert n_tokens > L  # the long document spans two windows
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result["text_tokens"] == n_tokens and result["text_bytes"] == n_bytes and result["text_documents"] == 2
    assert result["text_loss"] == pytest.approx(nll / n_tokens, rel=1e-4)
    assert result["text_bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-4)
