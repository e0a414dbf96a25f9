"""Weight-only int8 (`LLM(quantize="int8")`): the weights against the int8 per-channel rounding bound, each Linear's
output and the logits against the float model, top-1 agreement on held-out text of a small trained float32 model,
greedy decoding through the engine, the option's checks and the missing extra."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch
from inference_models import greedy_by_recomputation
from torch import nn

from llamita.config import ConfigError
from llamita.inference import LLM, SamplingParams
from llamita.inference.quantize import quantize_weights, weight_bytes
from llamita.model import Llama, ModelConfig

CONFIG = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, max_seq_len=64)
SEQUENTIAL_LINEARS = 4 * CONFIG.n_layers + 1
"""Quantized matmuls one after another on a token's path: (q, k, v) then o, (gate, up) then down per block; the head."""


def language(n: int, length: int, seed: int) -> torch.Tensor:
    """[n, length] ids of a bigram language: after token t comes first[t] (60%), second[t] (30%) or any id (10%)."""
    g = torch.Generator().manual_seed(seed)
    first, second = torch.randperm(64, generator=torch.Generator().manual_seed(7)), torch.arange(64).roll(5)
    x = torch.zeros(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, 64, (n,), generator=g)
    for i in range(1, length):
        u = torch.rand(n, generator=g)
        prev = x[:, i - 1]
        anything = torch.randint(0, 64, (n,), generator=g)
        x[:, i] = torch.where(u < 0.6, first[prev], torch.where(u < 0.9, second[prev], anything))
    return x


@pytest.fixture(scope="module")
def trained() -> Llama:
    """A float32 model trained for 25 steps on the bigram language (about two seconds on a CPU)."""
    torch.manual_seed(0)
    model = Llama(CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(25):
        x = language(8, 33, seed=step)
        loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def int8(model: Llama, **kwargs) -> Llama:
    return quantize_weights(copy.deepcopy(model), "int8", **kwargs)


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def step(weight: torch.Tensor) -> torch.Tensor:
    """[N, 1] the int8 quantization step of each output row: symmetric over -128..127, so max |row| / 127.5."""
    return weight.abs().amax(dim=1, keepdim=True) / 127.5


def top1_agreement(a: Llama, b: Llama, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(tokens).argmax(-1) == b(tokens).argmax(-1)).float().mean().item()


def test_every_linear_weight_is_within_half_a_step_of_its_float_value(trained):
    quantized = int8(trained)
    for name, float_linear in linears(trained).items():
        weight = linears(quantized)[name].weight
        assert weight.qdata.dtype == torch.int8, name  # held as int8, the head included
        w = float_linear.weight
        error = (weight.dequantize() - w).abs()  # [N, K]
        rounding = 2 * torch.finfo(torch.float32).eps * w.abs()  # of the fp32 dequantization and subtraction
        assert (error <= step(w) / 2 + rounding).all(), name
        assert error.max() > 0, name  # it was rounded
    embedding = quantized.model.embed_tokens.weight  # read one row per token: kept as it is
    assert type(embedding) is nn.Parameter and torch.equal(embedding, trained.model.embed_tokens.weight)
    assert type(int8(trained, head=False).lm_head.weight) is nn.Parameter


def test_each_linear_output_is_within_the_rounding_bound_of_the_float_one(trained):
    """|x · (w_q - w)| <= sum_k |x_k| * step / 2 per output: the int8 per-channel error, worst case."""
    quantized = int8(trained)
    x = torch.randn(16, 1024, dtype=torch.float32)
    for name, float_linear in linears(trained).items():
        inputs = x[:, : float_linear.in_features]  # [16, K]
        exact = float_linear(inputs)  # [16, N]
        bound = inputs.abs().sum(-1, keepdim=True) * step(float_linear.weight).T / 2  # [16, N]
        assert ((linears(quantized)[name](inputs) - exact).abs() <= bound * (1 + 1e-4) + 1e-6).all(), name


def test_logits_are_as_close_as_the_weights_rounding_allows(trained):
    """First order, each quantized matmul adds the weights' relative error eps (||w_q - w|| / ||w||) to its output
    and the residual stream adds them up: relative logit error <= eps * the matmuls on a token's path."""
    quantized = int8(trained)
    eps = max(
        ((linears(quantized)[n].weight.dequantize() - m.weight).norm() / m.weight.norm()).item()
        for n, m in linears(trained).items()
    )
    assert eps < 1 / 127.5  # int8: under a percent, whatever the rows' outliers
    tokens = language(4, 64, seed=1000)
    with torch.no_grad():
        reference, logits = trained(tokens), quantized(tokens)  # [4, 64, V] each
    relative = ((logits - reference).norm() / reference.norm()).item()
    assert 0 < relative <= SEQUENTIAL_LINEARS * eps, (relative, eps)


def test_top1_agreement_on_held_out_text_and_a_broken_quantization_fails_it(trained):
    held_out = language(16, 64, seed=1001)  # sequences the model never saw
    assert top1_agreement(trained, int8(trained), held_out) >= 0.97
    broken = int8(trained)
    for m in linears(broken).values():
        m.weight.scale.zero_()  # a quantization whose scales were lost
    assert top1_agreement(trained, broken, held_out) < 0.5


def test_greedy_decoding_through_the_engine(trained):
    """The engine decodes the int8 model exactly (as a full forward per token does) and its greedy tokens are the
    float model's top-1 at nearly every position (teacher-forced along the int8 output)."""
    prompts = language(4, 8, seed=1002).tolist()
    quantized = int8(trained)
    llm = LLM(copy.deepcopy(trained), quantize="int8", max_batch=4)
    outputs = [c.token_ids for c in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))]
    for prompt, output in zip(prompts, outputs):
        assert output == greedy_by_recomputation(quantized, prompt, 24)
    with torch.no_grad():
        agree = [
            (trained(torch.tensor([p + o]))[0, len(p) - 1 : -1].argmax(-1) == torch.tensor(o)).float().mean()
            for p, o in zip(prompts, outputs)
        ]
    assert torch.stack(agree).mean() >= 0.95


