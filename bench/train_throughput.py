"""Training throughput of llamita against its peers on one GPU, TinyLlama-1.1B shape (see bench/README.md).

Every system trains the same model (the `tinyllama-1.1b` preset's weights, copied into each) on the same
random-token batches: sequence 2048, micro-batch 8, fp32 master weights with bf16 compute, fused AdamW, gradient
clipping, one optimizer step per micro-batch, no activation checkpointing. Each measurement runs in its own
subprocess, so GPU memory, the caching allocator and dynamo's caches start clean (inductor's on-disk cache is
shared: it only shortens compile times, which are not measured).

    python bench/train_throughput.py                             # every group, on a CUDA GPU
    python bench/train_throughput.py --groups peers --merge r.json  # some groups, merged with an earlier result
    python bench/train_throughput.py --smoke                     # the debug preset on CPU: the script end to end
    python bench/train_throughput.py --prepare-data .benchdata   # demo corpus -> 32000-token tokenizer -> shards

Groups: `llamita` (the ablation chain, each technique kept only if it is faster, then fp8 on the best),
`fp8` (fp8 with and without FSDP2 on one GPU), `tuning` (bf16 with inductor's coordinate-descent tuning),
`data` (the best bf16 configuration fed by llamita's DataLoader from real shards, with a kernel-time profile and
a host-sync check), `loss` (the output head + cross-entropy alone: plain vs chunked, time, memory, error against
float64) and `peers` (transformers eager, + torch.compile, + Liger kernels; litgpt + torch.compile). The tables
are printed last; the full results go to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

PEAK_FLOPS = 989e12  # H100 SXM dense bf16, the peers' MFU convention
SEED = 1234
LR = 4e-4

GPU_SHAPE = {"preset": "tinyllama-1.1b", "seq_len": 2048, "batch": 8, "warmup": 4, "steps": 20, "device": "cuda"}
# The smoke shape keeps the 32000-token vocabulary so that it can read the same prepared shards.
SMOKE_SHAPE = {
    "preset": "debug",
    "vocab_size": 32000,
    "seq_len": 128,
    "batch": 2,
    "warmup": 1,
    "steps": 2,
    "device": "cpu",
}

# The llamita ablation chain: each step changes the best configuration so far and is kept if it is faster
# (or within 1% and lighter on memory). fp8 and the data-loader run start from the chain's result.
LLAMITA_BASE = {
    "system": "llamita",
    "fsdp": False,
    "reshard": True,
    "compile": False,
    "chunked": False,
    "sdpa": "default",
    "fp8": False,
    "copies": False,
    "clip": "folded",
}
# The configuration the chain kept on one H100 (2026-11-24): what groups run without the chain in the same call.
# Until session 4 it was FSDP2_KEPT; the compute copies then replaced FSDP2 on one GPU (the `copies` group).
FSDP2_KEPT = {**LLAMITA_BASE, "fsdp": True, "compile": True, "chunked": True, "reshard": False}
LLAMITA_KEPT = {**FSDP2_KEPT, "fsdp": False, "copies": True}
ABLATION = [
    ("eager", "fp32 params + bf16 autocast, eager, plain CE on full logits", {}),
    ("+fsdp2", "FSDP2 fully_shard per block + root, bf16 params / fp32 reduce, no autocast", {"fsdp": True}),
    ("+compile", "torch.compile per block", {"compile": True}),
    ("+chunked-loss", "loss inside forward, chunked fused linear CE", {"chunked": True}),
    ("+no-reshard", "reshard_after_forward=False (1 GPU: no second all-gather)", {"reshard": False}),
    ("-fsdp2", "1 GPU: no FSDP2, autocast over fp32 weights again", {"fsdp": False}),
    ("copies", "1 GPU: no FSDP2, bf16 compute copies written by the fused AdamW", {"fsdp": False, "copies": True}),
    ("sdpa-flash", "SDPA flash backend only (torch 2.11's default on H100 is cuDNN)", {"sdpa": "flash"}),
]
PEERS = [
    ("hf-eager", {"system": "hf", "compile": False, "liger": False}),
    ("hf-compile", {"system": "hf", "compile": True, "liger": False}),
    ("hf-liger", {"system": "hf", "compile": False, "liger": True}),
    ("litgpt-compile", {"system": "litgpt", "compile": True}),
]
PEER_REFERENCE = {  # tokens/s and peak GiB measured by the issue's peers (H100 80GB, torch 2.11)
    "hf-eager": (43.3e3, 56.6),
    "hf-compile": (55.2e3, 43.2),
    "hf-liger": (58.5e3, 41.9),
    "litgpt-compile": (66.2e3, 45.4),
}


# ------------------------------------------------------------------------------------------------ worker
def model_config(shape: dict) -> Any:
    """The llamita architecture of `shape`: its preset, vocabulary (default: the preset's) and sequence length."""
    from llamita.model import get_preset

    preset = get_preset(shape["preset"])
    vocab = shape.get("vocab_size", preset.vocab_size)
    return dataclasses.replace(preset, vocab_size=vocab, max_seq_len=max(preset.max_seq_len, shape["seq_len"]))


def _reference_weights(config: Any, device: Any) -> dict:
    """The llamita initialisation every system starts from (HF parameter names)."""
    from llamita.pretrain import build_model

    return build_model(config, device, SEED).state_dict()


def _build_llamita(spec: dict, config: Any, device: Any) -> tuple[Any, Any, Any]:
    """llamita as `llamita pretrain` builds it: `llamita.train.parallel.parallelize` with the spec's switches, and
    compute copies (`llamita.train.copies`) when the spec asks for them."""
    import torch
    import torch.nn.functional as F

    from llamita.config import ParallelConfig
    from llamita.pretrain import build_model
    from llamita.train.copies import ComputeCopies
    from llamita.train.parallel import build_mesh, parallelize

    model = build_model(config, device, SEED)
    parallel = ParallelConfig(
        fsdp="on" if spec["fsdp"] else "off",
        reshard_after_forward=spec["reshard"],
        compile=spec["compile"],
        float8=spec["fp8"],
    )
    mesh = build_mesh(1, 1, device.type) if spec["fsdp"] else None
    parallelize(model, parallel, mesh, device, param_dtype=torch.bfloat16)
    copies = ComputeCopies(model, torch.bfloat16) if spec["copies"] else None
    # As the trainer does: FSDP2 casts the weights to bf16 itself, compute copies are bf16; else autocast.
    autocast = contextlib.nullcontext() if spec["fsdp"] or spec["copies"] else _autocast(device)

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast:
            if spec["chunked"]:
                return model(inputs, targets=targets)
            return F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten())

    return model, loss_fn, copies


