"""`TextStream` against the full decoding: random id sequences of two real tokenizers (byte fallback with
SentencePiece's leading space; GPT-2's byte level), characters split over several ids, stop strings over token
boundaries, one id or several at a time; the `LLM`'s streamed text against its batch text; and each token's own
bytes (`Tokenizer.token_bytes`, what logprobs show) against the text's UTF-8."""

from __future__ import annotations

import random

import pytest
from inference_models import tiny_model
from text_fixtures import UNSEEN, WORDS, byte_level_tokenizer, corpus, llama_tokenizer, random_ids

from llamita.inference import LLM, SamplingParams
from llamita.inference.text import MAX_WINDOW, TextStream, text_pieces
from llamita.model import ModelConfig


@pytest.fixture(scope="module", params=["llama", "byte_level"])
def tokenizer(request, tmp_path_factory):
    if request.param == "llama":
        return llama_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return byte_level_tokenizer()


def reference(tokenizer, prompt: list[int], output: list[int], stop: tuple[str, ...] = ()) -> str:
    """What decoding everything at once gives: the text added to the prompt's, cut before the first stop string."""
    before, full = tokenizer.decode(prompt), tokenizer.decode(prompt + output)
    assert full.startswith(before)
    text = full[len(before) :]
    hits = [text.find(s) for s in stop if s in text]
    return text[: min(hits)] if hits else text


def streamed(tokenizer, prompt, output, stop=(), rng=None) -> tuple[list[str], TextStream]:
    """The pieces of a stream fed one id at a time, or (with `rng`) random runs of 1 to 4 ids."""
    stream = TextStream(tokenizer, prompt, stop)
    pieces, i = [], 0
    while i < len(output) and not stream.stopped:
        n = 1 if rng is None else rng.randint(1, 4)
        pieces.append(stream.push(output[i : i + n]))
        i += n
    pieces.append(stream.finish())
    return pieces, stream


def test_streamed_text_is_the_full_decoding(tokenizer):
    rng = random.Random(0)
    split = 0
    for trial in range(150):
        prompt = random_ids(tokenizer, rng, rng.randint(0, 6))
        output = random_ids(tokenizer, rng, rng.randint(1, 30))
        expected = reference(tokenizer, prompt, output)
        pieces, stream = streamed(tokenizer, prompt, output, rng=rng if trial % 2 else None)
        assert "".join(pieces) == expected == stream.text, (prompt, output)
        assert not any("\ufffd" in p for p in pieces)  # never half a character
        assert stream.token_ids == output and not stream.stopped
        split += any("\ufffd" in tokenizer.decode(output[:k]) for k in range(1, len(output)))
    assert split > 50  # most outputs had a character split over ids, waiting in the stream


def test_a_stream_decodes_a_small_window_only(tokenizer):
    class Counting:
        def __init__(self, inner):
            self.inner, self.longest = inner, 0

        def decode(self, ids):
            self.longest = max(self.longest, len(ids))
            return self.inner.decode(ids)

    rng = random.Random(1)
    prompt, output = random_ids(tokenizer, rng, 200), random_ids(tokenizer, rng, 1500)
    counting = Counting(tokenizer)
    pieces, _ = streamed(counting, prompt, output)
    assert "".join(pieces) == reference(tokenizer, prompt, output)
    assert counting.longest <= 2 * MAX_WINDOW  # per-token cost does not grow with the length


def test_stop_strings_spanning_tokens_are_never_given_out_in_part(tokenizer):
    rng = random.Random(2)
    spanning = 0
    for trial in range(150):
        prompt = random_ids(tokenizer, rng, rng.randint(0, 4))
        output = random_ids(tokenizer, rng, rng.randint(4, 30))
        text = reference(tokenizer, prompt, output)
        if len(text) < 4:
            continue
        start = rng.randrange(len(text) - 2)
        stop = (text[start : start + rng.randint(2, 5)], "never there")
        expected = reference(tokenizer, prompt, output, stop)
        pieces, stream = streamed(tokenizer, prompt, output, stop, rng=rng if trial % 2 else None)
        assert "".join(pieces) == expected == stream.text and stream.stopped
        assert not any(stop[0][:1] and p.endswith(stop[0]) for p in pieces)
        cuts = [len(tokenizer.decode(prompt + output[:k])) - len(tokenizer.decode(prompt)) for k in range(len(output))]
        spanning += any(len(expected) < c < len(expected) + len(stop[0]) for c in cuts)
    assert spanning > 20  # many stop strings had a token boundary inside them


