"""The tokenizer: load a Llama tokenizer, train a Llama-style byte-fallback BPE, save it for Hugging Face.

Llama's tokenizer is a SentencePiece BPE: spaces become ``▁``, one ``▁`` is prepended to the text, digits are
single tokens, and a character outside the vocabulary falls back to its UTF-8 bytes ``<0x00>``..``<0xFF>``, so
every string round-trips. The ids are ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, then the 256 byte tokens, then
the learned pieces. :func:`train_tokenizer` builds the same thing with the ``tokenizers`` library, and
:meth:`Tokenizer.save` writes a directory that ``transformers.AutoTokenizer`` loads and encodes identically.

Text is data: a document containing the characters ``</s>`` is encoded as those characters, never as the EOS
id (as SentencePiece does); BOS/EOS ids are added only through ``encode(bos=..., eos=...)``. A chat template is
the exception: its rendering is read by :meth:`Tokenizer.encode_rendered`, where special-token strings are the
tokens, as transformers' ``apply_chat_template`` reads it. A tokenizer carries its template (``chat_template``)
and the special tokens a template adds (:meth:`Tokenizer.add_special_tokens`) through save and load.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from llamita.config import ConfigError
from llamita.data.sources import Rejects, SourceError, iter_documents

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
SPACE = "▁"
MIN_VOCAB_SIZE = 3 + len(BYTE_TOKENS) + 64
"""Special tokens, byte tokens, and room for an alphabet and some merges."""
CHARACTER_COVERAGE = 0.99995
"""Share of training characters that get their own token (Llama 2's value); the rarest fall back to bytes."""
MAX_TOKEN_CHARS = 16
"""Longest learned token in characters (SentencePiece's default), so boilerplate does not become one token."""
DEFAULT_MODEL_MAX_LENGTH = 2048
CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""Where transformers >= 4.50 saves a tokenizer's chat template; read before tokenizer_config.json, as it does."""
PIECE_CACHE_PIECES = 1 << 20
"""Most distinct pieces :meth:`Tokenizer.encode_concat` keeps the ids of (about 200 MB); then it starts afresh."""


class Tokenizer:
    """A loaded tokenizer: text <-> token ids, with explicit BOS/EOS.

    Args:
        backend: the ``tokenizers`` pipeline (normalizer, pre-tokenizer, model, decoder).
        bos_token: the beginning-of-sequence token; must be in the vocabulary.
        eos_token: the end-of-sequence token; must be in the vocabulary.
        unk_token: the unknown token, or None if the vocabulary has none.
        model_max_length: context length written to ``tokenizer_config.json``.
        source: where the tokenizer came from, for error messages.
        chat_template: the Jinja chat template written to ``tokenizer_config.json``, or None.
    """

    def __init__(
        self,
        backend: Backend,
        bos_token: str = BOS,
        eos_token: str = EOS,
        unk_token: str | None = UNK,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        source: str = "tokenizer",
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        # Special-token strings in text stay text (as in SentencePiece; saved as split_special_tokens).
        self._backend.encode_special_tokens = True
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token}
        self._ids = {field: self._token_id(token, field, source) for field, token in self._tokens.items()}
        self.model_max_length = model_max_length
        self.chat_template = chat_template

    def _token_id(self, token: str | None, field: str, source: str) -> int | None:
        if token is None:
            if field == "unk_token":
                return None
            raise ValueError(f"{source}: no {field} is set; add `{field}` to tokenizer_config.json")
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"{source}: {field} {token!r} is not in the vocabulary; fix `{field}` in tokenizer_config.json"
            )
        return token_id

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer directory, a ``tokenizer.json`` file or a SentencePiece ``tokenizer.model`` file.

        A directory is read as ``tokenizer.json`` when present, else ``tokenizer.model`` (Meta's Llama 2).
        Special tokens come from ``tokenizer_config.json`` or ``special_tokens_map.json`` beside the file,
        else from the SentencePiece model, else ``<s>``, ``</s>``, ``<unk>``; the chat template from
        ``chat_template.jinja`` or ``tokenizer_config.json`` (see :func:`read_chat_template`).

        Args:
            path: the directory or file.

        Raises:
            FileNotFoundError: the path does not exist, or the directory holds neither file.
            ImportError: a ``.model`` file needs the ``spm`` extra.
            ValueError: a config file is not valid JSON or names a token missing from the vocabulary.
        """
        path = Path(path)
        if path.is_dir():
            directory = path
            file = next((path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()), None)
            if file is None:
                raise FileNotFoundError(
                    f"{path}: no tokenizer.json or tokenizer.model in this directory; point to a directory "
                    "written by `llamita train-tokenizer` or a Hugging Face / Meta Llama tokenizer directory"
                )
        elif path.is_file():
            directory, file = path.parent, path
        else:
            raise FileNotFoundError(f"{path}: no such tokenizer file or directory")

        if file.suffix == ".model":
            backend, tokens = _backend_from_sentencepiece(file)
        else:
            try:
                backend = Backend.from_file(str(file))
            except Exception as e:  # the Rust side raises a bare Exception for malformed files
                raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from e
            tokens = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
        config = _read_config(directory)
        if "unk_token" not in config and backend.token_to_id(tokens["unk_token"] or "") is None:
            tokens["unk_token"] = None  # byte-level vocabularies (GPT-2 style) have no unknown token
        tokens.update((field, config[field]) for field in tokens if field in config)
        return cls(
            backend,
            **tokens,
            model_max_length=config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH),
            source=str(file),
            chat_template=read_chat_template(directory),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence token."""
        return self._ids["bos_token"]

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence token."""
        return self._ids["eos_token"]

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown token (0 for Llama), or None if the vocabulary has none."""
        return self._ids["unk_token"]

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens, ``{"bos_token": "<s>", ...}``, as transformers' ``special_tokens_map``."""
        return {field: token for field, token in self._tokens.items() if token is not None}

    def add_special_tokens(self, tokens: Iterable[str]) -> int:
        """Add tokens that are always one id in a rendered chat (e.g. ChatML's ``<|im_start|>``).

        New tokens get the next ids; :meth:`encode` still reads their strings in plain text as text.

        Returns:
            How many tokens were new, i.e. how many rows the model's embeddings must grow by.
        """
        tokens = list(tokens)
        if not all(isinstance(t, str) and t for t in tokens):
            raise ValueError(f"special tokens must be non-empty strings, got {tokens!r}")
        added = self._backend.add_special_tokens(tokens)
        for derived in ("_rendered_backend", "_piece_cache"):
            self.__dict__.pop(derived, None)  # rebuilt with the new tokens on next use
        return added

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS prepended and EOS appended when asked."""
        return self._wrap(self._backend.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """:meth:`encode` for many texts, in parallel threads."""
        encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encodings]

    def encode_concat(
        self, texts: Sequence[str], dtype: np.dtype | type = np.int64, bos: bool = False, eos: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ids :meth:`encode` gives each of ``texts``, concatenated into one array, and each text's count.

        For Llama's normalizer with the pre-tokenizer :func:`train_tokenizer` builds, or with none (Llama 2's
        whole-text BPE), the ids of a text are those of its pieces (runs of spaces with the word after them,
        digits, newlines: :class:`_PieceCache`) in order, so each distinct piece is BPE-encoded once and then
        looked up: several times faster than :meth:`encode_batch` on one core. Other pipelines go through
        :meth:`encode_batch`. Not thread-safe: the cache belongs to this tokenizer.

        Args:
            texts: the texts.
            dtype: the ids' dtype; it must hold every id of the vocabulary.
            bos: prepend BOS to each text.
            eos: append EOS to each text.

        Returns:
            ``(ids, counts)``: all ids, and how many of them belong to each text (int64).
        """
        if self._piece_cache is not None:
            return self._piece_cache.encode(texts, dtype, bos, eos)
        ids = self.encode_batch(list(texts), bos, eos)
        counts = np.fromiter(map(len, ids), np.int64, len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype, int(counts.sum())), counts

    @functools.cached_property
    def _piece_cache(self) -> _PieceCache | None:
        state = json.loads(self._backend.to_str())
        model = state["model"]
        merged = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in model.get("merges", []))
        applies = (
            state["normalizer"] == json.loads(_llama_normalizer().__getstate__())
            and state["pre_tokenizer"] in (None, json.loads(_training_pre_tokenizer().__getstate__()))
            and model["type"] == "BPE"
            and model.get("dropout") is None
            and model.get("byte_fallback")  # else unknown characters fuse into one <unk> across a cut
            and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix")
            and state["truncation"] is None
            and state["padding"] is None
            and all(t["special"] for t in state["added_tokens"])  # special ones are text here (encode_special_tokens)
            and not any(_PieceCache.ACROSS.search(token) for token in merged)
        )
        return _PieceCache(self._backend, self.bos_id, self.eos_id, PIECE_CACHE_PIECES) if applies else None

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_rendered(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of a rendered chat template and each token's ``(start, end)`` character span in ``text``.

        Unlike :meth:`encode`, special-token strings (``</s>``, ``<|im_end|>``) become their ids, and no BOS is
        added: the ids of transformers' ``apply_chat_template(..., tokenize=True)``.
        """
        encoding = self._rendered_backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    @functools.cached_property
    def _rendered_backend(self) -> Backend:
        # A copy, so that encode() in another thread never sees the flag flipped.
        backend = Backend.from_str(self._backend.to_str())
        backend.encode_special_tokens = False
        return backend

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special tokens (BOS, EOS, UNK) are dropped, byte tokens become characters."""
        return self._backend.decode(list(map(int, ids)), skip_special_tokens=True)

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the serialized pipeline and special tokens: same digest, same token ids."""
        state = self._backend.to_str() + json.dumps(self._tokens, sort_keys=True)
        return hashlib.sha256(state.encode("utf-8")).hexdigest()

    def save(self, out_dir: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``out_dir``.

        ``transformers.AutoTokenizer.from_pretrained(out_dir)`` then encodes and decodes exactly as this
        object, adding BOS by default (``tok(text)`` equals ``encode(text, bos=True)``). A chat template is
        written as ``chat_template`` and added special tokens as ``additional_special_tokens``; with a template,
        transformers must read the special tokens in a rendered chat as tokens, so ``split_special_tokens`` is
        then false: there ``tok(text)`` reads ``</s>`` in text as EOS, as for every Hugging Face chat model.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(out_dir / "tokenizer.json"))
        special = self.special_tokens
        added = [
            token.content
            for _, token in sorted(self._backend.get_added_tokens_decoder().items())
            if token.special and token.content not in special.values()
        ]
        config = {
            # Not LlamaTokenizerFast: transformers 5 rebuilds that class's pipeline instead of reading ours.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": self.model_max_length,
            "legacy": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": self.chat_template is None,
        }
        if added:
            config["additional_special_tokens"] = added
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        # transformers reads chat_template.jinja before tokenizer_config.json: a stale one would win.
        (out_dir / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
        _write_json(out_dir / "tokenizer_config.json", config)
        _write_json(out_dir / "special_tokens_map.json", special)


class _PieceCache:
    """The ids of texts piece by piece, each distinct piece BPE-encoded once.

    A text normalized as Llama's normalizer does (a ``▁`` before it, every space a ``▁``) is cut by
    :attr:`PIECES` into runs of ``▁`` with what follows them up to the next ``▁``, newline or ASCII digit; runs of
    ``▁`` alone; single digits; runs of newlines. The pre-tokenizer of :func:`train_tokenizer` cuts there too (and
    maybe within: ``>`` after ``<s``, other numerals), and no merge makes a token across these cuts (:attr:`ACROSS`;
    what lets Llama 2's BPE, with no pre-tokenizer, take this cache too). So the ids of a text are those of its
    pieces in order, each computed alone by the tokenizer's own pre-tokenizer and model.

    Args:
        backend: the tokenizer's pipeline.
        bos_id: id of BOS, for the texts asked with it.
        eos_id: id of EOS.
        max_pieces: the cache is emptied when it holds more pieces than this, so memory stays bounded.
    """

    PIECES = re.compile(f"{SPACE}*[^{SPACE}\\n0-9]+|{SPACE}+|[0-9]|\\n+")
    ACROSS = re.compile(f"[^{SPACE}]{SPACE}|[^\\n]\\n|\\n[^\\n]|[0-9].|.[0-9]", re.DOTALL)
    """A token containing one of these spans a cut of :attr:`PIECES`."""
    _BOS, _EOS = 0, 1  # the rows of BOS and EOS; never a piece, which is a str

    def __init__(self, backend: Backend, bos_id: int, eos_id: int, max_pieces: int) -> None:
        state = json.loads(backend.to_str())
        state.update(normalizer=None, post_processor=None)  # pieces are normalized text; no BOS template
        self._backend = Backend.from_str(json.dumps(state))
        self._backend.encode_special_tokens = True
        self._specials = (bos_id, eos_id)
        self._max_pieces = max_pieces
        self._clear()

    def _clear(self) -> None:
        # Row r of the table holds the ids _flat[_start[r] : _start[r] + _len[r]]; the arrays grow by doubling.
        self._rows: dict[str | int, int] = {self._BOS: self._BOS, self._EOS: self._EOS}
        self._start = np.arange(1024, dtype=np.int64)
        self._len = np.ones(1024, dtype=np.int64)
        self._flat = np.zeros(4096, dtype=np.uint32)
        self._flat[:2] = self._specials
        self._n_ids = 2

    def encode(
        self, texts: Sequence[str], dtype: np.dtype | type, bos: bool, eos: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`Tokenizer.encode_concat`."""
        if len(self._rows) > self._max_pieces:
            self._clear()
        keys: list[str | int] = []
        n_keys = np.empty(len(texts), dtype=np.int64)
        pieces = self.PIECES.findall
        for i, text in enumerate(texts):
            before = len(keys)
            if bos:
                keys.append(self._BOS)
            if text:  # nothing is prepended to an empty text
                keys += pieces(SPACE + text.replace(" ", SPACE))
            if eos:
                keys.append(self._EOS)
            n_keys[i] = len(keys) - before
        rows = self._lookup(keys)
        new = np.flatnonzero(rows < 0)
        if len(new):
            new_keys = [keys[k] for k in new]
            self._add(list(dict.fromkeys(new_keys)))
            rows[new] = self._lookup(new_keys)
        # Gather: the ids of row rows[k] land at ends[k] - lens[k] onward.
        lens = self._len[rows]
        ends = np.cumsum(lens)
        total = int(ends[-1]) if len(ends) else 0
        ids = self._flat[np.repeat(self._start[rows] - (ends - lens), lens) + np.arange(total)]
        key_ends = np.cumsum(n_keys)
        id_ends = np.concatenate([[0], ends])
        return ids.astype(dtype, copy=False), id_ends[key_ends] - id_ends[key_ends - n_keys]

    def _lookup(self, keys: list[str | int]) -> np.ndarray:
        """The rows of ``keys``, -1 where absent."""
        return np.fromiter(map(self._rows.get, keys, itertools.repeat(-1)), np.int64, len(keys))

    def _add(self, pieces: list[str]) -> None:
        # One pre-tokenized sequence, each piece encoded alone: a quarter faster than a batch of one-piece texts.
        encoding = self._backend.encode(pieces, is_pretokenized=True, add_special_tokens=False)
        lens = np.bincount(np.array(encoding.word_ids, dtype=np.int64), minlength=len(pieces))
        first, stop = len(self._rows), len(self._rows) + len(pieces)
        begin, end = self._n_ids, self._n_ids + int(lens.sum())
        self._start, self._len, self._flat = _grown(self._start, stop), _grown(self._len, stop), _grown(self._flat, end)
        self._start[first:stop] = begin + np.cumsum(lens) - lens
        self._len[first:stop] = lens
        self._flat[begin:end] = encoding.ids
        self._n_ids = end
        self._rows.update(zip(pieces, range(first, stop)))


def _grown(array: np.ndarray, size: int) -> np.ndarray:
    """``array``, or a copy at least twice as long when it is shorter than ``size``."""
    if size <= len(array):
        return array
    bigger = np.empty(max(size, 2 * len(array)), dtype=array.dtype)
    bigger[: len(array)] = array
    return bigger


def train_tokenizer(
    files: list[Path], vocab_size: int, out_dir: Path | None = None, *, text_field: str = "text"
) -> Tokenizer:
    """Train a Llama-style byte-fallback BPE tokenizer on text files; the same inputs give the same tokenizer.

    Learned pieces never cross a digit (digits are single tokens, as in Llama), a newline, or the end of a
    word; a run of spaces may join the word that follows it, which keeps code indentation cheap.

    Args:
        files: training files in any format :func:`llamita.data.sources.iter_documents` reads.
        vocab_size: total vocabulary, special and byte tokens included.
        out_dir: if given, where to :meth:`Tokenizer.save` the result.
        text_field: JSON key or parquet column holding the text.

    Raises:
        ConfigError: ``vocab_size`` is below :data:`MIN_VOCAB_SIZE`.
        llamita.data.sources.SourceError: a file cannot be read, or the files hold no document.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} "
            f"(3 special + {len(BYTE_TOKENS)} byte tokens + room for characters and merges)"
        )
    paths = [Path(f) for f in files]
    rejects = Rejects()
    learned = vocab_size - len(BYTE_TOKENS)  # the trainer's budget: special tokens, characters and merges
    alphabet = _choose_alphabet(_documents(paths, text_field, rejects), max_chars=(learned - 3) // 2)
    if not alphabet:
        raise SourceError(f"no documents to train on in {[str(p) for p in paths]} ({rejects.summary()})")
    if rejects.total:
        warnings.warn(f"tokenizer training skipped records: {rejects.summary()}", stacklevel=2)

    backend = Backend(BPE(unk_token=UNK, fuse_unk=True, byte_fallback=True))
    backend.normalizer = _llama_normalizer()
    backend.pre_tokenizer = _training_pre_tokenizer()
    trainer = BpeTrainer(
        vocab_size=learned,
        special_tokens=[UNK, BOS, EOS],
        # Our own alphabet, exactly: the trainer's limit_alphabet breaks count ties in hash order.
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        max_token_length=MAX_TOKEN_CHARS,
        show_progress=False,
    )
    backend.train_from_iterator(_documents(paths, text_field, Rejects()), trainer=trainer)
    backend = _insert_byte_tokens(backend)
    backend.decoder = _decoder(strip_prefix=True)
    backend.post_processor = _bos_template(backend)
    if backend.get_vocab_size() < vocab_size:
        warnings.warn(
            f"the corpus only supports {backend.get_vocab_size()} of the {vocab_size} tokens asked for; "
            "train on more text for a larger vocabulary",
            stacklevel=2,
        )
    tokenizer = Tokenizer(backend, source="trained tokenizer")
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer


def _documents(paths: list[Path], text_field: str, rejects: Rejects) -> Iterator[str]:
    for path in paths:
        yield from iter_documents(path, text_field, rejects)


def _choose_alphabet(documents: Iterable[str], max_chars: int) -> list[str]:
    """The most frequent characters (after spaces become ``▁``) covering :data:`CHARACTER_COVERAGE`."""
    counts: Counter[str] = Counter()
    n_docs = 0
    for text in documents:
        counts.update(text)
        n_docs += 1
    counts[SPACE] += counts.pop(" ", 0) + n_docs  # the normalizer's replacement and its prepended ▁
    need = CHARACTER_COVERAGE * sum(counts.values())
    chosen: list[str] = []
    covered = 0
    for char, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if covered >= need or len(chosen) == max_chars:
            break
        chosen.append(char)
        covered += n
    return chosen


def _llama_normalizer() -> normalizers.Normalizer:
    """SentencePiece's: one ``▁`` before the text, every space a ``▁``."""
    return normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])


