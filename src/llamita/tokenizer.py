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
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
"""A byte-fallback token's name, its byte in group 1 (hex)."""
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
        for derived in ("_rendered_backend", "_piece_cache", "_token_bytes"):
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
        digits, newlines) in order, so each distinct piece is BPE-encoded once and the rest is done on whole arrays
        (:class:`_PieceCache`): several times faster than :meth:`encode_batch` on one core. Other pipelines, and the
        rare batch whose pieces' hashes collide, go through :meth:`encode_batch`. Not thread-safe: the cache
        belongs to this tokenizer.

        Args:
            texts: the texts.
            dtype: the ids' dtype; it must hold every id of the vocabulary.
            bos: prepend BOS to each text.
            eos: append EOS to each text.

        Returns:
            ``(ids, counts)``: all ids, and how many of them belong to each text (int64).
        """
        if self._piece_cache is not None:
            encoded = self._piece_cache.encode(texts, dtype, bos, eos)
            if encoded is not None:
                return encoded
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

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to a text, exactly (what logprobs show of a token: OpenAI's ``bytes``).

        A byte-fallback token ``<0xNN>`` is its one byte, maybe a part of a character; SentencePiece's ``▁`` is a
        space, so a word's token starts with its space (the one a decoder drops at the start of a text); a
        byte-level (GPT-2 style) token is the bytes its characters stand for; a special or added token is its
        string. So the bytes of ``encode(text)`` joined are the UTF-8 of the text the model reads: with Llama's
        normalizer, a space and the text.

        Raises:
            ValueError: ``token_id`` is outside the vocabulary.
        """
        return self._token_bytes(int(token_id))

    @functools.cached_property
    def _token_bytes(self) -> _TokenBytes:
        return _TokenBytes(self._backend)

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
    """The ids of texts piece by piece, each distinct piece BPE-encoded once, the rest done by numpy.

    A text normalized as Llama's normalizer does (a ``▁`` before it, every space a ``▁``) is cut into runs of ``▁``
    with what follows them up to the next ``▁``, newline or ASCII digit; runs of ``▁`` alone; single digits; runs
    of newlines. The pre-tokenizer of :func:`train_tokenizer` cuts there too (and maybe within: ``>`` after ``<s``,
    other numerals), and no merge makes a token across these cuts (:attr:`ACROSS`; what lets Llama 2's BPE, with no
    pre-tokenizer, take this cache too). So the ids of a text are those of its pieces in order, each computed alone
    by the tokenizer's own pre-tokenizer and model.

    Python does nothing per piece but for a new one. A batch of texts becomes windows of UTF-8 of about
    :attr:`WINDOW_BYTES`, a space standing for ``▁`` (the normalizer makes both ``▁``), and each window is worked
    on as whole arrays: where pieces start is a few comparisons of neighbouring bytes (:func:`_piece_starts`); each
    piece gets a polynomial hash from prefix sums, and a hash table in numpy (:class:`_HashRows`) its row. A new
    piece's ids come from the BPE model itself (``model.tokenize``, without the offsets an ``encode`` tracks),
    through the pre-tokenizer first when it may cut the piece (one holding ``>`` or a byte beyond ASCII). Then
    every piece's bytes are compared with those its row holds, so that a hash collision cannot change an id (the
    batch is then left to the whole pipeline). Last, the ids of all rows are gathered at once, with a separator row
    (ids EOS then BOS) between texts.

    Args:
        backend: the tokenizer's pipeline.
        bos_id: id of BOS, for the texts asked with it.
        eos_id: id of EOS.
        max_pieces: the cache is emptied when it holds more pieces than this, so memory stays bounded.
    """

    ACROSS = re.compile(f"[^{SPACE}]{SPACE}|[^\\n]\\n|\\n[^\\n]|[0-9].|.[0-9]", re.DOTALL)
    """A token containing one of these spans a cut between pieces."""
    WINDOW_BYTES = 1 << 17
    """Text worked on at once (some 30 bytes of arrays per byte); a longer text is cut before a space."""
    _LONG_TEXT_CUT = re.compile(rb"[^ ] ")  # a space after another byte always starts a piece
    _HASH_BASE = 0x100000001B3  # odd, so that its powers are invertible modulo 2**64
    _HASH_LENGTH = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, backend: Backend, bos_id: int, eos_id: int, max_pieces: int) -> None:
        self._model = backend.model
        self._pre_tokenizer = backend.pre_tokenizer
        self._specials = (eos_id, bos_id)
        self._max_pieces = max_pieces
        self._powers = self._inverse_powers = np.empty(0, dtype=np.uint64)
        self._clear()

    @property
    def pieces(self) -> int:
        """How many distinct pieces the cache holds."""
        return self._n_rows - 1

    def _clear(self) -> None:
        # Row r: ids _flat[_start[r] : _start[r] + _len[r]], UTF-8 _bytes[_byte_start[r] : ... + _byte_len[r]].
        # Row 0 is the separator, its ids [EOS, BOS] at _flat[0:2]. The arrays grow by doubling.
        self._rows = _HashRows()
        self._n_rows, self._n_ids, self._n_bytes = 1, 2, 0
        self._start, self._len = np.zeros(1024, dtype=np.int64), np.zeros(1024, dtype=np.int64)
        self._byte_start, self._byte_len = np.zeros(1024, dtype=np.int64), np.zeros(1024, dtype=np.int64)
        self._flat, self._bytes = np.zeros(4096, dtype=np.uint32), np.zeros(4096, dtype=np.uint8)
        self._flat[:2] = self._specials

    def encode(
        self, texts: Sequence[str], dtype: np.dtype | type, bos: bool, eos: bool
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """As :meth:`Tokenizer.encode_concat`, or None after a hash collision (the cache stays valid)."""
        if self.pieces > self._max_pieces:
            self._clear()
        windows = [self._window_rows(data, text_starts) for data, text_starts in self._windows(texts)]
        if any(rows is None for rows in windows):
            return None
        rows = np.concatenate([*windows, [0]])  # a separator before each text and after the last
        # The separator's ids this time: EOS ending the text before it, then BOS starting the next.
        self._start[0], self._len[0] = int(not eos), int(eos) + int(bos)
        # Gather: the ids of row rows[k] land at ends[k] - lens[k] onward.
        lens = self._len[rows]
        ends = np.cumsum(lens)
        ids = self._flat[np.repeat(self._start[rows] - (ends - lens), lens) + np.arange(ends[-1])]
        # A text's ids (its BOS to its EOS) run from its separator's BOS to the next separator's.
        counts = np.diff(ends[rows == 0])
        return ids[int(eos) : len(ids) - int(bos)].astype(dtype), counts

    def _windows(self, texts: Sequence[str]) -> Iterator[tuple[bytes, list[int]]]:
        """``(UTF-8, the offsets in it where texts start)`` for windows of the normalized texts.

        A non-empty text gets a space before it, Llama's prepended ``▁`` (nothing is prepended to an empty text).
        """
        window: list[bytes] = []
        text_starts: list[int] = []
        size = 0
        for text in texts:
            text_starts.append(size)
            data = (" " + (text.replace(SPACE, " ") if SPACE in text else text)).encode() if text else b""
            done = 0
            while size + len(data) - done > self.WINDOW_BYTES:
                cut = self._LONG_TEXT_CUT.search(data, done + max(0, self.WINDOW_BYTES - size - 1))
                if cut is None:
                    break
                window.append(data[done : cut.start() + 1])
                yield b"".join(window), text_starts
                window, text_starts, size, done = [], [], 0, cut.start() + 1
            window.append(data[done:] if done else data)
            size += len(window[-1])
            if size >= self.WINDOW_BYTES:
                yield b"".join(window), text_starts
                window, text_starts, size = [], [], 0
        if window:
            yield b"".join(window), text_starts

    def _window_rows(self, raw: bytes, text_starts: list[int]) -> np.ndarray | None:
        """The rows of one window's pieces, a separator (row 0) before each text; None after a hash collision."""
        data = np.frombuffer(raw, dtype=np.uint8)  # [n]
        starts = _piece_starts(data, text_starts)  # [p]
        ends = np.append(starts[1:], len(data))
        hashes = self._hashes(data, starts, ends)
        rows = self._rows.find(hashes)
        new = np.flatnonzero(rows < 0)
        if len(new):
            keys, first, inverse = np.unique(hashes[new], return_index=True, return_inverse=True)
            added = self._add([raw[s:e] for s, e in zip(starts[new[first]].tolist(), ends[new[first]].tolist())])
            self._rows.add(keys, added)
            rows[new] = added[inverse.reshape(-1)]
        # Each piece's bytes against its row's: equal hashes are no proof.
        lens = ends - starts
        if not np.array_equal(self._byte_len[rows], lens):
            return None
        at = np.repeat(self._byte_start[rows] - starts, lens)
        at += np.arange(len(data))
        if not np.array_equal(self._bytes[at], data):
            return None
        return np.insert(rows, np.searchsorted(starts, text_starts), 0)

    def _hashes(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Of each piece ``data[s:e]``: the sum of ``byte * base**k`` over its bytes (k from 0), plus its length times
        a constant, modulo 2**64 (as uint64 arithmetic wraps).

        All at once from the prefix sums of ``data[i] * base**i``: a piece's sum is ``(prefix[e] - prefix[s]) *
        base**-s``.
        """
        if len(data) > len(self._powers):
            size = max(self.WINDOW_BYTES, 1 << (len(data) - 1).bit_length())
            self._powers = _powers(self._HASH_BASE, size)
            self._inverse_powers = _powers(pow(self._HASH_BASE, -1, 2**64), size)
        prefix = np.zeros(len(data) + 1, dtype=np.uint64)
        np.multiply(data, self._powers[: len(data)], out=prefix[1:])
        np.cumsum(prefix[1:], out=prefix[1:])
        lengths = (ends - starts).astype(np.uint64)
        return (prefix[ends] - prefix[starts]) * self._inverse_powers[starts] + lengths * self._HASH_LENGTH

    def _add(self, pieces: list[bytes]) -> np.ndarray:
        """Give ``pieces`` new rows holding their ids and bytes; returns the rows."""
        tokenize, may_cut = self._model.tokenize, self._pre_tokenizer is not None
        texts = [piece.decode().replace(" ", SPACE) for piece in pieces]
        tokens = [
            self._word_tokens(text) if may_cut and (b">" in piece or not piece.isascii()) else tokenize(text)
            for piece, text in zip(pieces, texts, strict=True)
        ]
        lens = np.fromiter(map(len, tokens), np.int64, len(pieces))
        byte_lens = np.fromiter(map(len, pieces), np.int64, len(pieces))
        first, stop = self._n_rows, self._n_rows + len(pieces)
        begin, end = self._n_ids, self._n_ids + int(lens.sum())
        byte_begin, byte_end = self._n_bytes, self._n_bytes + int(byte_lens.sum())
        self._start, self._len = _grown(self._start, stop), _grown(self._len, stop)
        self._byte_start, self._byte_len = _grown(self._byte_start, stop), _grown(self._byte_len, stop)
        self._flat, self._bytes = _grown(self._flat, end), _grown(self._bytes, byte_end)
        self._start[first:stop], self._len[first:stop] = begin + np.cumsum(lens) - lens, lens
        self._byte_start[first:stop] = byte_begin + np.cumsum(byte_lens) - byte_lens
        self._byte_len[first:stop] = byte_lens
        self._flat[begin:end] = [token.id for piece_tokens in tokens for token in piece_tokens]
        self._bytes[byte_begin:byte_end] = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        self._n_rows, self._n_ids, self._n_bytes = stop, end, byte_end
        return np.arange(first, stop)

    def _word_tokens(self, piece: str) -> list:
        """The model's tokens of the words the pre-tokenizer cuts ``piece`` into."""
        words = [word for word, _ in self._pre_tokenizer.pre_tokenize_str(piece)]
        return [token for word in words for token in self._model.tokenize(word)]


def _powers(base: int, size: int) -> np.ndarray:
    """``base**i`` modulo 2**64 for ``i < size``."""
    steps = np.full(size, base, dtype=np.uint64)
    steps[:1] = 1
    return np.cumprod(steps)


def _piece_starts(data: np.ndarray, text_starts: list[int]) -> np.ndarray:
    """Where the pieces of ``data`` (normalized UTF-8, spaces for ``▁``) start: at each ASCII digit, at the first of
    a run of spaces or of newlines, at the first byte of a word (the rest, multi-byte characters too) unless spaces
    come before it, and where a text starts."""
    space, newline = data == ord(" "), data == ord("\n")
    digit = data - ord("0") < 10  # the bytes below "0" wrap around
    word = ~(space | newline | digit)
    first = digit.copy()
    first[1:] |= (space[1:] & ~space[:-1]) | (newline[1:] & ~newline[:-1]) | (word[1:] & ~(word[:-1] | space[:-1]))
    first[:1] = True
    first[np.array([s for s in text_starts if s < len(data)], dtype=np.int64)] = True
    return np.flatnonzero(first)


class _HashRows:
    """uint64 key -> row, for whole arrays of keys at once: open addressing with linear probing, in numpy.

    A key's first slot is the top bits of ``key * 2**64 / golden ratio`` (Fibonacci hashing); the table doubles
    when it is half full, so that probes stay short. Key 0 marks an empty slot, so it is stored as 1: keys 0 and 1
    share a row, which a caller that cannot tell them apart must check.
    """

    _FIBONACCI = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, bits: int = 16) -> None:
        self._bits, self._held = bits, 0
        self._keys = np.zeros(1 << bits, dtype=np.uint64)
        self._rows = np.zeros(1 << bits, dtype=np.int64)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key, -1 where absent."""
        keys = np.maximum(keys, np.uint64(1))
        slots = self._slots(keys)
        held = self._keys[slots]
        found = np.where(held == keys, self._rows[slots], -1)
        todo = np.flatnonzero((held != keys) & (held != 0))  # in another key's slot: look on in the next ones
        while len(todo):
            slots[todo] = (slots[todo] + 1) & (len(self._keys) - 1)
            held = self._keys[slots[todo]]
            hit = held == keys[todo]
            found[todo[hit]] = self._rows[slots[todo[hit]]]
            todo = todo[(held != keys[todo]) & (held != 0)]
        return found

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Add distinct keys that are not in the table yet."""
        self._held += len(keys)
        if 2 * self._held > len(self._keys):
            held = self._keys != 0
            old_keys, old_rows, bits = self._keys[held], self._rows[held], (2 * self._held).bit_length()
            self._bits, self._keys, self._rows = bits, np.zeros(1 << bits, np.uint64), np.zeros(1 << bits, np.int64)
            self._place(old_keys, old_rows)
        self._place(np.maximum(keys, np.uint64(1)), rows)

    def _place(self, keys: np.ndarray, rows: np.ndarray) -> None:
        slots = self._slots(keys)
        while len(keys):
            free = np.flatnonzero(self._keys[slots] == 0)
            self._keys[slots[free]] = keys[free]  # of the keys wanting one free slot, one gets it; the others move on
            placed = np.zeros(len(keys), dtype=bool)
            placed[free] = self._keys[slots[free]] == keys[free]
            self._rows[slots[placed]] = rows[placed]
            keys, rows, slots = keys[~placed], rows[~placed], (slots[~placed] + 1) & (len(self._keys) - 1)

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * self._FIBONACCI) >> np.uint64(64 - self._bits)).astype(np.int64)


