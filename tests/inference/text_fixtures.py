"""Tokenizers for the text and server tests: llamita's byte-fallback BPE and a GPT-2-style byte-level BPE, both
trained here on a small corpus with accents, CJK, emoji and characters they never saw (split into byte tokens);
random id sequences whose bytes are valid UTF-8; and a tiny chat model checkpoint (a Hugging Face directory with
the zephyr template)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from llamita.tokenizer import Tokenizer

WORDS = (
    "the river model token data loss value list return string café naïve déjà Größe señor 東京 日本語 中文 "
    "مرحبا שלום → ≥ 😀 🦙"
).split()
UNSEEN = ["𝔘𝔫𝔦", "ꙮ", "∮", "€", "🇫🇷", "ñandú", "Ærø"]
"""Characters (mostly) outside the training text: encoded as byte tokens, one UTF-8 character over several ids."""


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 16))) + rng.choice([".", "!", "\n", " 42."]) for _ in range(n)]


def llama_tokenizer(directory: Path) -> Tokenizer:
    """llamita's own tokenizer (byte fallback, SentencePiece's leading ▁), trained on `corpus`."""
    from llamita.tokenizer import train_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "corpus.txt"
    text.write_text("\n".join(corpus()), encoding="utf-8")
    return train_tokenizer([text], 420)


def byte_level_tokenizer() -> Tokenizer:
    """A GPT-2-style byte-level BPE on `corpus`: its merges cut characters between tokens anywhere."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(corpus(), trainer)
    return Tokenizer(backend)


def random_ids(tokenizer: Tokenizer, rng: random.Random, pieces: int) -> list[int]:
    """Ids of random text (words, characters split into bytes, spaces, newlines), random whole tokens and special
    tokens mixed in: any cut between them may split a character, and the bytes of all of them are valid UTF-8."""
    whole = _whole_tokens(tokenizer)
    ids: list[int] = []
    for _ in range(pieces):
        r = rng.random()
        if r < 0.08:
            ids.append(rng.choice([tokenizer.bos_id, tokenizer.eos_id]))
        elif r < 0.3:
            ids.append(rng.choice(whole))
        else:
            ids += tokenizer.encode(rng.choice(["", " ", "  ", "\n"]) + rng.choice(WORDS + UNSEEN))
    return ids


def _whole_tokens(tokenizer: Tokenizer) -> list[int]:
    """Ids whose own text is whole characters."""
    ids = []
    for i in range(tokenizer.vocab_size):
        text = tokenizer.decode([i])
        if text and "\ufffd" not in text:
            ids.append(i)
    return ids


def write_chat_model(directory: Path, tokenizer: Tokenizer, max_seq_len: int = 4096, seed: int = 0) -> Path:
    """A tiny random Llama with `tokenizer` and the zephyr chat template, as a Hugging Face directory.

    Its weights are larger than an initialisation's, so its greedy text wanders over the vocabulary (with wide
    gaps between the best logits: batched and lone decoding pick the same tokens).
    """
    from llamita.chat.templates import ZEPHYR
    from llamita.interop.checkpoint_io import weight_names
    from llamita.interop.hf import write_hf
    from llamita.model import Llama, ModelConfig

    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
        max_seq_len=max_seq_len,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.ndim == 2:
                weight.normal_(0.0, 0.3)
    state = model.state_dict()

    class Weights:
        model_config = config
        names = weight_names(config)

        @staticmethod
        def load(name: str) -> torch.Tensor:
            return state[name]

    tokenizer.chat_template = ZEPHYR
    return write_hf(directory, Weights(), tokenizer)