def _training_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Where learned pieces may not cross.

    Kept in tokenizer.json because short words hit the BPE cache; no merge crosses these splits, so
    whole-text BPE (as in Llama 2's own tokenizer.json) gives the same ids.
    """
    return pre_tokenizers.Sequence(
        [
            # `>` after `<s`, `</s`, `<unk` stands alone, so no learned piece spells a special token.
            pre_tokenizers.Split(Regex(r"(?<=<s|</s|<unk)>"), behavior="isolated"),
            # Words with their leading spaces, runs of trailing spaces, runs of newlines.
            pre_tokenizers.Split(Regex(rf"{SPACE}*[^{SPACE}\n]+|{SPACE}+|\n+"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def _insert_byte_tokens(backend: Backend) -> Backend:
    """Renumber the trained vocabulary as Llama's: specials 0-2, ``<0x00>``..``<0xFF>`` 3-258, then pieces."""
    state = json.loads(backend.to_str())
    trained = state["model"]["vocab"]
    special = {token: i for token, i in trained.items() if i < 3}
    pieces = {token: i + len(BYTE_TOKENS) for token, i in trained.items() if i >= 3}
    # Pieces never contain a digit next to anything, so none can be spelled like a byte token.
    assert not set(pieces) & set(BYTE_TOKENS)
    state["model"]["vocab"] = {**special, **{b: 3 + i for i, b in enumerate(BYTE_TOKENS)}, **pieces}
    return Backend.from_str(json.dumps(state))


def _decoder(strip_prefix: bool) -> decoders.Decoder:
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))  # the ▁ the normalizer prepended
    return decoders.Sequence(steps)


