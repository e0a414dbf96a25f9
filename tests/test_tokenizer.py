"""Tokenizer: Llama layout, exact round trips, parity with transformers.AutoTokenizer and SentencePiece."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import tokenizers.models
import tokenizers.trainers

import llamita.tokenizer
from llamita.config import ConfigError
from llamita.data.sources import SourceError
from llamita.tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer

VOCAB = 600

SAMPLES = [
    "Hello world, this is a plain sentence.",
    "Café naïve résumé, déjà vu: Größe, Straße, señor, Ærøskøbing.",
    "東京は日本の首都です。中文测试：你好，世界！",
    "مرحبا بالعالم — שלום עולם (right to left)",
    "emoji 🦙🎉 with a family 👨‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n\tif x > 1:\n\t\treturn x * 2\n    return None  # mixed tabs and spaces\n",
    "    leading spaces, double  and triple   gaps, trailing   ",
    " \n\n  \n",
    " ",
    "\n",
    "",
    "digits 1234567890 and 3.14159",
    "never seen: ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \x00\x07\ufeff",
    "literal specials <s> </s> <unk> stay text",
]


def _make_corpus(root: Path) -> list[Path]:
    """A few tens of KB of mixed prose, code, accents, CJK and RTL text, as one .jsonl and one .txt file."""
    rng = random.Random(0)
    syllables = "ka ri to ne mu sa lo pe vi da gu ho zen tra bel qua ström café niño".split()
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(300)]
    extras = ["東京", "日本語", "中文", "مرحبا", "عالم", "שלום", "déjà", "ÆØÅ", "→", "😀"]
    code = "def {0}(a, b):\n    if a > {1}:\n        return a + b\n\treturn [{0}(i) for i in range({1})]\n"
    records, chunks = [], []
    for i in range(300):
        sentence = " ".join(rng.choices(words + extras, k=rng.randint(5, 15))).capitalize() + "."
        records.append(json.dumps({"text": sentence + "\n" + code.format(rng.choice(words), i)}, ensure_ascii=False))
        chunks.append("  ".join(rng.choices(words, k=8)) + f" {i * 37}")
    (root / "a.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    (root / "b.txt").write_text("\n".join(chunks), encoding="utf-8")
    return [root / "a.jsonl", root / "b.txt"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    return _make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus, VOCAB, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_llama_layout(tok, tok_dir):
    vocab = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == len(vocab) == VOCAB
    assert [vocab[f"<0x{b:02X}>"] for b in range(256)] == list(range(3, 259))
    assert not [t for t in vocab if len(t) > 1 and any(c.isdigit() for c in t) and not t.startswith("<0x")]
    assert "▁▁▁▁" in vocab  # indentation runs are learned


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_and_autotokenizer_parity(tok, hf_tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id, *ids, tok.eos_id]
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True)
    assert hf_tok.decode(ids, skip_special_tokens=True) == text
    assert hf_tok.decode([tok.bos_id, *ids, tok.eos_id], skip_special_tokens=True) == text


def test_unseen_characters_fall_back_to_bytes(tok):
    text = "𝔘"  # 4 UTF-8 bytes, absent from the corpus
    ids = tok.encode(text)
    assert ids[1:] == [3 + b for b in text.encode("utf-8")]  # after the prepended "▁"
    assert tok.unk_id not in ids


def test_special_token_text_is_encoded_as_text(tok):
    ids = tok.encode("a</s>b<s>c<unk>")
    assert not {tok.bos_id, tok.eos_id, tok.unk_id} & set(ids)


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(SAMPLES, bos=True, eos=True) == [tok.encode(s, bos=True, eos=True) for s in SAMPLES]


# Where the piece cache could go wrong: runs of spaces, a literal ▁, specials' text, numerals beyond ASCII that the
# Digits pre-tokenizer isolates, newlines and digits inside words.
WORD_EDGES = [
    "a  b",
    " a",
    "a ",
    "  ",
    "x▁y ▁ ▁▁z",
    "▁",
    "12 ²³ ٣٤ Ⅻ ½ 3.14",
    "<s><s> </s>x <unk>> a<s>b",
    "\t\ta\n b\n\n  c",
    "  \n  ",
    "word, word. word\nword",
]


def _concat_reference(tok: Tokenizer, texts: list[str], bos: bool, eos: bool) -> tuple[list[int], list[int]]:
    ids = [tok.encode(text, bos=bos, eos=eos) for text in texts]
    return [i for one in ids for i in one], [len(one) for one in ids]


@pytest.mark.parametrize(("bos", "eos"), [(False, False), (True, True), (True, False)])
def test_encode_concat_equals_encode(tok, tok_dir, corpus, bos, eos):
    texts = SAMPLES + WORD_EDGES + [line for path in corpus for line in path.read_text(encoding="utf-8").splitlines()]
    fresh = Tokenizer.load(tok_dir)
    assert fresh._piece_cache is not None, "a tokenizer from train_tokenizer takes the piece cache"
    # Twice in batches: the second time every word is cached.
    for _ in range(2):
        for start in range(0, len(texts), 50):
            batch = texts[start : start + 50]
            ids, counts = fresh.encode_concat(batch, np.uint16, bos=bos, eos=eos)
            assert ids.dtype == np.uint16 and counts.dtype == np.int64
            assert (ids.tolist(), counts.tolist()) == _concat_reference(tok, batch, bos, eos)
            assert fresh._piece_cache.encode(batch, np.uint16, bos, eos) is not None, "the cache answered"
    empty_ids, empty_counts = fresh.encode_concat([], np.uint16)
    assert empty_ids.shape == empty_counts.shape == (0,)


def test_piece_cache_is_bounded(tok, tok_dir, corpus, monkeypatch):
    monkeypatch.setattr(llamita.tokenizer, "PIECE_CACHE_PIECES", 40)
    small = Tokenizer.load(tok_dir)
    texts = corpus[0].read_text(encoding="utf-8").splitlines()
    for start in range(0, len(texts), 5):
        batch = texts[start : start + 5]
        ids, counts = small.encode_concat(batch, bos=True)
        assert (ids.tolist(), counts.tolist()) == _concat_reference(tok, batch, True, False)
        assert small._piece_cache.pieces <= 40 + sum(len(t) for t in batch) + 2


def test_piece_cache_across_windows(tok, tok_dir, corpus, monkeypatch):
    """Texts longer than a window are cut between pieces (or not at all, without a place to cut)."""
    monkeypatch.setattr(llamita.tokenizer._PieceCache, "WINDOW_BYTES", 64)
    small = Tokenizer.load(tok_dir)
    lines = corpus[0].read_text(encoding="utf-8").splitlines()
    texts = [" ".join(lines[:20]), "x" * 300, "", *WORD_EDGES, lines[20][:100], "  " * 50 + "y", ""]
    for bos, eos in [(False, False), (True, True), (False, True)]:
        cached = small._piece_cache.encode(texts, np.int64, bos, eos)
        assert cached is not None
        assert (cached[0].tolist(), cached[1].tolist()) == _concat_reference(tok, texts, bos, eos)


def test_piece_cache_hash_collisions_change_no_id(tok, tok_dir, corpus, monkeypatch):
    """Pieces are found by hash, then their bytes are compared: with a hash that is a piece's length, pieces collide
    with new ones and with cached ones; the cache declines those batches, encode_concat still equals encode, and
    the cache stays right for the pieces it holds."""
    monkeypatch.setattr(
        llamita.tokenizer._PieceCache, "_hashes", lambda self, data, starts, ends: (ends - starts).astype(np.uint64)
    )
    weak = Tokenizer.load(tok_dir)
    assert weak._piece_cache.encode(["ab"], np.int64, True, True) is not None
    cached = weak._piece_cache.encode(["ab ab", "ab"], np.int64, True, True)
    assert cached is not None and cached[0].tolist() == [i for t in ["ab ab", "ab"] for i in tok.encode(t, True, True)]
    for texts in (["cd"], ["ef gh"], WORD_EDGES + corpus[0].read_text(encoding="utf-8").splitlines()[:50]):
        assert weak._piece_cache.encode(texts, np.int64, True, True) is None
        ids, counts = weak.encode_concat(texts, bos=True, eos=True)
        assert (ids.tolist(), counts.tolist()) == _concat_reference(tok, texts, True, True)


def test_encode_concat_outside_the_piece_cache_pipelines(tok_dir, corpus):
    """Llama 2's whole-text BPE (no pre-tokenizer) takes the cache too; a vocabulary with pieces across words
    must not, and still encodes as encode does."""
    texts = SAMPLES + WORD_EDGES + corpus[0].read_text(encoding="utf-8").splitlines()
    whole_text = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    whole_text.pre_tokenizer = None
    across = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True))
    across.normalizer = whole_text.normalizer
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    across.train_from_iterator(["of the rest of the day " * 20] + texts, trainer)
    assert any("f▁t" in piece for piece in across.get_vocab()), "the vocabulary joins words"
    for backend, cached in ((whole_text, True), (across, False)):
        tokenizer = Tokenizer(backend)
        assert (tokenizer._piece_cache is not None) == cached
        ids, counts = tokenizer.encode_concat(texts, bos=True, eos=True)
        assert (ids.tolist(), counts.tolist()) == _concat_reference(tokenizer, texts, True, True)
        assert not cached or tokenizer._piece_cache.encode(texts, np.int64, True, True) is not None


def test_pre_tokenizer_only_saves_time(tok_dir, corpus):
    """Learned pieces never cross the pre-tokenizer's splits, so dropping it (SentencePiece-style whole-text
    BPE, as Llama 2's own tokenizer.json does) encodes identically."""
    with_split = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    whole_text = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    whole_text.pre_tokenizer = None
    for backend in (with_split, whole_text):
        backend.encode_special_tokens = True
    texts = SAMPLES + [line for path in corpus for line in path.read_text(encoding="utf-8").splitlines()]
    encode = [[e.ids for e in b.encode_batch(texts, add_special_tokens=False)] for b in (with_split, whole_text)]
    assert encode[0] == encode[1]


