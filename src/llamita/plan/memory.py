"""GPU memory of a llamita training step, term by term, and the GPUs it is planned for.

`memory_per_gpu` adds up what one GPU holds at the two moments that can be a step's peak:

* the end of forward, inside the chunked loss: fp32 master weights, the bf16 compute weights (compute copies, or
  FSDP2's gathered blocks), the optimizer state, every tensor the blocks saved for backward, and the loss's buffers;
* the backward of the first block (the last of backward), when the gradients are (nearly) all there and one
  block's activations are live (recomputed, with activation checkpointing).

Per token, one block saves (bytes; D dim, kv = n_kv_heads * head_dim, I intermediate size, H heads, s = 2 in bf16):

| setting | saved per token and block | bytes |
|---|---|---|
| compiled (default) | input, 2 norm outputs, q, k, v, attention out, gate, up, product | s(6D + 2kv + 3I) + 4H + 8 |
| compiled + float8 | the same less the norm outputs and the SwiGLU product | s(4D + 2kv + 2I) + 4H + 8 |
| eager block | per norm fp32 input + normed + scaled; q, k, v, attention out; 4 MLP | 8D + 6sD + 2s kv + 4sI + 4H + 8 |
| selective checkpointing | input, q, k, v, attention out, o_proj out, gate, up | s(4D + 2kv + 2I) + 4H + 8 |
| full checkpointing | the block's input | sD |

4H + 8 are fp32 statistics: SDPA's log-sum-exp per head and the two RMSNorm scales. SDPA's flash/cuDNN kernels keep
no T x T matrix, so nothing grows with the square of the sequence. Why float8 saves less: torchao casts each
linear's input to float8 with a scale from its absolute maximum, and the compiled block then recomputes the norm
outputs and the SwiGLU product in backward (cheap pointwise work on tensors it keeps anyway) instead of saving
them; the attention output stays, SDPA's backward needs it. Eager selective checkpointing also keeps the
down-projection's output (+sD; derived, not measured), and float8 without compile is counted as bf16 (torchao's
autograd function keeps the high-precision inputs; not measured). The final RMSNorm runs eagerly: the fp32 copy of
its input and the normed output, 4D + sD + 4 bytes per token. fp32 compute is the same with s = 4 (eager fp32 is
checked on CPU, where every term matches the saved tensors byte for byte).

The loss (`llamita.model.loss`) holds its input hidden states and their gradient (sD each per token), the fp32
gradient of the output head (4VD) and the logits of the 4096-row chunks in flight: the logits and their gradient
(2 chunks), and with more rows than one chunk the next chunk's logits before the last gradient is freed (3).
cuBLAS's two workspaces (forward thread, autograd's backward thread, 32 MiB each) come out of PyTorch's allocator.

Against `torch.cuda.max_memory_allocated` (tinyllama-1.1b unless named, seq 2048, one GPU, torch 2.11; "bench":
`bench/results/2026-11-24-*.json`, one H100; the rest measured on one H200 by `bench/memory_probe.py`, results in
`bench/results/2026-12-01-memory-probe-*.json`, phase by phase, at the end of the
embedding, before and after the final norm, after forward and backward; each term of the model was read off
those phases and none was fitted to a total):

| run | measured GiB | model GiB | error |
|---|---:|---:|---:|
| compute copies, micro-batch 8 (bench) | 35.70 | 35.68 | -0.05% |
| fp8, compute copies, micro-batch 8 (bench) | 29.17 | 29.15 | -0.07% |
| FSDP2 without resharding, micro-batch 8, bf16 / fp8 (bench) | 35.70 / 29.17 | 35.68 / 29.15 | -0.05% / -0.07% |
| FSDP2 resharding, micro-batch 8 (bench) | 33.97 | 33.95 | -0.05% |
| compute copies, micro-batch 2 / 4 / 16 | 20.23 / 25.54 / 56.01 | 20.21 / 25.53 / 55.97 | -0.07 / -0.05 / -0.07% |
| compute copies, micro-batch 8 at seq 1024 | 25.54 | 25.53 | -0.04% |
| compute copies, eager blocks, micro-batch 8 | 44.99 | 44.96 | -0.06% |
| fp8, compute copies, micro-batch 4 | 22.28 | 22.26 | -0.07% |
| tinyllama-120m, compiled / eager, micro-batch 8 | 6.60 / 8.48 | 6.58 / 8.45 | -0.35% / -0.35% |
| FSDP2 resharding, selective / full checkpointing | 27.43 / 17.91 | 27.42 / 17.85 | -0.04% / -0.29% |
| FSDP2 resharding, fp8, selective / full checkpointing | 27.44 / 17.84 | 27.42 / 17.85 | -0.05% / +0.05% |
| FSDP2 without resharding, selective checkpointing | 29.16 | 29.15 | -0.04% |

So the allocated peak is modelled to within 0.4% at these shapes. What a card must hold is more: the CUDA context
and library handles outside PyTorch's allocator (0.75 GiB measured on an H200, 0.55 GiB more with an NCCL process
group, i.e. with FSDP2), and the caching allocator's fragmentation, which `total_gib` covers with 5% of the
allocated peak (reserved exceeded allocated by 1-15% in the benchmarks, but the allocator frees its cache and
retries before it reports out-of-memory, so most of that is not needed).

No torch import: the CLI plans without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamita.model.config import ModelConfig
from llamita.plan.errors import PlanError

GIB = 2**30

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
"""Bytes per element of the compute dtype (`dtype`); master weights, gradients and optimizer state stay fp32."""

OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4}
"""fp32 optimizer state per parameter: AdamW's two moments; SGD's momentum buffer."""

ACTIVATION_CHECKPOINT = ("none", "selective", "full")
"""`parallel.activation_checkpoint` values."""

LOSS_CHUNK_ROWS = 4096
"""Rows per chunk of the chunked cross-entropy (`llamita.model.loss.DEFAULT_CHUNK_SIZE`)."""

CUBLAS_WORKSPACE_BYTES = 2 * 32 * 2**20
"""cuBLAS workspaces of the forward and the autograd thread, allocated through PyTorch's caching allocator."""

