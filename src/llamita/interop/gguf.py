"""llama.cpp's format: export a llamita checkpoint as one GGUF file (f16, q8_0 or q4_0), with its tokenizer.

Written with the `gguf` package (llama.cpp's gguf-py, the `gguf` extra). Three things differ from the Hugging Face
layout:

* Names: ``token_embd``, ``blk.N.attn_q`` ... ``output`` instead of transformers' module paths.
* RoPE: llama.cpp's Llama rotates adjacent pairs (x0, x1), (x2, x3), ...; llamita, like transformers, rotates
  x[i] with x[i + head_dim / 2]. Reordering the rows of each q and k head (`interleave_rope_rows`) turns one into
  the other, as llama.cpp's own converter does.
* Tokenizer: llamita's tokenizers are Llama-style BPE with byte fallback and ``▁`` for spaces, the vocabulary
  shape of SentencePiece. They are written as llama.cpp's "llama" (SentencePiece) tokenizer, which merges the
  adjacent pair whose result scores highest; scoring each token by minus the rank of the BPE merge that creates
  it makes that follow the BPE merge order.

The file is written in two passes over the checkpoint's metadata and then its tensors, one tensor at a time.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from llamita.interop.checkpoint_io import model_shapes, open_checkpoint
from llamita.model import ModelConfig
from llamita.tokenizer import BYTE_TOKEN, Tokenizer

if TYPE_CHECKING:
    import gguf

QUANT_TYPES = ("f16", "q8_0", "q4_0")
"""`--dtype` choices of `export gguf`."""
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


class GGUFExportError(ValueError):
    """A checkpoint that llama.cpp's Llama cannot represent (its tokenizer, say); the message says why."""


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export needs the gguf package: pip install 'llamita[gguf]'") from e
    return gguf


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name of a llamita tensor: ``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise KeyError(f"no GGUF name for tensor {name!r}")
    return f"blk.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"


def interleave_rope_rows(weight: Tensor, n_heads: int) -> Tensor:
    """Reorder a q_proj / k_proj weight's rows from rotate-half RoPE pairs to llama.cpp's adjacent pairs.

    Within each head, output row i < head_dim / 2 (paired with i + head_dim / 2) moves to row 2i and its partner
    to row 2i + 1.

    Args:
        weight: [n_heads * head_dim, dim].
        n_heads: query heads for q_proj, key/value heads for k_proj.

    Returns:
        [n_heads * head_dim, dim] with rows reordered.
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)  # [H * hd, D]


def deinterleave_rope_rows(weight: Tensor, n_heads: int) -> Tensor:
    """The inverse of `interleave_rope_rows`: llama.cpp's row order back to rotate-half (transformers') order."""
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)  # [H * hd, D]


@dataclass(frozen=True)
class _Plan:
    """How one tensor is written: its GGUF name, numpy shape, stored type and byte count."""

    source: str
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    nbytes: int


def _storage_type(gguf_name: str, shape: torch.Size, quant: str, tied: bool) -> gguf.GGMLQuantizationType:
    """The GGML type a tensor is stored as, by llama.cpp's rules.

    1-D tensors (norms) stay f32. f16 files hold every matrix in f16; q8_0 files every matrix in q8_0 (as
    llama.cpp's converter writes them). q4_0 files follow llama-quantize in giving the output head (the embedding
    when tied, since it serves as the head) more bits: it asks for q6_K, which gguf-py cannot write, so q8_0.
    A matrix whose rows do not split into whole 32-value blocks cannot be quantized and stays f16.
    """
    gguf = _import_gguf()
    T = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return T.F32
    if quant == "f16":
        return T.F16
    qtype = T.Q8_0 if quant == "q8_0" else T.Q4_0
    if quant == "q4_0" and (gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")):
        qtype = T.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else T.F16


def _plan(config: ModelConfig, names: list[str], quant: str) -> list[_Plan]:
    gguf = _import_gguf()
    shapes = model_shapes(config)
    plans = []
    for source in names:
        name = gguf_tensor_name(source)
        shape = tuple(shapes[source])
        qtype = _storage_type(name, shapes[source], quant, config.tie_embeddings)
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * type_bytes
        plans.append(_Plan(source, name, shape, qtype, nbytes))
    return plans


def _tensor_data(plan: _Plan, tensor: Tensor, config: ModelConfig) -> np.ndarray:
    """One tensor in llama.cpp's row order and storage type, as the bytes (or array) GGUF stores."""
    gguf = _import_gguf()
    if plan.source.endswith("q_proj.weight"):
        tensor = interleave_rope_rows(tensor, config.n_heads)
    elif plan.source.endswith("k_proj.weight"):
        tensor = interleave_rope_rows(tensor, config.n_kv_heads)
    data = tensor.to(torch.float32).numpy()
    T = gguf.GGMLQuantizationType
    if plan.qtype == T.F32:
        return data
    if plan.qtype == T.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, plan.qtype)


