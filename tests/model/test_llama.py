import copy
import dataclasses
import math

import pytest
import torch

from llamita.model import KVCache, Llama, ModelConfig
from llamita.model.llama import RMSNorm, apply_rope, rope_tables

# Grouped-query (6 query heads over 2 KV heads), non-default rope_theta and eps, distinct sizes everywhere.
TINY = ModelConfig(
    vocab_size=97,
    dim=48,
    n_layers=2,
    n_heads=6,
    n_kv_heads=2,
    intermediate_size=72,
    max_seq_len=32,
    rope_theta=500.0,
    norm_eps=1e-6,
)


def _randomize_norms(model: torch.nn.Module) -> None:
    """Give norm weights values other than 1, so a norm that ignores its weight fails the parity tests."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.normal_(1.0, 0.2)


def test_rmsnorm_matches_float64_formula():
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = torch.randn(3, 5, 48) * 7
    x64, w64 = x.double(), norm.weight.detach().double()
    expected = w64 * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_rmsnorm_equals_transformers_in_bf16():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ours, theirs = RMSNorm(48, eps=1e-6), LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.2)
        theirs.weight.copy_(ours.weight)
    x = (torch.randn(4, 48) * 3).bfloat16()
    ours, theirs = ours.bfloat16(), theirs.bfloat16()
    assert torch.equal(ours(x), theirs(x))
    assert ours(x).dtype == torch.bfloat16


def test_rope_rotates_pairs_by_position_times_frequency():
    head_dim, seq, theta = 8, 32, 500.0
    cos, sin = rope_tables(head_dim, seq, theta)
    assert cos.dtype == torch.float32 and cos.shape == (seq, head_dim)
    x = torch.randn(2, 3, seq, head_dim, dtype=torch.float64)
    half = head_dim // 2
    pos = torch.arange(seq, dtype=torch.float64)[:, None]  # [T, 1]
    angle = pos * theta ** (-2 * torch.arange(half, dtype=torch.float64) / head_dim)  # [T, hd/2]
    x1, x2 = x[..., :half], x[..., half:]
    expected = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_match_transformers(tied, attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dataclasses.replace(TINY, tie_embeddings=tied)
    ours = Llama(config)
    _randomize_norms(ours)
    hf_config = LlamaConfig(**config.to_hf_config_dict(), attn_implementation=attn_implementation)
    hf = LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied

    tokens = torch.randint(0, config.vocab_size, (2, config.max_seq_len))
    with torch.no_grad():
        expected = hf(tokens)
        expected_hidden = hf.model(tokens).last_hidden_state
        logits = ours(tokens)
    assert logits.shape == (2, config.max_seq_len, config.vocab_size)
    torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.hidden_states(tokens), expected_hidden, atol=1e-5, rtol=1e-5)


def test_loads_a_transformers_state_dict():
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**TINY.to_hf_config_dict())).eval()
    _randomize_norms(hf)
    ours = Llama(TINY)
    ours.load_state_dict(hf.state_dict(), strict=True)
    tokens = torch.randint(0, TINY.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_num_params_matches_config(tied):
    config = dataclasses.replace(TINY, tie_embeddings=tied)
    model = Llama(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_params
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert not any("rope" in key for key in model.state_dict())


def _meta_built(config: ModelConfig, seed: int) -> Llama:
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_meta_device_init_is_deterministic_and_complete(tied):
    config = dataclasses.replace(TINY, tie_embeddings=tied)
    a, b, c = _meta_built(config, 0), _meta_built(config, 0), _meta_built(config, 1)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        assert torch.isfinite(pa).all(), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    assert (a.lm_head.weight is a.model.embed_tokens.weight) == tied
    cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
    assert torch.equal(a.rope_cos, cos) and torch.equal(a.rope_sin, sin)
    assert torch.equal(a.rope_cos, Llama(config).rope_cos)
    tokens = torch.randint(0, config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


def test_init_follows_tinyllama():
    config = ModelConfig(
        vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=344, max_seq_len=16
    )
    model = Llama(config)
    std = math.sqrt(2 / (5 * 128))
    residual_std = 1 / math.sqrt(128) / 4
    layer = model.model.layers[1]
    for weight, expected in [
        (model.model.embed_tokens.weight, std),
        (model.lm_head.weight, std),
        (layer.self_attn.q_proj.weight, std),
        (layer.self_attn.k_proj.weight, std),
        (layer.mlp.gate_proj.weight, std),
        (layer.self_attn.o_proj.weight, residual_std),
        (layer.mlp.down_proj.weight, residual_std),
    ]:
        assert weight.std().item() == pytest.approx(expected, rel=0.05)
        assert abs(weight.mean().item()) < expected / 10
    assert torch.equal(layer.input_layernorm.weight, torch.ones(128))
    assert torch.equal(model.model.norm.weight, torch.ones(128))


def test_kv_cache_prefill_chunk_and_decode_match_full_forward():
    model = Llama(TINY).double()
    tokens = torch.randint(0, TINY.vocab_size, (2, 24))
    cache = KVCache(TINY, batch_size=2, max_len=24, dtype=torch.float64)
    with torch.no_grad():
        full = model(tokens)  # [2, 24, V]
        pieces = [model(tokens[:, :10], cache, 0)]  # prefill: causal
        pieces.append(model(tokens[:, 10:16], cache, 10))  # several new tokens: explicit mask
        pieces += [model(tokens[:, i : i + 1], cache, i) for i in range(16, 24)]  # decode: no mask
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-10, rtol=1e-10)


def test_kv_cache_rows_by_index_and_bounded_reads_match_the_full_forward():
    """Rows 3 and 1 of a 4-row cache, written through an index and read as a gathered copy of their first 16
    positions (what the engine's prefill does), then decoded reading 16 positions of a slice: the full forward's
    logits; the rows not named are untouched."""
    model = Llama(TINY).double()
    tokens = torch.randint(0, TINY.vocab_size, (2, 14))
    cache = KVCache(TINY, batch_size=4, max_len=32, dtype=torch.float64)
    rows = torch.tensor([3, 1])
    positions = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        full = model(tokens)  # [2, 14, V]
        first = model.lm_head(model.hidden_states(tokens[:, :10], cache.view(rows, attend=16), positions=positions))
        later = []
        for i in range(10, 14):
            at = torch.full((4, 1), 31)  # rows 0 and 2 idle: they write their scratch position, the last one
            at[rows] = i
            step = torch.zeros(4, 1, dtype=torch.long)
            step[rows] = tokens[:, i : i + 1]
            later.append(model.lm_head(model.hidden_states(step, cache.view(slice(0, 4), attend=16), positions=at)))
    torch.testing.assert_close(first, full[:, :10], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.cat(later, dim=1)[rows], full[:, 10:], atol=1e-10, rtol=1e-10)
    for k in cache.k:
        assert not k[[0, 2], :, :31].any()  # the idle rows wrote only position 31
    with pytest.raises(ValueError, match="narrow reads with attend"):
        cache.view(rows, 8)


def test_cached_attention_of_several_tokens_keeps_off_cudnn(monkeypatch):
    """Through a cache, a forward of several tokens a row (a prefill) runs SDPA with cuDNN's backend off (it builds
    an execution plan for every new shape, 55-400 ms, and prefill shapes change with every batch); one token a row
    (decoding) leaves the backends as they are."""
    import torch.nn.functional as F

    seen, sdpa = [], F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append((args[0].shape[2], torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = Llama(TINY).double()
    cache = KVCache(TINY, batch_size=1, max_len=16, dtype=torch.float64)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache, 0)
        model(torch.tensor([[4]]), cache, 3)
    G = TINY.n_heads // TINY.n_kv_heads
    assert seen == [(3 * G, False)] * TINY.n_layers + [(G, True)] * TINY.n_layers
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_fused_projections_give_the_same_logits_with_and_without_a_cache():
    """`fuse_projections` stacks q/k/v and gate/up into one matmul each: the training forward and a cached
    prefill + decode give the unfused model's logits (float64), under the fused names only."""
    model = Llama(TINY).double()
    _randomize_norms(model)
    tokens = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        fused = copy.deepcopy(model).fuse_projections()
        torch.testing.assert_close(fused(tokens), full, atol=1e-12, rtol=0)
        cache = KVCache(TINY, batch_size=2, max_len=12, dtype=torch.float64)
        pieces = [fused(tokens[:, :8], cache, 0)] + [fused(tokens[:, i : i + 1], cache, i) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-10, rtol=0)
    names = set(fused.state_dict())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.1.mlp.gate_up_proj.weight" in names
    assert not any(
        n.endswith((".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".gate_proj.weight", ".up_proj.weight"))
        for n in names
    )
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    assert fused.fuse_projections() is fused  # a second call changes nothing
    from llamita.chat.lora import LoRAConfig, apply_lora

    adapted = copy.deepcopy(model)
    apply_lora(adapted, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="merge LoRA adapters first"):
        adapted.fuse_projections()  # its adapters' updates would be lost


def test_attention_is_causal():
    model = Llama(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_misuse_raises_clear_errors():
    model = Llama(TINY)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="KVCache"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=3)
    cache = KVCache(TINY, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="larger cache"):
        model(torch.zeros(1, 9, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="larger cache"):
        model(torch.zeros(2, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(TINY, batch_size=1, max_len=TINY.max_seq_len + 1)


def decode_step_against_the_dense_mask(decode: str, block: int) -> tuple[torch.Tensor, int]:
    """A decode step of five rows (one token each) through a cache whose `decode` reads each row's own positions,
    against the dense mask's (float64), at positions around blocks of `block` keys, the last row an idle one past
    the read length (its scratch position, seeing all of it). Returns the positions and the read length."""
    config = dataclasses.replace(TINY, max_seq_len=4 * block)
    torch.manual_seed(0)
    model = Llama(config).double()
    model.init_weights()
    attend = 3 * block + 40  # the last block in part
    positions = torch.tensor([[0], [block - 1], [block], [2 * block + 5], [4 * block - 1]])
    tokens = torch.randint(0, config.vocab_size, (5, 1))
    cache = KVCache(config, 5, dtype=torch.float64)
    for buf in cache.k + cache.v:
        buf.normal_()
    own = copy.copy(cache)
    own.decode = decode
    with torch.no_grad():
        dense = model.hidden_states(tokens, cache.view(slice(0, 5), attend=attend), positions=positions)
        got = model.hidden_states(tokens, own.view(slice(0, 5), attend=attend), positions=positions)
    torch.testing.assert_close(got, dense, atol=1e-12, rtol=0)
    return positions, attend


def test_a_decode_block_mask_reads_each_rows_own_blocks_and_attends_as_the_dense_mask():
    """`KVCache.decode = "flex"`: a decode step's rows see positions 0 .. their own through FlexAttention's block mask
    (`decode_block_mask`), the dense mask's outputs (float64); a row past the read length (an idle row at its
    scratch position) sees all of it. The mask lists, for each row, the blocks it sees whole and the one it sees
    in part, and no other: what FlexAttention's kernel reads (on a CPU, eager FlexAttention scores every
    position and masks them, as the dense mask does)."""
    from llamita.model.llama import DECODE_BLOCK, decode_block_mask

    positions, attend = decode_step_against_the_dense_mask("flex", DECODE_BLOCK)
    mask = decode_block_mask(positions, attend)
    assert mask.shape == (5, 1, 1, attend)
    # Keys seen: 1, 128 (one whole block), 129, 262, and all 424 of the read (the last block's 40 in part).
    assert mask.full_kv_num_blocks.flatten().tolist() == [0, 1, 1, 2, 3]  # blocks seen whole
    assert mask.kv_num_blocks.flatten().tolist() == [1, 0, 1, 1, 1]  # a block seen in part, or none
    assert mask.kv_indices[[0, 2, 3, 4], 0, 0, 0].tolist() == [0, 1, 2, 3]  # which one