CUDA_CONTEXT_GIB = 0.75
"""CUDA context, cuBLAS/cuDNN handles and loaded kernels, outside PyTorch's allocator (measured on an H200)."""

NCCL_GIB = 0.55
"""NCCL's buffers for the process group FSDP2 runs in (measured on an H200 with a one-rank group)."""

ALLOCATOR_SLACK = 0.05
"""Fraction of the allocated peak added for the caching allocator's fragmentation."""


@dataclass(frozen=True)
class MemoryTerms:
    """What one GPU holds at one moment of a step, GiB."""

    weights_gib: float
    """fp32 master weights (this rank's shard)."""
    compute_weights_gib: float
    """Compute-dtype weights: the compute copies, or FSDP2's gathered (unsharded) parameters live at that moment."""
    gradients_gib: float
    """Gradients: none at the end of forward unless accumulated over micro-batches."""
    optimizer_gib: float
    """Optimizer state (this rank's shard)."""
    activations_gib: float
    """Tensors saved for backward by the blocks and the final norm (at the end of backward: one block's)."""
    loss_gib: float
    """The chunked loss: its input and input gradient, the fp32 head-weight gradient, the logit chunks in flight."""
    workspace_gib: float
    """cuBLAS workspaces."""
    allocated_gib: float
    """Their sum: what `torch.cuda.memory_allocated` would show."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU memory of a training step for one setup; `total_gib` is what the card must have."""

    seq_len: int
    """Tokens per sequence."""
    micro_batch: int
    """Sequences per GPU per forward."""
    fsdp_degree: int
    """GPUs the weights, gradients and optimizer state are sharded over."""
    copies: bool
    """bf16 compute copies (one GPU, no FSDP2); False: FSDP2 (on one GPU too, as llamita does)."""
    activation_checkpoint: str
    """none, selective or full."""
    float8: bool
    """torchao float8 linears in the blocks."""
    compile: bool
    """torch.compile'd blocks."""
    dtype: str
    """Compute dtype."""
    optimizer: str
    """Optimizer whose state is counted."""
    reshard_after_forward: bool
    """FSDP2 frees gathered blocks after their forward (no effect with compute copies)."""
    grad_accumulation: bool
    """fp32 gradients are held across the micro-batches of a step."""
    forward: MemoryTerms
    """Held at the end of forward (inside the loss)."""
    backward: MemoryTerms
    """Held during the first block's backward (the last of backward)."""
    peak_phase: str
    """`forward` or `backward`: the larger of the two."""
    peak_allocated_gib: float
    """The larger allocated sum: what `torch.cuda.max_memory_allocated` reports."""
    context_gib: float
    """CUDA context, library handles and NCCL buffers, outside PyTorch's allocator."""
    slack_gib: float
    """Allowance for the caching allocator's fragmentation."""
    total_gib: float
    """peak_allocated_gib + context_gib + slack_gib."""