def _build_hf(spec: dict, config: Any, device: Any) -> tuple[Any, Any, Any]:
    """transformers' LlamaForCausalLM (SDPA attention), fp32 params under bf16 autocast, loss inside forward."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    hf_config = LlamaConfig(**config.to_hf_config_dict(), attn_implementation="sdpa", use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config)
    model.load_state_dict(_reference_weights(config, device), strict=True)
    model.train()
    forward = torch.compile(model, backend=spec["backend"]) if spec["compile"] else model
    autocast = _autocast(device)

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast:
            # shift_labels: the targets are already shifted, so transformers must not shift them again.
            return forward(input_ids=inputs, labels=targets, shift_labels=targets, use_cache=False).loss

    return model, loss_fn, None


@functools.cache  # once: a second find_spec("litgpt") would fail on the stub package
def import_litgpt() -> tuple[Any, Any]:
    """litgpt.config and litgpt.model without litgpt/__init__.py, which imports the whole CLI stack."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("litgpt")
    if spec is None:
        raise ImportError("litgpt is not installed (see bench/README.md for carrying its wheel)")
    package = types.ModuleType("litgpt")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["litgpt"] = package
    import litgpt.config
    import litgpt.model

    return litgpt.config, litgpt.model


def _litgpt_state_dict(hf: dict, n_layers: int) -> dict:
    """HF Llama names -> litgpt GPT names; q, k, v are concatenated into litgpt's fused qkv."""
    import torch

    out = {
        "transformer.wte.weight": hf["model.embed_tokens.weight"],
        "transformer.ln_f.weight": hf["model.norm.weight"],
        "lm_head.weight": hf["lm_head.weight"],
    }
    for i in range(n_layers):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        attn = [hf[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"]
        out[f"{q}attn.qkv.weight"] = torch.cat(attn)
        out[f"{q}attn.proj.weight"] = hf[f"{p}self_attn.o_proj.weight"]
        out[f"{q}norm_1.weight"] = hf[f"{p}input_layernorm.weight"]
        out[f"{q}norm_2.weight"] = hf[f"{p}post_attention_layernorm.weight"]
        out[f"{q}mlp.fc_1.weight"] = hf[f"{p}mlp.gate_proj.weight"]
        out[f"{q}mlp.fc_2.weight"] = hf[f"{p}mlp.up_proj.weight"]
        out[f"{q}mlp.proj.weight"] = hf[f"{p}mlp.down_proj.weight"]
    return out


def build_litgpt_model(config: Any, preset: str, device: Any) -> Any:
    """litgpt's GPT from its `tiny-llama-1.1b` config with llamita's initial weights, fp32, in train mode.

    For another `preset` (the smoke runs) litgpt's TinyLlama is shrunk to `config`'s shape.
    """
    import torch

    lit_config, lit_model = import_litgpt()
    overrides = {}
    if preset != "tinyllama-1.1b":  # smoke: shrink litgpt's TinyLlama to the preset under test
        overrides = {
            "n_layer": config.n_layers,
            "n_embd": config.dim,
            "n_head": config.n_heads,
            "n_query_groups": config.n_kv_heads,
            "head_size": config.head_dim,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "padded_vocab_size": config.vocab_size,
        }
    cfg = lit_config.Config.from_name("tiny-llama-1.1b", block_size=config.max_seq_len, **overrides)
    shape = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_query_groups, cfg.intermediate_size, cfg.padded_vocab_size)
    expected = (config.n_layers, config.dim, config.n_heads, config.n_kv_heads, config.intermediate_size)
    if shape != (*expected, config.vocab_size):
        raise RuntimeError(f"litgpt config {shape} differs from llamita's {config}")
    with torch.device(device):
        model = lit_model.GPT(cfg)
    model.load_state_dict(_litgpt_state_dict(_reference_weights(config, device), cfg.n_layer), strict=True)
    return model.train()


def _build_litgpt(spec: dict, config: Any, device: Any) -> tuple[Any, Any, Any]:
    """litgpt's GPT (`build_litgpt_model`), fp32 params under bf16 autocast, compiled with its loss."""
    import torch
    import torch.nn.functional as F

    model = build_litgpt_model(config, spec["preset"], device)
    autocast = _autocast(device)

    def step_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten())

    compiled = torch.compile(step_loss, backend=spec["backend"]) if spec["compile"] else step_loss

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast:
            return compiled(inputs, targets)

    return model, loss_fn, None


