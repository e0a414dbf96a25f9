"""Processes, device mesh and the parallelisms wrapped around a built model, applied from outside in a fixed order.

`init_distributed` joins the process group that `torchrun` describes (or does nothing in a plain process);
`plan_parallel` decides once whether FSDP2 wraps the model and in which dtype it computes; `parallelize` applies
float8 -> activation checkpointing -> compile -> FSDP2 (HSDP on a 2-D mesh), as torchtitan does. The model code
(`model/llama.py`) knows none of this, and every step keeps the parameter names, so checkpoints stay named like
Hugging Face's LlamaForCausalLM whatever was applied.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llamita.config import ConfigError, ParallelConfig, RunConfig
from llamita.model.llama import Llama

# Selective activation checkpointing keeps these ops' outputs and recomputes the cheap rest of a block (norms,
# RoPE, SiLU, products): the matmuls and attention are what is expensive to redo.
_SAC_SAVE_OPS = [
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_mm.default,  # float8 matmuls
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits among the training processes."""

    rank: int
    """Global rank (0 in a plain process)."""
    local_rank: int
    """Rank on this node; picks the GPU."""
    world_size: int
    """Number of processes (1 in a plain process)."""
    device: torch.device
    """This process's compute device."""


@dataclass(frozen=True)
class ParallelPlan:
    """The decisions that follow from the config and the launch; made once, in `plan_parallel`."""

    fsdp: bool
    """Wrap the model with FSDP2 (it then holds `weights_dtype` shards and casts them to `compute_dtype`)."""
    copies: bool
    """Keep `compute_dtype` copies of the fp32 weights for compute (`copies.ComputeCopies`; one process only)."""
    compute_dtype: torch.dtype
    """Dtype of forward and backward matmuls."""
    autocast_dtype: torch.dtype | None
    """Autocast to this dtype in the trainer; None when FSDP2 already casts the weights, or in fp32."""
    weights_dtype: torch.dtype = torch.float32
    """Dtype the parameters are stored and updated in (`train.weights`): fp32 masters, or bf16 ones that are also
    the compute weights (no copies, no autocast, no cast in FSDP2)."""