def test_training_is_deterministic_across_processes(tok_dir, corpus, tmp_path):
    code = (
        "import sys; from pathlib import Path; from llamita.tokenizer import train_tokenizer; "
        f"train_tokenizer([Path(p) for p in sys.argv[2:]], {VOCAB}, Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path), *map(str, corpus)], check=True)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_fingerprint_survives_save_and_load_and_tracks_changes(tok, tok_dir, corpus, tmp_path):
    tok.save(tmp_path / "copy")
    assert Tokenizer.load(tmp_path / "copy").fingerprint() == tok.fingerprint()
    assert Tokenizer.load(tok_dir / "tokenizer.json").fingerprint() == tok.fingerprint()
    other = train_tokenizer(corpus, VOCAB - 10)
    assert other.vocab_size == VOCAB - 10
    assert other.fingerprint() != tok.fingerprint()


def test_config_files_choose_special_tokens(tok_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<s>"}))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"__type": "AddedToken", "content": "<unk>"}, "model_max_length": 512})
    )
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.eos_id, loaded.model_max_length) == (0, 512)  # tokenizer_config.json wins, dict form read
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<start>"}))
    with pytest.raises(ValueError, match="bos_token '<start>' is not in the vocabulary"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.load(tmp_path)


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no tokenizer\.json or tokenizer\.model"):
        Tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such tokenizer"):
        Tokenizer.load(tmp_path / "absent")


def test_vocab_size_and_empty_input_are_rejected(corpus, tmp_path):
    with pytest.raises(ConfigError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(corpus, MIN_VOCAB_SIZE - 1)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SourceError, match="no documents"):
        train_tokenizer([tmp_path / "empty.txt"], VOCAB)


def _train_sentencepiece(root: Path, corpus: list[Path], **options) -> Path:
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    text = root / "spm.txt"
    text.write_text("\n".join(corpus[1].read_text(encoding="utf-8").splitlines() + SAMPLES[:6]), encoding="utf-8")
    llama_options = dict(  # the trainer_spec / normalizer_spec of Llama 2's tokenizer.model
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=0.99995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    )
    model_dir = root / "spm"
    model_dir.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(model_dir / "tokenizer"),
        vocab_size=500,
        minloglevel=2,
        **{**llama_options, **options},
    )
    return model_dir