def _bos_template(backend: Backend, bos: str = BOS) -> processors.TemplateProcessing:
    """Llama's post-processor, so Hugging Face ``tok(text)`` starts with BOS; our encode() does not use it."""
    return processors.TemplateProcessing(
        single=f"{bos}:0 $A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, backend.token_to_id(bos))],
    )


def _backend_from_sentencepiece(model_file: Path) -> tuple[Backend, dict[str, str | None]]:
    """Convert a Llama SentencePiece BPE model with transformers, then set SentencePiece's exact pipeline."""
    try:
        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2
        from transformers import LlamaTokenizerFast
    except ImportError as e:
        raise ImportError(
            f"{model_file} is a SentencePiece model; reading it needs transformers, sentencepiece and "
            "protobuf: pip install 'llamita[spm]' (or convert it once to tokenizer.json elsewhere)"
        ) from e
    try:
        proto = spm_pb2.ModelProto.FromString(
            SentencePieceProcessor(model_file=str(model_file)).serialized_model_proto()
        )
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{model_file}: not a readable SentencePiece model ({e})") from e
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != spm_pb2.TrainerSpec.BPE:
        kind = spm_pb2.TrainerSpec.ModelType.Name(trainer.model_type)
        raise ValueError(f"{model_file}: a SentencePiece {kind} model; only BPE models (Llama's) are supported")
    if norm.name != "identity" or norm.remove_extra_whitespaces:
        raise ValueError(
            f"{model_file}: normalization {norm.name!r} (remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}) is not supported; Llama models use 'identity' and keep spaces"
        )
    with tempfile.TemporaryDirectory() as tmp:
        # Alone in a directory, so no stray tokenizer.json or config beside the model changes the conversion.
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        backend = LlamaTokenizerFast.from_pretrained(tmp, legacy=False).backend_tokenizer
    # transformers' Metaspace(prepend_scheme="first") adds no ▁ before a leading space; SentencePiece does.
    replace = normalizers.Replace(" ", SPACE)
    backend.normalizer = (
        normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if norm.add_dummy_prefix else replace
    )
    backend.pre_tokenizer = None
    backend.decoder = _decoder(strip_prefix=norm.add_dummy_prefix)
    tokens = {
        "bos_token": trainer.bos_piece if trainer.bos_id >= 0 else None,
        "eos_token": trainer.eos_piece if trainer.eos_id >= 0 else None,
        "unk_token": trainer.unk_piece if trainer.unk_id >= 0 else None,
    }
    if tokens["bos_token"] is not None:
        backend.post_processor = _bos_template(backend, tokens["bos_token"])
    return backend, tokens