def pick_device(name: str, local_rank: int | None = None, option: str = "train.device") -> torch.device:
    """`auto` means CUDA when available, else CPU; under torchrun (`local_rank` given) CUDA is GPU `local_rank`.

    Args:
        name: auto, cpu, cuda or cuda:N.
        local_rank: this process's GPU under torchrun.
        option: the setting `name` came from, named in errors (a config key or a command-line flag).

    Raises:
        ConfigError: An unknown device name, an explicit `cuda` without a GPU, or a GPU index it does not have.
    """
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"{option}: unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option}: cuda requested but no CUDA device is available; use cpu or auto")
    if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(f"{option}: {name} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    if name.startswith("cuda") and local_rank is not None:
        return torch.device("cuda", local_rank)  # one GPU per process
    return torch.device(name)


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(device: str = "auto") -> DistEnv:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); in a plain process return rank 0 of 1.

    torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each process it starts. A group
    that already exists (a test harness's, a second call) is used as it is.

    Args:
        device: `train.device`: auto, cpu or cuda.
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched and not dist.is_initialized():
        return DistEnv(rank=0, local_rank=0, world_size=1, device=pick_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(_backend(dev.type), device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=dev)


def end_distributed() -> None:
    """Destroy the default process group once every rank is done with it; without one, do nothing.

    gloo can abort a process ("terminate called without an active exception") when a peer closes its connections
    while that process is still finishing the last collective. So each rank finishes a barrier, then says so through
    the rendezvous store (not gloo), and tears the group down only when every rank has.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
        store = dist.distributed_c10d._get_default_store()
        store.set(f"llamita/ended/{dist.get_rank()}", "1")
        store.wait([f"llamita/ended/{rank}" for rank in range(dist.get_world_size())])
    dist.destroy_process_group()


_Report = TypeVar("_Report")


def first_failure(report: _Report | None) -> tuple[int, _Report] | None:
    """Share each rank's failure report (None where its part succeeded): the first failing rank and its report,
    the same on every rank, so that all of them stop together instead of the healthy ones waiting in the next
    collective for a rank that has raised. Without a process group, this process's own report."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None if report is None else (0, report)
    reports: list[_Report | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    return next(((rank, r) for rank, r in enumerate(reports) if r is not None), None)


def plan_parallel(cfg: RunConfig, env: DistEnv) -> ParallelPlan:
    """Check `cfg.parallel` against the launch and decide FSDP and the compute dtype, in one place.

    With FSDP2 its mixed-precision policy casts the fp32 shards to bf16 when it gathers them, so the trainer must
    not autocast as well; with compute copies the model computes with bf16 copies the optimizer keeps up to date;
    otherwise bf16 comes from autocast over fp32 weights. With `train.weights` bf16 the weights are the compute
    weights: one process needs neither FSDP2 nor copies, several shard the bf16 parameters with FSDP2. Compute
    copies belong to the fp32 AdamW (`optim.CopiesAdamW`), so `optim.name` adamw8bit leaves them off.

    Raises:
        ConfigError: A value that cannot work with this launch; the message names the field.
    """
    par = cfg.parallel
    if par.dp_replicate < 1 or env.world_size % par.dp_replicate:
        raise ConfigError(
            f"parallel.dp_replicate={par.dp_replicate} must be >= 1 and divide the number of processes "
            f"({env.world_size}); set it to the number of nodes (1 on one node)"
        )
    if par.fsdp == "off" and env.world_size > 1:
        raise ConfigError(
            f"parallel.fsdp=off with {env.world_size} processes would train {env.world_size} separate models; "
            "use parallel.fsdp auto or on"
        )
    if par.float8:
        _check_float8(env.device)
    bf16_weights = cfg.train.weights == "bf16"
    if cfg.optim.name == "adamw8bit" and env.world_size > 1:
        # torch 2.13's compile of torchao's update fails on the sharded 8-bit moments (OptimState8bit has no
        # aten.view.dtype), at the first step; refused here, at the start, instead.
        raise ConfigError(
            f"optim.name=adamw8bit runs in one process; this launch has {env.world_size}: torchao's 8-bit moments "
            "do not compile as FSDP2 shards. Use optim.name adamw with train.weights bf16 on several ranks"
        )
    name = cfg.train.dtype
    if name == "auto":
        name = "bf16" if env.device.type == "cuda" or bf16_weights else "fp32"
    compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]  # bf16 weights: `check_config` saw to it
    fp32_adamw = cfg.optim.name == "adamw" and not bf16_weights  # what compute copies step with (`check_config`)
    if par.copies == "on" and (env.world_size > 1 or par.fsdp == "on" or compute_dtype == torch.float32):
        raise ConfigError(
            "parallel.copies=on needs one process, parallel.fsdp auto or off, and train.dtype bf16 "
            f"(got {env.world_size} processes, fsdp {par.fsdp}, dtype {name}); with several processes FSDP2 casts"
        )
    if par.copies == "on" and par.activation_checkpoint != "none":
        raise ConfigError(
            f"parallel.copies=on does not work with parallel.activation_checkpoint={par.activation_checkpoint}: "
            "backward would recompute the blocks after the compute copies were swapped out; set parallel.copies "
            "off (FSDP2 casts instead) or parallel.activation_checkpoint none"
        )
    # On one GPU, copies beat FSDP2's single-rank gathers and casts (bench/results/2026-11-24-compute-copies.md).
    copies = par.copies == "on" or (
        par.copies == "auto"
        and par.fsdp != "on"
        and par.activation_checkpoint == "none"
        and env.world_size == 1
        and env.device.type == "cuda"
        and compute_dtype == torch.bfloat16
        and fp32_adamw
    )
    one_gpu_cast = env.device.type == "cuda" and not copies and not bf16_weights  # FSDP2 as the bf16 cast
    fsdp = par.fsdp == "on" or (par.fsdp == "auto" and (env.world_size > 1 or one_gpu_cast))
    if par.dp_replicate > 1 and not fsdp:
        raise ConfigError("parallel.dp_replicate > 1 needs FSDP2; set parallel.fsdp on")
    if compute_dtype == torch.bfloat16 and env.device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "train.dtype=bf16 on a CPU without native bf16 matrix instructions (AVX512-BF16 or AMX): it will run "
            "slower than fp32; set train.dtype fp32",
            stacklevel=2,
        )
    autocast = None if fsdp or copies or bf16_weights or compute_dtype == torch.float32 else compute_dtype
    weights = torch.bfloat16 if bf16_weights else torch.float32
    return ParallelPlan(
        fsdp=fsdp, copies=copies, compute_dtype=compute_dtype, autocast_dtype=autocast, weights_dtype=weights
    )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), so that bf16 autocast is faster
    than fp32 there (about 1.5x for the demo model on 2 cores) rather than emulated and slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def build_mesh(world_size: int, dp_replicate: int, device_type: str) -> DeviceMesh:
    """The data-parallel mesh: 1-D ("dp_shard",), or 2-D ("dp_replicate", "dp_shard") for HSDP.

    torchrun numbers ranks node by node, so with `dp_replicate` = nodes each row of the 2-D mesh is one node:
    parameters are sharded inside a node (fast links) and replicated across nodes, which then exchange only one
    gradient all-reduce per step. A plain process gets a private one-process group, since FSDP2 needs one.
    """
    if not dist.is_initialized():
        if world_size != 1:
            raise RuntimeError(f"build_mesh: {world_size} ranks but no process group; launch with torchrun")
        device_id = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else None
        dist.init_process_group(
            _backend(device_type), store=dist.HashStore(), rank=0, world_size=1, device_id=device_id
        )
    if dp_replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(
        device_type, (dp_replicate, world_size // dp_replicate), mesh_dim_names=("dp_replicate", "dp_shard")
    )


def _check_float8(device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError(f"parallel.float8 needs a CUDA GPU (compute capability >= 8.9), not {device.type}")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError("parallel.float8 needs torchao: pip install torchao") from None
    if torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"parallel.float8 needs compute capability >= 8.9 (H100, L40S, ...); {name} has less")


def float8_filter(module: nn.Module, fqn: str) -> bool:
    """Convert a block's linear layer when both dims are multiples of 16 (float8 matmul tiles); lm_head stays."""
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith("model.layers.")
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def apply_float8(model: Llama, device: torch.device) -> None:
    """Swap the blocks' big nn.Linear layers for torchao's Float8Linear (dynamic tensorwise scaling), in place.

    Weights stay high-precision parameters with the same names; inputs, weights and gradients are cast to float8
    for the matmuls. It pays off with `parallel.compile`, which fuses the casts.
    """
    _check_float8(device)
    from torchao.float8 import convert_to_float8_training

    convert_to_float8_training(model, module_filter_fn=float8_filter)


def apply_activation_checkpointing(model: Llama, mode: str) -> None:
    """Wrap every block so backward recomputes its activations: `full` all of them, `selective` the cheap ones.

    The wrapper's state_dict hooks and DCP's `get_state_dict` drop its `_checkpoint_wrapped_module.` prefix, so
    checkpoints keep their names.
    """
    if mode == "none":
        return
    if mode not in ("selective", "full"):
        raise ConfigError(f"parallel.activation_checkpoint: expected none, selective or full, got {mode!r}")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    # The blocks have no dropout, so recomputation draws no random numbers and needs no RNG bookkeeping.
    kwargs: dict = {"preserve_rng_state": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _SAC_SAVE_OPS)
    layers = model.model.layers
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, **kwargs)