def test_fused_projections_quantize_and_decode_as_the_separate_ones(trained):
    """`LLM(fuse=True)` stacks q/k/v and gate/up before quantizing: per-row int8 scales of a stacked weight are the
    separate weights' scales, so the fused int8 model decodes the unfused int8 model's tokens; in float, the
    fused model decodes the model's own."""
    prompts = language(3, 8, seed=1003).tolist()
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    for quantize in (None, "int8"):
        ids = [
            [c.token_ids for c in LLM(copy.deepcopy(trained), quantize=quantize, fuse=fuse, max_batch=3).generate(
                prompts, greedy)]
            for fuse in (False, True)
        ]  # fmt: skip
        assert ids[0] == ids[1], quantize
    fused = LLM(copy.deepcopy(trained), fuse=True, max_batch=1).model
    assert hasattr(fused.model.layers[0].self_attn, "qkv_proj") and hasattr(fused.model.layers[0].mlp, "gate_up_proj")
    assert not hasattr(LLM(copy.deepcopy(trained), max_batch=1).model.model.layers[0].self_attn, "qkv_proj")  # default


def test_by_default_a_loaded_model_is_fused_on_a_gpu_where_it_can_be(trained, caplog):
    """`LLM(fuse=None)`: a loaded model on a GPU is fused; a `Llama` given, or a CPU, keeps its weights; a model
    with LoRA adapters is not fused, and the log says why."""
    from llamita.chat.lora import LoRAConfig, apply_lora
    from llamita.inference.llm import _auto_fuse

    assert trained.unfusable() is None
    assert _auto_fuse(trained, given=False, gpu=True)
    assert not _auto_fuse(trained, given=True, gpu=True) and not _auto_fuse(trained, given=False, gpu=False)
    adapted = copy.deepcopy(trained)
    apply_lora(adapted, LoRAConfig(rank=2))
    with caplog.at_level("INFO", logger="llamita.inference"):
        assert not _auto_fuse(adapted, given=False, gpu=True)
    assert "merge LoRA adapters first" in caplog.text


def test_the_engine_keeps_the_activation_dtype_for_its_cache_and_the_weights_shrink(trained):
    llm = LLM(copy.deepcopy(trained), quantize="int8", max_batch=2)
    assert llm.engine.dtype == torch.float32 and llm.engine.cache.kv.k[0].dtype == torch.float32
    weights = sum(m.weight.numel() for m in linears(trained).values())
    rows = sum(m.out_features for m in linears(trained).values())
    # fp32 weights become int8 values and, per output row, an fp32 scale and an int8 zero point (0: symmetric).
    assert weight_bytes(trained) - weight_bytes(llm.model) == 4 * weights - (weights + 5 * rows)


def test_tied_embeddings_keep_the_embedding_and_quantize_a_copy_for_the_head():
    tied = Llama(dataclasses.replace(CONFIG, tie_embeddings=True)).eval()
    quantized = int8(tied)
    assert torch.equal(quantized.model.embed_tokens.weight, tied.model.embed_tokens.weight)
    assert quantized.lm_head.weight.qdata.dtype == torch.int8