def _autocast(device: Any) -> Any:
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16)


def _synthetic_batches(config: Any, shape: dict, n: int, device: Any) -> list:
    """`n` random-token (inputs, targets) micro-batches, the same for every system, resident on the device."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, config.vocab_size, (n, shape["batch"], shape["seq_len"] + 1), generator=g)
    tokens = tokens.to(device)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def _loader_batches(data_dir: str, config: Any, shape: dict) -> Any:
    """llamita's DataLoader over the prepared demo sources (7:3 prose:code), pinned memory, prefetch thread."""
    from llamita.data.loader import DataLoader
    from llamita.data.mixture import Mixture
    from llamita.data.prepare import shard_paths

    root = Path(data_dir)
    sources = {name: shard_paths(root / name, "train") for name in ("prose", "code")}
    return DataLoader(
        sources,
        Mixture.constant({"prose": 0.7, "code": 0.3}),
        seq_len=shape["seq_len"],
        micro_batch=shape["batch"],
        global_batch=shape["batch"],
        seed=SEED,
        vocab_size=config.vocab_size,
        prefetch=4,
        pin_memory=True,
    )


HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
"""CUDA runtime calls in which the host may wait for the GPU (`_profile_breakdown(host=True)` counts them)."""


def _profile_breakdown(run_steps: Any, n_steps: int, host: bool = False) -> dict:
    """GPU kernel time per step by category (matmul, attention, optimizer, ...), from torch.profiler; with `host`,
    also the CPU side: kernel launches and the calls that can wait for the GPU (`HOST_WAITS`), per step, with
    the host time they took."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + [ProfilerActivity.CPU] * host
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run_steps(n_steps)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n_steps
    if os.environ.get("LLAMITA_PROFILE_TRACE"):  # the timeline too, gzipped (chrome://tracing, perfetto)
        import gzip
        import shutil

        trace = os.environ["LLAMITA_PROFILE_TRACE"]
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(trace)
    waits: dict[str, list[float]] = {}
    host_top: list = []
    if host:
        cpu = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
        host_top = [
            [e.key[:120], e.count / n_steps, e.self_cpu_time_total / 1e3 / n_steps]
            for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:25]
        ]  # calls, self ms per step
        for evt in prof.key_averages():
            if evt.key.startswith(HOST_WAITS) or evt.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"):
                waits[evt.key] = [evt.count / n_steps, evt.cpu_time_total / 1e3 / n_steps]  # calls, ms per step
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        total_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        kernels[evt.key] = kernels.get(evt.key, 0.0) + total_us / 1e3 / n_steps  # ms per step
    categories: dict[str, float] = {}
    for name, ms in kernels.items():
        categories[_kernel_category(name)] = categories.get(_kernel_category(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:30]
    return {
        "step_wall_ms": 1e3 * wall,
        "gpu_busy_ms": sum(kernels.values()),
        **({"host_calls_per_step": waits, "host_self_top_ms": host_top} if host else {}),
        "categories_ms": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": [[name[:160], ms] for name, ms in top],
    }


def _kernel_category(name: str) -> str:
    """A kernel's role from its name: cuBLAS/CUTLASS matmuls, SDPA kernels, the optimizer, casts and copies, ..."""
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "sdpa", "attention", "attn")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "scaled_mm", "gmma")):
        return "matmul"
    if "adam" in n or ("triton" in n and "lerp" in n):  # torch's fused AdamW; CopiesAdamW's compiled update
        return "optimizer (fused AdamW)"
    if "multi_tensor_apply" in n and ("norm" in n or "mul" in n):
        return "grad clip (foreach norm, scale)"
    if "nccl" in n or "multi_tensor_apply" in n or "chunk_cat" in n or "split_with_sizes" in n:
        return "fsdp all-gather / reduce-scatter + foreach copies"
    if "triton" in n:
        return "elementwise + loss (compiled triton)"
    if any(k in n for k in ("memcpy", "memset", "copy", "catarray")):
        return "casts and copies (aten)"
    return "elementwise + reductions (aten)"