def _read_config(directory: Path) -> dict:
    """Special tokens and ``model_max_length`` from tokenizer_config.json, then special_tokens_map.json."""
    found: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        file = directory / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not valid JSON ({e}); fix or delete it") from e
        for field in ("bos_token", "eos_token", "unk_token"):
            if field in config:
                value = config[field]
                # Older files store {"content": "<s>", "lstrip": ..., ...} (AddedToken), newer a plain string.
                found[field] = value.get("content") if isinstance(value, dict) else value
        if isinstance(config.get("model_max_length"), int) and config["model_max_length"] < 1 << 31:
            found["model_max_length"] = config["model_max_length"]
    return found


def read_chat_template(path: str | Path) -> str | None:
    """The chat template of a tokenizer directory, a ``tokenizer_config.json`` or a ``.jinja`` file, or None.

    A directory's ``chat_template.jinja`` wins over its ``tokenizer_config.json`` (transformers' order). A config
    holding named templates (``[{"name": ..., "template": ...}]``) gives the one named ``default``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the config is not valid JSON, or its ``chat_template`` is neither a string nor has a default.
    """
    path = Path(path)
    if path.is_dir():
        if (path / CHAT_TEMPLATE_FILE).is_file():
            return (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        path = path / "tokenizer_config.json"
        if not path.is_file():
            return None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such chat template or tokenizer_config.json")
    if path.suffix != ".json":
        return path.read_text(encoding="utf-8")
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or delete it") from e
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise ValueError(f"{path}: chat_template names {sorted(map(str, named))} but no 'default'; keep one")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path}: chat_template must be a Jinja string, got {type(template).__name__}")
    return template


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