@pytest.mark.parametrize("bad", ["int4", "INT8", ""])
def test_the_option_names_its_values_before_anything_is_loaded(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"quantize must be one of int8 .* got"):
        LLM(tmp_path / "no-such-run", quantize=bad)


def test_without_torchao_the_error_names_the_extra(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao.quantization` fail
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    model = copy.deepcopy(trained)
    with pytest.raises(ConfigError, match=r"needs torchao.*pip install 'llamita\[quant\]'"):
        LLM(model, quantize="int8")
    assert type(model.lm_head.weight) is nn.Parameter  # untouched


class _Loaded(Exception):
    pass


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--checkpoint", "run", "--prompt", "x", "--quantize", "int8", "--fuse"],
        ["chat", "--checkpoint", "run", "--prompt", "x", "--quantize", "int8", "--fuse"],
        ["serve", "--checkpoint", "run", "--quantize", "int8", "--fuse", "--prefill-graphs"],
        ["serve", "--checkpoint", "run", "--engine-process", "--quantize", "int8", "--fuse", "--prefill-graphs"],
    ],
)
def test_the_commands_pass_quantize_to_the_llm(monkeypatch, argv):
    """--quantize and --fuse reach `LLM` (and serve's --prefill-graphs its engine settings); without them, their
    defaults (None: `LLM` and the engine decide by the device); --no-fuse and --no-prefill-graphs turn them off.
    serve --engine-process passes them to the `LLM` of its engine process."""
    import llamita.inference
    import llamita.inference.engine_process
    from llamita.cli import main

    seen = {}

    def record(checkpoint, **kwargs):
        seen.update(kwargs)
        raise _Loaded

    def engine_process(llm, stream_interval, fronts):
        settings = dict(llm)
        record(settings.pop("model"), **settings)

    if argv[0] == "serve":  # imported first, so that it keeps the real EngineProcess after the test
        import llamita.inference.server  # noqa: F401
    monkeypatch.setattr(llamita.inference, "LLM", record)
    monkeypatch.setattr(llamita.inference.engine_process, "EngineProcess", engine_process)
    with pytest.raises(_Loaded):
        main(argv)
    assert seen["quantize"] == "int8" and seen["fuse"] is True
    assert seen.get("prefill_graphs", False) is (argv[0] == "serve")
    assert seen.get("decode_attention") is None  # the engine's choice: the kernel on CUDA, SDPA on a CPU
    seen.clear()
    with pytest.raises(_Loaded):
        main([a for a in argv if a not in ("--fuse", "--prefill-graphs")])
    assert seen["fuse"] is None and seen.get("prefill_graphs") is None
    seen.clear()
    off = [{"--fuse": "--no-fuse", "--prefill-graphs": "--no-prefill-graphs"}.get(a, a) for a in argv]
    with pytest.raises(_Loaded):
        main(off)
    assert seen["fuse"] is False and seen.get("prefill_graphs", False) is False
    if argv[0] == "serve":
        with pytest.raises(_Loaded):
            main([*argv, "--decode-attention", "flex"])
        assert seen["decode_attention"] == "flex"
    with pytest.raises(SystemExit):
        main([*argv[:-1], "int4"])  # argparse's choices


@pytest.mark.gpu
def test_on_a_gpu_quantizing_frees_the_old_weights():
    """The bf16 weights that int8 ones replace are freed: nothing keeps them, and the allocator's live bytes fall by
    what `weight_bytes` says was saved. (Not asserted: the driver's free count. The freed blocks share the
    allocator's segments with the int8 weights made in their place, one layer at a time, so emptying its cache
    gives little back: on an H200, at this shape, reserved memory rose 88 MB while live bytes fell 64 MB. The
    engine's cache sizing empties the cache and reads the driver's count, `cache._free_memory`.)"""
    torch.manual_seed(0)
    model = Llama(dataclasses.replace(CONFIG, vocab_size=32000, dim=1024, intermediate_size=4096))
    model = model.to("cuda", torch.bfloat16).eval()
    linear = sum(m.weight.numel() * 2 for m in linears(model).values())  # bf16 bytes
    before, allocated = weight_bytes(model), torch.cuda.memory_allocated()
    quantize_weights(model, "int8")
    saved = before - weight_bytes(model)
    assert saved > 0.45 * linear  # int8 values: half of bf16's bytes, less the scales
    assert allocated - torch.cuda.memory_allocated() >= 0.9 * saved
