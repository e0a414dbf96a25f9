"""GGUF export, read back with gguf-py's reader: metadata, vocabulary and (de)quantised tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llamita.cli import main
from llamita.interop import export_gguf
from llamita.interop.gguf import deinterleave_rope_rows, gguf_tensor_name, interleave_rope_rows
from llamita.model.llama import apply_rope, rope_tables
from llamita.pretrained import load_pretrained
from llamita.train import checkpoint as ckpt

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(trained_run, root / f"model-{q}.gguf", q) for q in ("f16", "q8_0", "q4_0")}


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def dequantized(reader: gguf.GGUFReader) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]:
    """Name -> (stored type, float32 array in numpy shape)."""
    return {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


def reference_tensors(run: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under their GGUF names, q and k rows un-interleaved back to rotate-half order."""
    pre = load_pretrained(run)
    out = {}
    for name, tensor in pre.model.state_dict().items():
        if pre.model_config.tie_embeddings and name == "lm_head.weight":
            continue
        out[gguf_tensor_name(name)] = tensor.numpy()
    return out


def unpermute(name: str, array: np.ndarray, config) -> np.ndarray:
    if name.endswith("attn_q.weight"):
        return deinterleave_rope_rows(torch.from_numpy(array), config.n_heads).numpy()
    if name.endswith("attn_k.weight"):
        return deinterleave_rope_rows(torch.from_numpy(array), config.n_kv_heads).numpy()
    return array