def activation_bytes_per_token(
    config: ModelConfig,
    *,
    activation_checkpoint: str = "none",
    compile: bool = True,
    float8: bool = False,
    dtype: str = "bf16",
) -> float:
    """Bytes one transformer block keeps for its backward, per token (the table in this module's docstring).

    Args:
        config: The model.
        activation_checkpoint: none, selective or full.
        compile: Blocks compiled with torch.compile (as `parallel.compile`).
        float8: float8 linears (changes what a compiled block without checkpointing saves).
        dtype: Compute dtype, a key of `DTYPE_BYTES`.

    Returns:
        Bytes per token per block.
    """
    s = DTYPE_BYTES[dtype]
    d, kv, i = config.dim, config.n_kv_heads * config.head_dim, config.intermediate_size
    stats = 4 * config.n_heads + 8  # fp32: SDPA log-sum-exp per head, two RMSNorm scales
    if activation_checkpoint == "full":
        return s * d
    if activation_checkpoint == "selective":
        return s * ((4 if compile else 5) * d + 2 * kv + 2 * i) + stats
    if not compile:
        return 8 * d + 6 * s * d + 2 * s * kv + 4 * s * i + stats
    if float8:
        return s * (4 * d + 2 * kv + 2 * i) + stats
    return s * (6 * d + 2 * kv + 3 * i) + stats