def apply_compile(model: Llama) -> None:
    """torch.compile each block in place (`Module.compile`), so no `_orig_mod.` enters parameter names.

    Blocks are identical, so one compiled graph serves all of them; compiling per block keeps compile time short
    and leaves FSDP2's per-block communication outside the graphs. Shapes are static: with dynamo's automatic
    dynamic shapes, one call of another batch size (a validation batch before the first training step) made the
    training graphs shape-generic for the rest of the run, 10% slower in fp8 on an H100.
    """
    for block in model.model.layers:
        block.compile(dynamic=False)


def apply_fsdp(
    model: Llama,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2 `fully_shard` on each block, then on the root (embeddings, final norm, lm_head), in place.

    Parameters become DTensor shards over `mesh` (HSDP when it is 2-D) kept in their dtype for the optimizer (fp32,
    or bf16 with `train.weights` bf16, which `param_dtype` bf16 then leaves uncast); each block's are gathered and
    cast to `param_dtype` around its forward and backward, and gradients are reduced in `reduce_dtype`: fp32 also
    for bf16 weights, where FSDP2 then sums the micro-batches' unsharded gradients in fp32 and casts the reduced
    shard to bf16. A tied lm_head is the same parameter as the embedding, and the root group holds it once.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layers = model.model.layers
    for i, block in enumerate(layers):
        # The last block's backward starts right after forward: resharding it would only gather it again.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    # Likewise the root, whose forward ends with the loss through lm_head.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def parallelize(
    model: Llama,
    cfg: ParallelConfig,
    mesh: DeviceMesh | None,
    device: torch.device,
    *,
    param_dtype: torch.dtype = torch.float32,
    weights_dtype: torch.dtype = torch.float32,
) -> Llama:
    """Cast to `weights_dtype`, then apply float8 -> activation checkpointing -> compile -> FSDP2 to an initialised
    model, in place.

    Args:
        model: Built and initialised on `device` (the same weights on every rank).
        cfg: The `parallel` config section.
        mesh: From `build_mesh`; None leaves the model unsharded (no FSDP2).
        device: This rank's device.
        param_dtype: FSDP2's compute dtype (`ParallelPlan.compute_dtype`).
        weights_dtype: The parameters' own dtype (`ParallelPlan.weights_dtype`): bf16 casts them (and the RoPE
            tables, which the model casts to the activations' dtype anyway) before anything wraps them.

    Returns:
        The same model object.
    """
    if weights_dtype != torch.float32:
        model.to(weights_dtype)
    if cfg.float8:
        apply_float8(model, device)
    apply_activation_checkpointing(model, cfg.activation_checkpoint)
    if cfg.compile:
        apply_compile(model)
    if mesh is not None:
        apply_fsdp(model, mesh, param_dtype=param_dtype, reshard_after_forward=cfg.reshard_after_forward)
    return model