def run_loss_microbench(spec: dict) -> dict:
    """The output head + cross-entropy alone (fwd + bwd) at the training shape: plain vs chunked, time and memory."""
    import torch
    import torch.nn.functional as F

    from llamita.model.loss import chunked_cross_entropy

    config = model_config(spec)
    device = torch.device(spec["device"])
    n, d, v = spec["batch"] * spec["seq_len"], config.dim, config.vocab_size
    g = torch.Generator(device=device).manual_seed(SEED)
    hidden = torch.randn(n, d, device=device, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(v, d, device=device, generator=g) * math.sqrt(2 / (5 * d))).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=g)

    def plain(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h, w).float(), t)

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.T, targets)
    ref.backward()
    ref_grads = (h64.grad, w64.grad)
    del h64, w64
    variants = {"plain eager": plain, "plain compiled": torch.compile(plain)}
    for c in (2048, 4096, 8192):
        variants[f"chunked {c}"] = lambda h, w, t, c=c: chunked_cross_entropy(h, w, t, chunk_size=c)
    out: dict[str, Any] = {}
    for name, fn in variants.items():
        hidden.grad = weight.grad = None
        try:
            for _ in range(3):
                hidden.grad = weight.grad = None
                fn(hidden, weight, targets).backward()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(10):
                hidden.grad = weight.grad = None
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                loss = fn(hidden, weight, targets)
                loss.backward()
                end.record()
                times.append((start, end))
            torch.cuda.synchronize()
            ms = sorted(s.elapsed_time(e) for s, e in times)
            errors = [float((x.double() - r).norm() / r.norm()) for x, r in zip((hidden.grad, weight.grad), ref_grads)]
            out[name] = {
                "ms": ms[len(ms) // 2],
                "extra_peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
                "loss_abs_err": abs(float(loss.detach()) - float(ref.detach())),
                "grad_hidden_rel_err": errors[0],
                "grad_weight_rel_err": errors[1],
            }
        except Exception as e:  # one variant failing must not hide the others
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"loss_microbench": out, "versions": _versions()}