def test_a_tail_that_may_begin_a_stop_string_waits_and_is_flushed_at_the_end(tokenizer):
    prompt = tokenizer.encode("the river", bos=True)
    output = tokenizer.encode(" model café")[:]
    text = reference(tokenizer, prompt, output)
    stream = TextStream(tokenizer, prompt, stop=(text[-2:] + "#",))
    before = "".join(stream.push([i]) for i in output)
    assert before == text[:-2] and stream.text == before  # "é" waits: it might begin the stop string
    assert stream.finish() == text[-2:] and stream.text == text and not stream.stopped


def test_a_prompt_ending_in_special_tokens_keeps_the_leading_space(tokenizer):
    prompt = tokenizer.encode("the river", bos=True) + [tokenizer.eos_id] * 8
    output = tokenizer.encode(" model") + [tokenizer.eos_id] * 3 + tokenizer.encode(" loss")
    pieces, _ = streamed(tokenizer, prompt, output)
    expected = reference(tokenizer, prompt, output)
    assert "".join(pieces) == expected and expected.startswith(" ") and expected.split() == ["model", "loss"]


def test_text_pieces_is_the_stream_with_its_prompt_shown(tokenizer):
    rng = random.Random(3)
    prompt, output = tokenizer.encode("the river", bos=True), random_ids(tokenizer, rng, 20)
    shown = "".join(text_pieces(tokenizer, output, prefix=prompt, show_prefix=True))
    assert shown == tokenizer.decode(prompt) + reference(tokenizer, prompt, output)


def test_token_bytes_joined_are_the_texts_utf8(tokenizer, request):
    # SentencePiece-style vocabularies read a text with a ▁ (a space) before it; GPT-2's byte level reads it as it is.
    lead = " " if request.node.callspec.params["tokenizer"] == "llama" else ""
    partial = 0
    for text in [*corpus(60, seed=5), *WORDS, *UNSEEN, "  two  spaces\n\n\tand a tab", "€🇫🇷 ꙮ"]:
        ids = tokenizer.encode(text)
        pieces = [tokenizer.token_bytes(i) for i in ids]
        assert b"".join(pieces) == (lead + text).encode("utf-8"), text
        partial += sum(not _is_utf8(p) for p in pieces)
    assert partial > 20  # characters split over byte(-fallback) tokens: each token holds a part of one
    rng = random.Random(4)
    for _ in range(50):
        ids = [i for i in random_ids(tokenizer, rng, 12) if i not in (tokenizer.bos_id, tokenizer.eos_id)]
        joined = b"".join(map(tokenizer.token_bytes, ids)).decode("utf-8")
        assert tokenizer.decode(ids) == (joined.removeprefix(lead) if lead else joined), ids
    assert [tokenizer.token_bytes(i) for i in (tokenizer.bos_id, tokenizer.eos_id)] == [b"<s>", b"</s>"]
    with pytest.raises(ValueError, match=f"token id {tokenizer.vocab_size} is outside the vocabulary"):
        tokenizer.token_bytes(tokenizer.vocab_size)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_generate_and_stream_text_cut_at_the_same_stop_string(tmp_path):
    tok = llama_tokenizer(tmp_path)
    model = tiny_model(ModelConfig(vocab_size=tok.vocab_size, dim=48, n_layers=2, n_heads=6, n_kv_heads=2,
                                   intermediate_size=72, max_seq_len=96))  # fmt: skip
    llm = LLM(model, tok, max_batch=4)
    prompt = "the river"
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40))[0]
    assert free.finish_reason == "length" and len(free.text) > 12
    for start in (3, 8):
        stop = free.text[start : start + 3]
        params = SamplingParams(temperature=0.0, max_tokens=40, stop=(stop, "never there"))
        cut = llm.generate(prompt, params)[0]
        assert cut.text == free.text[: free.text.index(stop)] and cut.finish_reason == "stop"
        assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 40
        assert "".join(llm.stream_text(prompt, params)) == cut.text
        assert "".join(llm.stream_text(prompt, params, echo=True)) == tok.decode(tok.encode(prompt)) + cut.text