def _file_type(quant: str) -> int:
    gguf = _import_gguf()
    return {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[quant]


# ------------------------------------------------------------------------------------------ tokenizer
@dataclass
class GGUFVocab:
    """A tokenizer as llama.cpp's "llama" (SentencePiece) vocabulary: one entry per token id."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int | None
    chat_template: str | None


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """The SentencePiece-style vocabulary of a Llama-style byte-fallback BPE tokenizer.

    Args:
        tokenizer: the run's tokenizer.
        vocab_size: the model's embedding rows; ids past the tokenizer's are written as unused ``[PAD<id>]``.

    Raises:
        GGUFExportError: the tokenizer is not a byte-fallback BPE over ``▁``-joined words (a GPT-2 style byte-level
            tokenizer, say), which llama.cpp's "llama" tokenizer would encode differently.
    """
    gguf = _import_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    normalizer = json.dumps(spec.get("normalizer"), ensure_ascii=False)
    if model.get("type") != "BPE" or not model.get("byte_fallback") or "▁" not in normalizer:
        raise GGUFExportError(
            "GGUF export supports Llama-style tokenizers (BPE with byte fallback, spaces as ▁), as "
            "`llamita train-tokenizer` and Llama 2's tokenizer.model give; this one is "
            f"{model.get('type')} with byte_fallback={model.get('byte_fallback')}"
        )
    by_id: dict[int, str] = {i: token for token, i in model["vocab"].items()}
    special: set[int] = set()
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings")
    # A token's score is minus the rank of the first merge producing it: llama.cpp then merges in BPE's order.
    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    T = gguf.TokenType
    control = {tokenizer.bos_id, tokenizer.eos_id} | (special - {tokenizer.unk_id})
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1e9)
            types.append(T.UNUSED)
            continue
        tokens.append(token)
        scores.append(-float(rank[token]) if token in rank else 0.0)
        if i == tokenizer.unk_id:
            types.append(T.UNKNOWN)
        elif i in control:
            types.append(T.CONTROL)
        elif BYTE_TOKEN.fullmatch(token):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    return GGUFVocab(
        tokens,
        scores,
        [int(t) for t in types],
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.unk_id,
        tokenizer.chat_template,
    )


def _write_metadata(writer: gguf.GGUFWriter, config: ModelConfig, vocab: GGUFVocab, quant: str, name: str) -> None:
    gguf = _import_gguf()
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    if vocab.unk_id is not None:
        writer.add_unk_token_id(vocab.unk_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)  # the ▁ that llamita's normalizer prepends
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def export_gguf(checkpoint: str | Path, out: str | Path, dtype: str = "f16", *, force: bool = False) -> Path:
    """Write a llamita checkpoint as a GGUF file that llama.cpp loads, tokenizer included.

    Args:
        checkpoint: a run directory (its latest checkpoint) or one checkpoint folder.
        out: the .gguf file to write.
        dtype: f16, q8_0 or q4_0 for the matrices (norms stay f32; see `_storage_type` for the exceptions).
        force: replace `out` if it exists.

    Returns:
        `out` as a Path.

    Raises:
        llamita.train.checkpoint.CheckpointError: no checkpoint at `checkpoint`, or its tokenizer copy is missing.
        ValueError: an unknown dtype.
        GGUFExportError: a tokenizer that llama.cpp's Llama tokenizer cannot reproduce.
        ImportError: the gguf package is not installed.
        FileExistsError: `out` exists and `force` is off.
    """
    if dtype not in QUANT_TYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(QUANT_TYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out, or pass --force to replace it")
    gguf = _import_gguf()
    source = open_checkpoint(checkpoint)
    config = source.model_config
    vocab = gguf_vocab(source.tokenizer(), config.vocab_size)
    plans = _plan(config, source.names, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, "llama")
    _write_metadata(writer, config, vocab, dtype, name=source.folder.parent.parent.name)
    # Pass 1: every tensor's name, shape and size, so the header is complete before any data is read.
    for p in plans:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # Pass 2: the data, in the same order, one tensor in memory at a time.
    for p in plans:
        data = _tensor_data(p, source.load(p.source), config)
        assert data.nbytes == p.nbytes, (p.name, data.nbytes, p.nbytes)
        writer.write_tensor_data(data)
    writer.close()
    return out
