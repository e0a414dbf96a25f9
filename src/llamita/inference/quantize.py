"""Weight-only int8 quantization of a model's Linear layers (torchao), applied before the engine sizes its cache.

A decode step at a small batch is bound by reading the weights: each matrix is read once per step. With int8
weights and one fp32 scale per output row (symmetric, per channel: torchao's `Int8WeightOnlyConfig`, the scheme of
gpt-fast's int8) a step reads half the bytes of bf16, a quarter of fp32. Activations stay in the model's dtype:
each matmul runs on the weight cast up and multiplies by the row scales (torchao's `Int8Tensor` linear), so the KV
cache, the norms and the sampling are unchanged. Each weight moves by at most half a quantization step, scale / 2
with scale = max |row| / 127.5; `bench/quant_quality.py` measures what that does to perplexity and to the argmax.

Quantized: every `nn.Linear`, the output head included (as gpt-fast's int8 does): at batch 1 a step reads the whole
head, the largest single matrix (TinyLlama: 65.5M of 1.1B parameters). Not quantized: the token embedding, of which
a step reads only one row per sequence, and the norms. A model with tied embeddings keeps its embedding in its dtype
and gets an int8 copy for the head (V x D bytes more held; a step reads the copy). On a small model's held-out text
int8 changes perplexity by less than bf16 does (`bench/results/2026-12-01-quant-quality-cpu.md`).

The draft model of speculative decoding is not quantized here. Inductor's settings are left as they are (torchao's
`set_inductor_config` would change them for the whole process); whether a GPU step gains depends on Inductor
fusing the cast into the matmul, which `bench/infer_throughput.py` measures (`llamita-int8`, `llamita-int8-tuned`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from llamita.config import ConfigError

METHODS = ("int8",)
"""The values of `LLM(quantize=...)` and `--quantize`."""


def check_method(method: str | None) -> None:
    """Raise a ConfigError unless `method` is None, or one of `METHODS` with torchao installed.

    Called before a model is loaded, so that a bad setting fails at once.
    """
    if method is None:
        return
    if method not in METHODS:
        raise ConfigError(f"quantize must be one of {', '.join(METHODS)} (or unset for none), got {method!r}")
    _torchao(method)


def quantize_weights(model: nn.Module, method: str, *, head: bool = True) -> nn.Module:
    """Quantize the weights of `model`'s Linear layers in place, where they are (CPU or GPU).

    Args:
        model: A `Llama` (or any module) in its inference dtype and on its device.
        method: "int8": weight-only int8, one scale per output channel.
        head: Quantize the output head (`lm_head`) too; False keeps it in the model's dtype.

    Returns:
        The same module.

    Raises:
        ConfigError: An unknown method, or torchao is not installed (the `quant` extra).
    """
    check_method(method)
    Int8WeightOnlyConfig, quantize_ = _torchao(method)

    def chosen(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and (head or name != "lm_head")

    # The old weights are freed; the engine's cache sizing empties the allocator's cache before it counts.
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=chosen)
    return model


def _torchao(method: str) -> tuple:
    """torchao's `Int8WeightOnlyConfig` and `quantize_`: its public API only, so that any release for the torch
    installed serves."""
    try:
        # Warnings that its optional CUDA kernels do not load on a CPU, and (torch 2.13) of a pytree deprecation.
        with _quiet("torchao", "torch.utils._pytree"):
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ConfigError(
            f"quantize={method!r} needs torchao, which is not installed ({e}): pip install 'llamita[quant]'"
        ) from None
    return Int8WeightOnlyConfig, quantize_


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters hold; a quantized weight counts its int8 values and its scales."""
    return sum(_tensor_bytes(p) for p in model.parameters())


def _tensor_bytes(t: Tensor) -> int:
    if is_traceable_wrapper_subclass(t):  # a tensor subclass (torchao's Int8Tensor): the tensors it holds
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Only errors from these loggers while the block runs."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for log, _ in saved:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)