def test_sentencepiece_model_matches_sentencepiece(corpus, tmp_path):
    model_dir = _train_sentencepiece(tmp_path, corpus)
    import sentencepiece
    from transformers import AutoTokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    for loaded in (Tokenizer.load(model_dir), Tokenizer.load(model_dir / "tokenizer.model")):
        assert (loaded.unk_id, loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (0, 1, 2, sp.vocab_size())
        for text in SAMPLES:
            assert loaded.encode(text) == sp.encode(text), text
            assert loaded.decode(loaded.encode(text)) == sp.decode(sp.encode(text))
    loaded.save(tmp_path / "converted")
    hf = AutoTokenizer.from_pretrained(tmp_path / "converted")
    for text in SAMPLES:
        assert hf(text)["input_ids"] == [1, *sp.encode(text)]
    assert Tokenizer.load(tmp_path / "converted").fingerprint() == loaded.fingerprint()


def test_sentencepiece_needs_the_spm_extra(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` fail
    with pytest.raises(ImportError, match=r"pip install 'llamita\[spm\]'"):
        Tokenizer.load(tmp_path)


def test_sentencepiece_model_with_other_normalization_is_refused(corpus, tmp_path):
    model_dir = _train_sentencepiece(tmp_path, corpus, normalization_rule_name="nmt_nfkc")
    with pytest.raises(ValueError, match="normalization 'nmt_nfkc'"):
        Tokenizer.load(model_dir)