def run_worker(spec: dict) -> dict:
    """Build one system, train `warmup` + `steps` steps and return its numbers."""
    import torch

    from llamita.config import OptimConfig
    from llamita.train.optim import build_optimizer, clipped_step, gradient_norm

    torch.manual_seed(SEED)
    device = torch.device(spec["device"])
    if spec.get("sdpa", "default") != "default":  # only the named SDPA backend, so a fallback cannot hide
        torch.backends.cuda.enable_flash_sdp(spec["sdpa"] == "flash")
        torch.backends.cuda.enable_cudnn_sdp(spec["sdpa"] == "cudnn")
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)
    if spec.get("coordinate_descent"):  # inductor tunes each generated kernel's block sizes (longer compiles)
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    if spec["system"] == "loss":
        return run_loss_microbench(spec)
    config = model_config(spec)
    builder = {"llamita": _build_llamita, "hf": _build_hf, "litgpt": _build_litgpt}[spec["system"]]
    t_build = time.perf_counter()
    model, loss_fn, copies = builder(spec, config, device)
    optimizer = build_optimizer(model, OptimConfig(lr=LR, weight_decay=0.1, beta1=0.9, beta2=0.95), device, copies)
    params = [p for p in model.parameters() if p.requires_grad]
    # llamita steps as its trainer does (clipping factor inside the fused update); the peers clip, then step.
    folded = spec["system"] == "llamita" and spec.get("clip") == "folded"
    no_skip = torch.zeros((), device=device)
    build_s = time.perf_counter() - t_build

    total = spec["warmup"] + spec["steps"]
    if spec.get("data"):
        loader = _loader_batches(spec["data"], config, spec)

        def next_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            inputs, targets = next(loader)
            return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    else:
        batches = _synthetic_batches(config, spec, total, device)

        def next_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return batches[i % len(batches)]

    losses: list[torch.Tensor] = []
    step_index = [0]

    def run_steps(n: int) -> None:
        for _ in range(n):
            inputs, targets = next_batch(step_index[0])
            step_index[0] += 1
            loss = loss_fn(inputs, targets)
            loss.backward()
            if folded:
                clipped_step(optimizer, gradient_norm(optimizer), 1.0, no_skip)
            else:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    run_steps(spec["warmup"])
    sync()
    warmup_s = time.perf_counter() - t0
    warmup_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the steady state; compile's one-off buffers are left out
    t0 = time.perf_counter()
    run_steps(spec["steps"])
    sync()
    timed_s = time.perf_counter() - t0
    tokens = spec["steps"] * spec["batch"] * spec["seq_len"]
    result: dict[str, Any] = {
        "tokens_per_s": tokens / timed_s,
        "step_ms": 1e3 * timed_s / spec["steps"],
        "build_s": build_s,
        "warmup_s": warmup_s,
        "losses": [float(x) for x in torch.stack(losses).tolist()],
    }
    result["mfu"] = result["tokens_per_s"] * config.flops_per_token(spec["seq_len"]) / PEAK_FLOPS
    result["loss_first"] = result["losses"][0]
    result["loss_last"] = result["losses"][-1]
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        result["peak_gib_with_warmup"] = max(warmup_peak, result["peak_gib"])
        result["device_name"] = torch.cuda.get_device_name()
    if spec.get("sync_check") and device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            run_steps(2)
            torch.cuda.set_sync_debug_mode(0)
        messages = [str(w.message)[:200] for w in caught]
        syncs = [m for m in messages if "synchroniz" in m.lower() and "prototype" not in m]
        result["host_syncs_per_step"] = len(syncs) / 2
        result["host_sync_messages"] = sorted(set(syncs))[:10]
    if spec.get("profile") and device.type == "cuda":
        result["profile"] = _profile_breakdown(run_steps, 3)
    result["versions"] = _versions()
    return result


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "triton", "transformers", "liger-kernel", "torchao", "litgpt"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------------------------------------ parent
def _run_isolated(name: str, spec: dict, log: Path, timeout: float) -> dict:
    """Run one spec in a fresh interpreter; its output goes to the log, its result comes back as JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--result", str(result_path)]
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    t0 = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n===== {name}: {json.dumps(spec)}\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    if rc == 0:
        result = json.loads(result_path.read_text())
    else:
        tail = log.read_text().splitlines()[-15:]
        result = {"error": f"exit {rc}", "log_tail": tail}
    result_path.unlink(missing_ok=True)
    result["wall_s"] = wall
    result["spec"] = spec
    if "error" in result:
        summary = f"FAILED ({result['error']}): {' | '.join(result['log_tail'][-3:])}"
    elif "tokens_per_s" in result:
        summary = f"{result['tokens_per_s']:,.0f} tok/s, {result.get('peak_gib', float('nan')):.1f} GiB"
    else:
        summary = "done"
    print(f"[{name}] {summary} ({wall:.0f} s)", flush=True)
    return result


def _better(new: dict, best: dict) -> bool:
    """Kept: faster, or within 1% and lighter on memory."""
    if "error" in new:
        return False
    if new["tokens_per_s"] > best["tokens_per_s"] * 1.01:
        return True
    lighter = new.get("peak_gib", 0) < best.get("peak_gib", 0)
    return new["tokens_per_s"] >= best["tokens_per_s"] * 0.99 and lighter


def run_groups(args: argparse.Namespace, shape: dict) -> dict:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "workers.log"
    results: dict[str, Any] = json.loads(Path(args.merge).read_text()) if args.merge else {}
    results.setdefault("runs", {})
    results.setdefault("ablation", [])
    common = {**shape, "backend": "aot_eager" if args.smoke else "inductor"}
    deadline = time.perf_counter() + args.deadline

    def run(name: str, spec: dict) -> dict:
        remaining = deadline - time.perf_counter()
        if remaining < 45:
            result = {"error": "skipped: out of time for this call", "spec": spec}
            print(f"[{name}] skipped (deadline)", flush=True)
        else:
            result = _run_isolated(name, {**common, **spec}, log, min(args.timeout, remaining))
        results["runs"][name] = result
        (out_dir / "train_throughput.json").write_text(json.dumps(results, indent=1))
        return result

    cuda = shape["device"] == "cuda"
    if "llamita" in args.groups:
        results["ablation"] = []
        config = dict(LLAMITA_BASE)
        best: dict | None = None
        for step, what, change in ABLATION:
            if step in ("+no-reshard", "-fsdp2") and not config["fsdp"]:
                continue
            if step == "sdpa-flash" and not cuda:
                continue
            candidate = {**config, **change}
            result = run(f"llamita {step}", candidate)
            kept = best is None or _better(result, best) or (args.smoke and "error" not in result)
            results["ablation"].append({"step": step, "what": what, "run": f"llamita {step}", "kept": kept})
            if kept:
                config, best = candidate, result
        results["llamita_best"] = config
        results["runs"]["llamita-bf16"] = {**best, "from": "best of the ablation chain"} if best else {}
        if cuda:
            run("llamita-fp8", {**config, "fp8": True, "compile": True, "profile": True})
        (out_dir / "train_throughput.json").write_text(json.dumps(results, indent=1))
    if "fp8" in args.groups and cuda:
        # fp8 had 16.6 ms/step of GPU idle under FSDP2: does one GPU do better without FSDP2's hooks?
        config = {**FSDP2_KEPT, "fp8": True, "profile": True}
        run("llamita-fp8", config)
        run("llamita-fp8-no-fsdp2", {**config, "fsdp": False})
    if "copies" in args.groups:
        # One GPU: FSDP2 (clipping as a separate pass, then folded into the update) against compute copies.
        run("llamita-bf16-fsdp2-separate-clip", {**FSDP2_KEPT, "clip": "separate"})
        run("llamita-bf16-fsdp2", FSDP2_KEPT)
        results["runs"]["llamita-bf16"] = {
            **run("llamita-bf16-copies", {**LLAMITA_KEPT, "profile": cuda}),
            "from": "copies",
        }
        if cuda:
            run("llamita-fp8-fsdp2", {**FSDP2_KEPT, "fp8": True})
            fp8 = run("llamita-fp8-copies", {**LLAMITA_KEPT, "fp8": True, "profile": True})
            results["runs"]["llamita-fp8"] = {**fp8, "from": "copies group"}
    if "tuning" in args.groups and cuda:
        config = results.get("llamita_best", LLAMITA_KEPT)
        results["runs"]["llamita-bf16"] = {**run("llamita-bf16-tuning-base", config), "from": "tuning group"}
        run("llamita-bf16-coordinate-descent", {**config, "coordinate_descent": True})
    if "data" in args.groups:
        config = results.get("llamita_best", LLAMITA_KEPT)
        if "llamita" not in args.groups and "copies" not in args.groups:  # the synthetic reference: same machine
            results["runs"]["llamita-bf16"] = {**run("llamita-bf16-synthetic", config), "from": "data group"}
        if args.data:
            run("llamita-bf16-loader", {**config, "data": args.data, "sync_check": True, "profile": cuda})
    if "peers" in args.groups:
        for name, spec in PEERS:
            if args.peers and name not in args.peers.split(","):
                continue
            if spec.get("liger") and not cuda:
                results["runs"][name] = {"error": "skipped: Liger's Triton kernels need CUDA", "spec": spec}
                continue
            run(name, {**spec, "chunked": False, "fp8": False, "sdpa": "default"})
    if "loss" in args.groups and cuda:
        run("loss-microbench", {"system": "loss"})
    results["shape"] = shape
    (out_dir / "train_throughput.json").write_text(json.dumps(results, indent=1))
    return results


# ------------------------------------------------------------------------------------------------ tables
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def tables(results: dict) -> str:
    runs = results.get("runs", {})
    peers = [runs[n]["tokens_per_s"] for n, _ in PEERS if "tokens_per_s" in runs.get(n, {})]
    best_peer = max(peers) if peers else None
    lines = [
        "## Training throughput (one step = fwd + bwd + clip + AdamW on 8 x 2048 tokens)",
        "",
        "| system | tokens/s | MFU | peak GiB | step ms | loss step 0 | loss last | vs best peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    extra = [
        "llamita-fp8-no-fsdp2",
        "llamita-bf16-coordinate-descent",
        "llamita-bf16-fsdp2-separate-clip",
        "llamita-bf16-fsdp2",
        "llamita-fp8-fsdp2",
    ]
    for name in ["llamita-bf16", "llamita-fp8", *extra, *(n for n, _ in PEERS)]:
        r = runs.get(name)
        if not r:
            continue
        if "tokens_per_s" not in r:
            lines.append(f"| {name} | {r.get('error', 'missing')} | | | | | | |")
            continue
        ratio = r["tokens_per_s"] / best_peer if best_peer else None
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {_fmt(r.get('peak_gib'), '.1f')} | "
            f"{r['step_ms']:.1f} | {r['loss_first']:.4f} | {r['loss_last']:.4f} | {_fmt(ratio, '.2f')}x |"
        )
    if results.get("ablation"):
        lines += [
            "",
            "## llamita ablation (each step applied to the best configuration so far)",
            "",
            "| step | change | tokens/s | MFU | peak GiB | kept |",
            "|---|---|---:|---:|---:|---|",
        ]
        for a in results["ablation"]:
            r = runs.get(a["run"], {})
            if "tokens_per_s" not in r:
                lines.append(f"| {a['step']} | {a['what']} | {r.get('error', 'missing')} | | | no |")
                continue
            lines.append(
                f"| {a['step']} | {a['what']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                f"{_fmt(r.get('peak_gib'), '.1f')} | {'yes' if a['kept'] else 'no'} |"
            )
    feed = [(n, runs[n]) for n in ("llamita-bf16", "llamita-bf16-loader") if n in runs]
    if "llamita-bf16-loader" in runs:
        base = runs.get("llamita-bf16", {}).get("tokens_per_s")
        lines += ["", "## Data feed (best bf16 configuration)", ""]
        lines += ["| feed | tokens/s | vs synthetic | host syncs/step | loss last |", "|---|---:|---:|---:|---:|"]
        feed[0] = ("synthetic (llamita-bf16)", feed[0][1])
        for name, r in feed:
            if "tokens_per_s" not in r:
                lines.append(f"| {name} | {r.get('error')} | | | |")
                continue
            ratio = r["tokens_per_s"] / base if base else None
            lines.append(
                f"| {name} | {r['tokens_per_s']:,.0f} | {_fmt(ratio, '.3f')} | "
                f"{_fmt(r.get('host_syncs_per_step'), '.1f')} | {r['loss_last']:.4f} |"
            )
    micro = runs.get("loss-microbench", {}).get("loss_microbench")
    if micro:
        lines += ["", "## Output head + cross-entropy alone (fwd + bwd, 16384 x 2048 bf16 -> 32000)", ""]
        lines += [
            "| variant | ms | extra peak GiB | loss abs err | dh rel err | dW rel err |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, m in micro.items():
            if "error" in m:
                lines.append(f"| {name} | {m['error']} | | | | |")
                continue
            lines.append(
                f"| {name} | {m['ms']:.2f} | {m['extra_peak_gib']:.2f} | {m['loss_abs_err']:.1e} | "
                f"{m['grad_hidden_rel_err']:.1e} | {m['grad_weight_rel_err']:.1e} |"
            )
    # "llamita-bf16" / "llamita-fp8" may name another run of the table ("from"): its profile is shown once.
    profiled = {n: r["profile"] for n, r in runs.items() if isinstance(r, dict) and "profile" in r and "from" not in r}
    if profiled:
        names = list(profiled)
        lines += ["", "## Where a step's time goes (torch.profiler, ms per step; kernel time by category)", ""]
        lines += ["| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        categories = sorted({c for p in profiled.values() for c in p["categories_ms"]})
        categories.sort(key=lambda c: -max(p["categories_ms"].get(c, 0.0) for p in profiled.values()))
        for cat in categories:
            cells = []
            for p in profiled.values():
                ms = p["categories_ms"].get(cat, 0.0)
                cells.append(f"{ms:.1f} ({100 * ms / p['step_wall_ms']:.0f}%)")
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
        idle = [p["step_wall_ms"] - p["gpu_busy_ms"] for p in profiled.values()]
        lines.append("| GPU idle (host overhead, gaps) | " + " | ".join(f"{ms:.1f}" for ms in idle) + " |")
        lines.append("| step wall | " + " | ".join(f"{p['step_wall_ms']:.1f}" for p in profiled.values()) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ data
def prepare_data(out: Path) -> None:
    """The demo corpus (stdlib prose 3 MB, code 6 MB), a 32000-token tokenizer and its token shards."""
    from llamita.data.demo_corpus import write_demo_corpus
    from llamita.data.prepare import prepare_source
    from llamita.tokenizer import Tokenizer, train_tokenizer

    corpus = write_demo_corpus(out / "corpus", max_code_bytes=6_000_000, max_prose_bytes=3_000_000)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(tok_dir)
    else:
        tokenizer = train_tokenizer(sorted(corpus.values()), 32000, tok_dir)
    print(f"tokenizer: {tokenizer.vocab_size} tokens")
    for name, path in corpus.items():
        m = prepare_source(name, [str(path)], tok_dir, out / name, shard_tokens=2**22, val_fraction=0.05, workers=2)
        print(f"{name}: {m['totals']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--smoke", action="store_true", help="debug preset on CPU, 2 steps per system, every ablation step kept"
    )
    parser.add_argument(
        "--groups",
        default="llamita,data,loss,peers",
        help="comma list of llamita, fp8, copies, tuning, data, loss, peers",
    )
    parser.add_argument("--peers", default="", help="comma list of peer names to run (default: all)")
    parser.add_argument("--data", default="", help="prepared data (--prepare-data) for the data-loader run")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"), help="results folder")
    parser.add_argument("--merge", default="", help="earlier results JSON to extend")
    parser.add_argument("--deadline", type=float, default=570.0, help="seconds for the whole call")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for one system")
    parser.add_argument("--prepare-data", default="", help="write the demo corpus, tokenizer and shards here")
    parser.add_argument("--tables", default="", help="print the tables of a results JSON and exit")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(run_worker(json.loads(args.worker))))
        return
    if args.prepare_data:
        prepare_data(Path(args.prepare_data))
        return
    if args.tables:
        print(tables(json.loads(Path(args.tables).read_text())))
        return
    args.groups = args.groups.split(",")
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    results = run_groups(args, shape)
    print()
    print(tables(results))


if __name__ == "__main__":
    main()