def memory_per_gpu(
    config: ModelConfig,
    *,
    seq_len: int,
    micro_batch: int,
    fsdp_degree: int = 1,
    activation_checkpoint: str = "none",
    float8: bool = False,
    copies: bool | None = None,
    optimizer: str = "adamw",
    dtype: str = "bf16",
    compile: bool = True,
    reshard_after_forward: bool = True,
    grad_accumulation: bool = False,
) -> MemoryEstimate:
    """Peak memory of one GPU in a llamita training step (see the module docstring for the model and its error).

    Args:
        config: The model.
        seq_len: Tokens per sequence.
        micro_batch: Sequences per GPU per forward.
        fsdp_degree: GPUs that shard weights, gradients and optimizer state (FSDP2 / ZeRO-3).
        activation_checkpoint: none, selective or full (`parallel.activation_checkpoint`).
        float8: torchao float8 linears in the blocks (`parallel.float8`); needs bf16.
        copies: bf16 compute copies instead of FSDP2 (`parallel.copies`); None: as llamita's `auto`, on for one
            GPU in bf16 without activation checkpointing.
        optimizer: A key of `OPTIMIZER_STATE_BYTES`.
        dtype: Compute dtype, bf16 or fp32; master weights, gradients and optimizer state are fp32 either way.
        compile: torch.compile'd blocks (`parallel.compile`).
        reshard_after_forward: FSDP2 frees gathered blocks after forward (`parallel.reshard_after_forward`).
        grad_accumulation: A step accumulates several micro-batches, so fp32 gradients are held through forward.

    Returns:
        The terms at the end of forward and in backward, the peak, and the total a card must hold.

    Raises:
        PlanError: An option is out of range or the combination is one llamita refuses; the message names it.
    """
    for name, value in (("seq_len", seq_len), ("micro_batch", micro_batch), ("fsdp_degree", fsdp_degree)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    for name, value, allowed in (
        ("activation_checkpoint", activation_checkpoint, ACTIVATION_CHECKPOINT),
        ("dtype", dtype, tuple(DTYPE_BYTES)),
        ("optimizer", optimizer, tuple(OPTIMIZER_STATE_BYTES)),
    ):
        if value not in allowed:
            raise PlanError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
    if float8 and dtype != "bf16":
        raise PlanError(f"float8 trains with bf16 compute; got dtype {dtype!r}")
    copies = _resolve_copies(copies, fsdp_degree, activation_checkpoint, dtype)

    s = DTYPE_BYTES[dtype]
    n = fsdp_degree
    d, v = config.dim, config.vocab_size
    tokens = seq_len * micro_batch
    params = config.num_params
    block_params = (config.num_non_embedding_params - d) // config.n_layers
    root_params = params - config.n_layers * block_params  # embeddings, output head, final norm
    master = 4 * params / n
    state = OPTIMIZER_STATE_BYTES[optimizer] * params / n
    fp32_grads = 4 * params / n

    if copies or not reshard_after_forward:
        gathered_forward = gathered_backward = s * params
    else:  # FSDP2 keeps the root and the last block gathered; backward holds a block and the next one's prefetch
        gathered_forward = s * (root_params + block_params)
        gathered_backward = s * (root_params + 2 * block_params)
    if copies:  # bf16 gradients land on the copies; accumulated ones are summed in fp32 on the masters
        grads_backward = fp32_grads if grad_accumulation else s * params
    else:  # FSDP2 reduce-scatters each block's unsharded gradients into fp32 shards
        grads_backward = fp32_grads + s * block_params

    per_block = activation_bytes_per_token(
        config, activation_checkpoint=activation_checkpoint, compile=compile, float8=float8, dtype=dtype
    )
    final_norm = 4 * d + s * d + 4
    # A checkpointed block is recomputed whole in backward; float8's smaller saved set is offset there by its casts.
    live_block = (
        per_block
        if activation_checkpoint == "none"
        else activation_bytes_per_token(config, compile=compile, dtype=dtype)
    )
    chunk = min(LOSS_CHUNK_ROWS, tokens)
    chunks_live = 3 if tokens > chunk else 2
    loss = 2 * s * tokens * d + 4 * v * d + chunks_live * s * chunk * v

    forward = _terms(
        weights=master,
        compute_weights=gathered_forward,
        gradients=fp32_grads if grad_accumulation else 0.0,
        optimizer=state,
        activations=tokens * (config.n_layers * per_block + final_norm),
        loss=loss,
    )
    backward = _terms(
        weights=master,
        compute_weights=gathered_backward,
        gradients=grads_backward,
        optimizer=state,
        activations=tokens * live_block,
        loss=0.0,
    )
    peak_phase, peak = max(("forward", forward), ("backward", backward), key=lambda p: p[1].allocated_gib)
    context = CUDA_CONTEXT_GIB + (0.0 if copies else NCCL_GIB)
    slack = ALLOCATOR_SLACK * peak.allocated_gib
    return MemoryEstimate(
        seq_len=seq_len,
        micro_batch=micro_batch,
        fsdp_degree=fsdp_degree,
        copies=copies,
        activation_checkpoint=activation_checkpoint,
        float8=float8,
        compile=compile,
        dtype=dtype,
        optimizer=optimizer,
        reshard_after_forward=reshard_after_forward,
        grad_accumulation=grad_accumulation,
        forward=forward,
        backward=backward,
        peak_phase=peak_phase,
        peak_allocated_gib=peak.allocated_gib,
        context_gib=context,
        slack_gib=slack,
        total_gib=peak.allocated_gib + context + slack,
    )


def fits(config: ModelConfig, gpu_gib: float, *, seq_len: int, micro_batch: int, **options: Any) -> bool:
    """Whether a training step fits in `gpu_gib` of GPU memory (`memory_per_gpu(...).total_gib <= gpu_gib`).

    Args:
        config: The model.
        gpu_gib: Memory of one GPU, GiB (`GPU.memory_gib`).
        seq_len: Tokens per sequence.
        micro_batch: Sequences per GPU per forward.
        **options: The other keyword options of `memory_per_gpu`.

    Returns:
        True when the estimate's total is within `gpu_gib`.

    Raises:
        PlanError: `gpu_gib` is not positive, or an option is invalid.
    """
    _check_gpu_gib(gpu_gib)
    return memory_per_gpu(config, seq_len=seq_len, micro_batch=micro_batch, **options).total_gib <= gpu_gib


def largest_micro_batch(config: ModelConfig, gpu_gib: float, *, seq_len: int, limit: int = 4096, **options: Any) -> int:
    """The largest micro-batch (sequences per GPU) whose training step fits in `gpu_gib`.

    Args:
        config: The model.
        gpu_gib: Memory of one GPU, GiB (`GPU.memory_gib`).
        seq_len: Tokens per sequence.
        limit: Largest micro-batch tried.
        **options: The other keyword options of `memory_per_gpu`.

    Returns:
        The micro-batch, at most `limit`; 0 when not even one sequence fits.

    Raises:
        PlanError: `gpu_gib` is not positive, or an option is invalid.
    """
    _check_gpu_gib(gpu_gib)

    def ok(micro_batch: int) -> bool:
        return memory_per_gpu(config, seq_len=seq_len, micro_batch=micro_batch, **options).total_gib <= gpu_gib

    if not ok(1):
        return 0
    low, high = 1, 2  # ok(low); grow high until it fails (memory grows with the micro-batch)
    while high <= limit and ok(high):
        low, high = high, 2 * high
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return low


def _resolve_copies(copies: bool | None, fsdp_degree: int, activation_checkpoint: str, dtype: str) -> bool:
    """`parallel.copies` as `plan_parallel` resolves it, with its refusals as PlanErrors."""
    if copies is None:
        return fsdp_degree == 1 and activation_checkpoint == "none" and dtype == "bf16"
    if copies and fsdp_degree > 1:
        raise PlanError(f"copies: compute copies are for one GPU; with fsdp_degree {fsdp_degree} FSDP2 shards")
    if copies and activation_checkpoint != "none":
        raise PlanError(
            f"copies: compute copies do not work with activation_checkpoint {activation_checkpoint!r} "
            "(a recomputed block would see the fp32 masters); use copies off or activation_checkpoint none"
        )
    if copies and dtype != "bf16":
        raise PlanError(f"copies: compute copies are bf16; got dtype {dtype!r}")
    return copies


def _terms(
    *, weights: float, compute_weights: float, gradients: float, optimizer: float, activations: float, loss: float
) -> MemoryTerms:
    """MemoryTerms from byte counts."""
    parts = [weights, compute_weights, gradients, optimizer, activations, loss, CUBLAS_WORKSPACE_BYTES]
    gib = [p / GIB for p in parts]
    return MemoryTerms(*gib, allocated_gib=sum(gib))


def _check_gpu_gib(gpu_gib: float) -> None:
    if isinstance(gpu_gib, bool) or not isinstance(gpu_gib, (int, float)) or not gpu_gib > 0:
        raise PlanError(f"gpu_gib must be a positive number of GiB, got {gpu_gib!r}")