class _TokenBytes:
    """Each token's bytes (:meth:`Tokenizer.token_bytes`), worked out once per token from the pipeline's model and
    decoder.

    Added and special tokens are their strings; with the model's ``byte_fallback``, ``<0xNN>`` is byte NN; with a
    byte-level decoder each character of a token stands for one byte (GPT-2's table, :func:`_byte_level_bytes`).
    Any other token is what the decoder makes of it after an anchor token, less the anchor's text: the decoder's
    own rules (``▁`` as a space, WordPiece's ``##``), without the strip it applies at the start of a text.

    Args:
        backend: the tokenizer's pipeline.
    """

    def __init__(self, backend: Backend) -> None:
        state = json.loads(backend.to_str())
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._byte_fallback = bool(state["model"].get("byte_fallback"))
        self._byte_level = "ByteLevel" in _decoder_types(state["decoder"])
        self._known = {i: t.content.encode("utf-8") for i, t in backend.get_added_tokens_decoder().items()}
        anchor_id = next((i for i in backend.encode("a", add_special_tokens=False).ids if i not in self._known), None)
        self._anchor = None if anchor_id is None else backend.id_to_token(anchor_id)

    def __call__(self, token_id: int) -> bytes:
        known = self._known.get(token_id)
        if known is None:
            known = self._known[token_id] = self._of(token_id)
        return known

    def _of(self, token_id: int) -> bytes:
        token = self._backend.id_to_token(token_id) if 0 <= token_id < self._vocab_size else None
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary 0..{self._vocab_size - 1}")
        byte = BYTE_TOKEN.fullmatch(token) if self._byte_fallback else None
        if byte is not None:
            return bytes([int(byte.group(1), 16)])
        if self._byte_level:
            table = _byte_level_bytes()
            return bytes(table[c] for c in token) if all(c in table for c in token) else token.encode("utf-8")
        decoder = self._backend.decoder
        if decoder is None or self._anchor is None:  # tokens decode as themselves (joined by spaces)
            return token.encode("utf-8")
        return decoder.decode([self._anchor, token])[len(decoder.decode([self._anchor])) :].encode("utf-8")


def _decoder_types(decoder: dict | None) -> list[str]:
    """The types of a serialized decoder and of the steps of a ``Sequence`` one."""
    if decoder is None:
        return []
    return [decoder["type"]] + [t for step in decoder.get("decoders", []) for t in _decoder_types(step)]


@functools.cache
def _byte_level_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the others (control
    characters, space, 0x7F-0xA0, 0xAD) for U+0100 onward in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


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