def test_metadata_describes_the_model_and_tokenizer(trained_run, exports):
    pre = load_pretrained(trained_run)
    c = pre.model_config
    reader = gguf.GGUFReader(exports["f16"])
    expected = {
        "general.architecture": "llama",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "llama.context_length": c.max_seq_len,
        "llama.embedding_length": c.dim,
        "llama.block_count": c.n_layers,
        "llama.feed_forward_length": c.intermediate_size,
        "llama.rope.dimension_count": c.head_dim,
        "llama.attention.head_count": c.n_heads,
        "llama.attention.head_count_kv": c.n_kv_heads,
        "llama.vocab_size": c.vocab_size,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": pre.tokenizer.bos_id,
        "tokenizer.ggml.eos_token_id": pre.tokenizer.eos_id,
        "tokenizer.ggml.unknown_token_id": pre.tokenizer.unk_id,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps)
    assert field(reader, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert field(gguf.GGUFReader(exports["q8_0"]), "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)

    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    scores = field(reader, "tokenizer.ggml.scores")
    assert len(tokens) == len(types) == len(scores) == c.vocab_size
    T = gguf.TokenType
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and tokens[258] == "<0xFF>"
    assert types[:3] == [T.UNKNOWN, T.CONTROL, T.CONTROL] and set(types[3:259]) == {T.BYTE}
    assert set(types[259 : pre.tokenizer.vocab_size]) == {T.NORMAL}
    for text in ("▁the", "▁model", "▁return"):
        (i,) = pre.tokenizer.encode(text.replace("▁", " ").lstrip(" "))
        assert tokens[i] == text
    # Learned pieces are scored by merge order, so llama.cpp's highest-score-first merging follows BPE's ranks.
    merged = [s for s, t in zip(scores, types) if t == T.NORMAL and s < 0]
    assert merged == sorted(merged, reverse=True) and len(merged) > 50


def spm_encode(text: str, ids: dict[str, int], scores: list[float]) -> list[int]:
    """llama.cpp's "llama" tokenizer (llm_tokenizer_spm_session), restated: merge the adjacent pair whose merged
    text is a token of the highest score (leftmost on ties) until none is; spell leftovers as byte tokens."""
    symbols = list(("▁" + text).replace(" ", "▁"))  # add_space_prefix, then spaces escaped
    while True:
        best = None
        for i in range(len(symbols) - 1):
            token = ids.get(symbols[i] + symbols[i + 1])
            if token is not None and (best is None or scores[token] > best[0]):
                best = (scores[token], i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    out = []
    for symbol in symbols:
        out += [ids[symbol]] if symbol in ids else [ids[f"<0x{b:02X}>"] for b in symbol.encode()]
    return out


def test_llama_cpp_tokenizer_algorithm_on_the_exported_vocabulary_gives_llamita_ids(trained_run, exports, prepared):
    """The exported scores make llama.cpp's score-ordered merging reproduce llamita's BPE (test_llamacpp.py runs
    llama.cpp itself where llama-cpp-python is installed)."""
    tokenizer = load_pretrained(trained_run).tokenizer
    reader = gguf.GGUFReader(exports["f16"])
    tokens, scores = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.scores")
    ids = {token: i for i, token in enumerate(tokens)}
    root = prepared["tokenizer"].parent
    texts = [json.loads(line)["text"] for name in ("prose", "code") for line in (root / f"{name}.jsonl").open()]
    texts += ["  two  spaces\n\n\ttab ", "ünïcödé 日本語 ☃", "x=1234567"]
    for text in texts[::5]:
        assert spm_encode(text, ids, scores) == tokenizer.encode(text), text


def test_f16_tensors_equal_the_fp16_checkpoint_after_unpermuting(trained_run, exports):
    config = load_pretrained(trained_run).model_config
    reference = reference_tensors(trained_run)
    stored = dequantized(gguf.GGUFReader(exports["f16"]))
    assert sorted(stored) == sorted(reference)
    assert "output.weight" in stored  # the debug preset's head is untied
    for name, (qtype, array) in stored.items():
        want = reference[name]
        if want.ndim == 1:
            assert qtype == gguf.GGMLQuantizationType.F32 and np.array_equal(array, want), name
        else:
            assert qtype == gguf.GGMLQuantizationType.F16, name
            assert np.array_equal(unpermute(name, array, config), want.astype(np.float16).astype(np.float32)), name


@pytest.mark.parametrize(("quant", "levels", "max_steps"), [("q8_0", 127, 0.57), ("q4_0", 8, 1.01)])
def test_quantized_tensors_are_within_their_quantization_error(trained_run, exports, quant, levels, max_steps):
    """Each 32-value block has a scale d = max|x| / levels; q8_0 rounds to the nearest multiple of d (half a step,
    plus the fp16 rounding of d over 127 levels), q4_0 uses levels -8..7 so its largest value may be one step off.
    """
    config = load_pretrained(trained_run).model_config
    reference = reference_tensors(trained_run)
    stored = dequantized(gguf.GGUFReader(exports[quant]))
    T = gguf.GGMLQuantizationType
    qtype = T.Q8_0 if quant == "q8_0" else T.Q4_0
    types = {name: stored_type for name, (stored_type, _) in stored.items()}
    # The debug preset's MLP width (172) is no multiple of the 32-value block: down_proj's rows stay f16.
    assert types["blk.0.ffn_down.weight"] == T.F16 and types["blk.0.attn_norm.weight"] == T.F32
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == types["token_embd.weight"] == qtype
    assert types["output.weight"] == T.Q8_0  # as llama-quantize, the head gets more bits than q4_0
    for name, (stored_type, array) in stored.items():
        if stored_type != qtype:
            continue
        want = reference[name]
        blocks = want.reshape(want.shape[0], -1, 32)  # [rows, blocks, 32]
        step = np.abs(blocks).max(-1, keepdims=True) / levels  # [rows, blocks, 1]
        error = np.abs(unpermute(name, array, config).reshape(blocks.shape) - blocks)  # [rows, blocks, 32]
        assert (error <= max_steps * step + 1e-8).all(), name
        assert error.max() > 0, name  # it really was quantized


def test_rope_interleaving_maps_rotate_half_to_adjacent_pairs():
    """Adjacent-pair RoPE on the interleaved projection equals the interleaved rotate-half RoPE of the original."""
    n_heads, head_dim, dim, seq = 3, 8, 12, 5
    weight = torch.randn(n_heads * head_dim, dim)
    x = torch.randn(seq, dim)
    cos, sin = rope_tables(head_dim, seq, 10000.0)  # [seq, hd]; both halves hold the same angles
    q = (x @ weight.T).view(seq, n_heads, head_dim).transpose(0, 1)  # [H, seq, hd]
    ours = apply_rope(q[None], cos, sin)[0]  # [H, seq, hd], rotate-half order
    ours_interleaved = ours.view(n_heads, seq, 2, head_dim // 2).transpose(-1, -2).reshape(n_heads, seq, head_dim)

    p = (x @ interleave_rope_rows(weight, n_heads).T).view(seq, n_heads, head_dim // 2, 2).transpose(0, 1)
    c, s = cos[:, : head_dim // 2], sin[:, : head_dim // 2]  # [seq, hd/2]: angle of pair i
    even, odd = p[..., 0], p[..., 1]  # [H, seq, hd/2] each
    theirs = torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).reshape(n_heads, seq, head_dim)
    torch.testing.assert_close(theirs, ours_interleaved)
    assert torch.equal(deinterleave_rope_rows(interleave_rope_rows(weight, n_heads), n_heads), weight)


def test_tied_model_has_no_output_tensor(hf_model_dir, tmp_path):
    from llamita.interop import import_hf

    import_hf(hf_model_dir(tied=True), tmp_path / "run")
    reader = gguf.GGUFReader(export_gguf(tmp_path / "run", tmp_path / "tied.gguf", "q4_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types and "token_embd.weight" in types
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0  # it serves as the head
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_0


def test_cli_export_gguf_and_missing_checkpoint(trained_run, tmp_path, capsys):
    main(["export", "gguf", "--checkpoint", str(trained_run), "--out", str(tmp_path / "m.gguf"), "--dtype", "q8_0"])
    assert "GGUF" in capsys.readouterr().out and (tmp_path / "m.gguf").stat().st_size > 0
    with pytest.raises(ckpt.CheckpointError, match="no such run directory"):
        export_gguf(tmp_path / "nowhere", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_tokenizer_llama_cpp_cannot_reproduce_is_refused():
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    from llamita.interop.gguf import GGUFExportError, gguf_vocab
    from llamita.tokenizer import Tokenizer

    words = Tokenizer(Backend(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "word": 3}, unk_token="<unk>")))
    with pytest.raises(GGUFExportError, match="byte fallback"):
        gguf_vocab(words, 4)
