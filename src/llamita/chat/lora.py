"""LoRA applied from outside the model: adapters on chosen linear layers, merging them in, and PEFT-format export.

`apply_lora` swaps each targeted `nn.Linear` of a built `Llama` for a `LoRALinear` that keeps the layer's own
`weight` Parameter, so the base keeps its Hugging Face name (``model.layers.0.self_attn.q_proj.weight``), and adds
two small factors as submodules named as peft names them: ``q_proj.lora_A.weight`` [r, in] and
``q_proj.lora_B.weight`` [out, r]. The adapters' state dict is thus a peft adapter state dict once
``base_model.model.`` is put in front of every name, which is what `export_peft_adapter` writes
(adapter_model.safetensors + adapter_config.json, loaded by ``peft.PeftModel.from_pretrained``).

Order in a run: load the base weights -> `apply_lora` -> `train.parallel.parallelize` -> build the optimizer.
Compile and FSDP2 then see the factors as ordinary parameters of their block; the frozen base and the trainable
factors share one FSDP2 group (FSDP2 shards per parameter and reduce-scatters only the gradients that exist).

Shapes: N tokens (any leading dims), in / out the layer's features, r the rank.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from llamita.interop.checkpoint_io import MODEL_KEY, WeightSource, model_shapes
from llamita.interop.hf import DEFAULT_MAX_SHARD_BYTES, DTYPES, write_hf
from llamita.tokenizer import Tokenizer
from llamita.train import checkpoint as ckpt

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The attention and MLP projections of every block."""
PEFT_PREFIX = "base_model.model."
"""What peft puts in front of a transformers module name in its saved adapter state dicts."""
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
_FACTORS = ("lora_A", "lora_B")
_FACTOR_SUFFIXES = tuple(f".{factor}.weight" for factor in _FACTORS)
# Prefixes that activation checkpointing and torch.compile put into module names; state dicts drop them.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass(frozen=True)
class LoRAConfig:
    """Which linear layers get a low-rank adapter, of which rank and scale; peft's LoraConfig fields in brackets."""

    rank: int = 8
    """Inner dimension of the two factors (`r`)."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank (`lora_alpha`)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (`lora_dropout`); the base path has none."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Module-name suffixes to adapt, matched as peft matches a `target_modules` list: a module whose name equals
    a target or ends in ``.<target>``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))  # a YAML list arrives as a list
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(
                f"LoRAConfig.targets must be a non-empty list of module-name suffixes such as "
                f"{', '.join(DEFAULT_TARGETS)}; got {list(self.targets)!r}"
            )

    @classmethod
    def of(cls, section: Any) -> LoRAConfig:
        """The adapters of a run config's `lora` section (`config.LoRAConfig`, or its dict in a saved config)."""
        get = section.get if isinstance(section, Mapping) else lambda key, default=None: getattr(section, key)
        return cls(get("rank"), get("alpha"), get("dropout", 0.0), tuple(get("targets")))

    @property
    def scale(self) -> float:
        """The factor alpha / rank on the update B @ A."""
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """A linear layer plus a trainable low-rank update: y = x W^T (+ b) + dropout(x) A^T B^T * alpha / rank.

    `weight` (and `bias`) are the wrapped layer's own Parameters, so their names, their tying and anything
    holding them stay as they were. The update is computed from the activations, as peft does, rather than by
    reparametrizing `weight` (`torch.nn.utils.parametrize`): that would rename the weight
    (``q_proj.parametrizations.weight.original``), could not put dropout on the adapter's input, and would build
    a full [out, in] W + B @ A, and its gradient, in every forward.

    Args:
        base: The layer to adapt; its parameters are taken over, not copied.
        rank: Inner dimension r of the factors.
        alpha: Scale numerator; the update is multiplied by alpha / rank.
        dropout: Dropout probability on the adapter's input (0: none).
        generator: Random source for A's initialisation.
    """

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator | None = None
    ) -> None:
        # On the meta device nn.Linear allocates nothing: the base's Parameters replace its placeholders below.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        self.scale = alpha / rank
        self.reset_lora_parameters(generator)

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A as peft initialises it (nn.Linear's kaiming-uniform, a = sqrt(5)); B = 0, so the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)  # [N, out]
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))  # [N, r] -> [N, out]
        return y + update * self.scale  # [N, out]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.out_features}, scale={self.scale:g}"


def _matches(name: str, target: str) -> bool:
    """peft's rule for a `target_modules` list entry."""
    return name == target or name.endswith(f".{target}")


def _clean(name: str) -> str:
    """A parameter or module name as state dicts and checkpoints spell it (without wrapper prefixes)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, config: LoRAConfig, generator: torch.Generator | None = None) -> list[str]:
    """Freeze every parameter of `model` and give each targeted linear layer a trainable LoRA adapter, in place.

    Call it on a model holding its base weights, before `train.parallel.parallelize` (FSDP2 shards and compile
    traces whatever modules exist then) and before building the optimizer (`optim.build_optimizer` takes the
    parameters that require gradients: the factors). A model built on the meta device gets meta factors: call
    `init_lora_weights` after ``to_empty()``, and after ``Llama.init_weights()``, which initialises every
    nn.Linear, the factors included, as a base weight.

    Args:
        model: A `Llama` (or another module with the same names).
        config: Rank, alpha, dropout and target suffixes.
        generator: Random source for the A factors, on the parameters' device.

    Returns:
        The adapted modules' names, in model order (``model.layers.0.self_attn.q_proj``, ...).

    Raises:
        ValueError: A target that matches no module, or matches one that is not a plain nn.Linear of a block
            (the output head: the loss reads ``lm_head.weight`` directly, which would bypass an adapter), or a
            layer that already has an adapter.
    """
    chosen = [(name, m) for name, m in model.named_modules() if any(_matches(name, t) for t in config.targets)]
    for target in config.targets:
        if not any(_matches(name, target) for name, _ in chosen):
            raise ValueError(
                f"LoRA target {target!r} matches no module of the model; targets are module-name suffixes such as "
                f"{', '.join(DEFAULT_TARGETS)}"
            )
    for name, module in chosen:
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter; apply_lora once per model, or merge_lora first")
        if type(module) is not nn.Linear:
            raise ValueError(
                f"LoRA targets {list(config.targets)} match {name} ({type(module).__name__}), which is not an "
                f"nn.Linear; target linear layers such as {', '.join(DEFAULT_TARGETS)}"
            )
        if not _clean(name).startswith("model.layers."):
            raise ValueError(
                f"LoRA targets {list(config.targets)} match {name}: only the blocks' linear layers can be adapted "
                "(the loss reads lm_head.weight directly, which would bypass an adapter there)"
            )
    model.requires_grad_(False)
    for name, module in chosen:
        _replace(model, name, LoRALinear(module, config.rank, config.alpha, config.dropout, generator))
    return [name for name, _ in chosen]


def init_lora_weights(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """(Re-)initialise every adapter: A kaiming-uniform, B = 0 (after ``to_empty()`` or ``Llama.init_weights()``)."""
    for module in _lora_layers(model).values():
        module.reset_lora_parameters(generator)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require gradients, spelled as DCP state dicts spell them.

    After `apply_lora` these are the factors. DCP's ``get_state_dict(model, optimizer, options=StateDictOptions(
    ignore_frozen_params=True, strict=False))`` yields exactly these model keys and their optimizer state, so a
    LoRA run's checkpoint can hold the adapters alone; ``set_state_dict`` with the same options loads them back
    (`strict=False` because the frozen base is absent from that state dict on purpose).
    """
    return [_clean(name) for name, p in model.named_parameters() if p.requires_grad]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors under their llamita names (``model.layers.0.self_attn.q_proj.lora_A.weight``, ...).

    FSDP2-sharded factors are gathered into full tensors; then every rank must call this (it is a collective).
    """
    out = {}
    for name, module in _lora_layers(model).items():
        for factor in _FACTORS:
            weight = getattr(module, factor).weight
            out[f"{_clean(name)}.{factor}.weight"] = (
                weight.full_tensor() if isinstance(weight, DTensor) else weight
            ).detach()
    return out


def _merged(weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """W + scale * B @ A, computed in fp32 and returned in W's dtype: [out, in]."""
    return (weight.float() + (b.float() @ a.float()) * scale).to(weight.dtype)  # [out, r] @ [r, in]


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (W += scale * B @ A) and put plain nn.Linear layers back, in place.

    The merged model's state dict is a plain Llama's (Hugging Face names, no ``lora_`` keys); its parameters stay
    frozen as `apply_lora` left them. Merge an unsharded model; to export a sharded run, use its checkpoint and
    `export_merged_hf`, which merges one tensor at a time.

    Returns:
        The merged modules' names.

    Raises:
        ValueError: The model is FSDP2-sharded.
    """
    layers = _lora_layers(model)
    for name, module in layers.items():
        if isinstance(module.weight, DTensor):
            raise ValueError(f"merge_lora needs an unsharded model, but {name}.weight is an FSDP2 shard")
        module.weight.copy_(_merged(module.weight, module.lora_A.weight, module.lora_B.weight, module.scale))
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight, plain.bias = module.weight, module.bias
        _replace(model, name, plain)
    return list(layers)


def _adapter_pairs(adapters: Mapping[str, Tensor], config: LoRAConfig) -> dict[str, tuple[Tensor, Tensor]]:
    """Module name -> (A [r, in], B [out, r]) of an adapter state dict, checked against `config.rank`."""
    factors: dict[str, dict[str, Tensor]] = {}
    for key, tensor in adapters.items():
        suffix = next((s for s in _FACTOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{key!r} is not a LoRA factor (names end in {' or '.join(_FACTOR_SUFFIXES)})")
        factors.setdefault(key.removesuffix(suffix), {})[suffix.split(".")[1]] = tensor
    if not factors:
        raise ValueError("no LoRA adapters given (an empty state dict)")
    pairs = {}
    for module, pair in factors.items():
        if set(pair) != set(_FACTORS):
            raise ValueError(f"{module} has {', '.join(sorted(pair))} but not both lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] != config.rank:
            raise ValueError(
                f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [r, in] and [out, r] with "
                f"the configured rank r = {config.rank}"
            )
        pairs[module] = (a, b)
    return pairs


def read_lora_checkpoint(path: str | Path, *, verify: bool = True) -> dict[str, Tensor]:
    """The adapter tensors (``lora_A`` / ``lora_B``) of a checkpoint, on the CPU, under their llamita names.

    Reads a run directory (its latest checkpoint) or one checkpoint folder whose model state holds the factors;
    a LoRA run's checkpoint that stores only its trainable parameters holds nothing else.

    Raises:
        llamita.train.checkpoint.CheckpointError: No complete checkpoint there, a damaged file, or no factors.
    """
    folder = ckpt.resolve_checkpoint(path)
    if verify:  # off when the caller has verified the folder already
        ckpt.verify_checksums(folder)
    stored = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    prefix = f"{MODEL_KEY}."
    out = {
        key[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in stored.items()
        if key.startswith(prefix) and key.endswith(_FACTOR_SUFFIXES) and isinstance(meta, TensorStorageMetadata)
    }
    if not out:
        raise ckpt.CheckpointError(
            f"{folder}: no LoRA adapter tensors ({prefix}...lora_A.weight); is it a checkpoint of a LoRA run?"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP warns that it runs without a process group
        try:
            dcp.load({MODEL_KEY: out}, checkpoint_id=folder)  # all at once: adapters are small
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise ckpt.CheckpointError(f"{folder}: cannot read the LoRA adapters: {e}") from e
    return out


class MergedWeights:
    """A base model's weights with LoRA adapters folded in, read one tensor at a time (a `WeightSource`).

    Args:
        base: The base weights (`CheckpointReader`, `HFWeights`, ...).
        adapters: Adapter tensors under llamita names (`lora_state_dict`, `read_lora_checkpoint`).
        config: The adapters' LoRA settings (rank and alpha give the scale).

    Raises:
        ValueError: An adapter for a tensor the base lacks, or whose shapes do not fit it.
    """

    def __init__(self, base: WeightSource, adapters: Mapping[str, Tensor], config: LoRAConfig) -> None:
        self.model_config = base.model_config
        self.names = base.names
        self._base = base
        self._scale = config.scale
        self._pairs = _adapter_pairs(adapters, config)
        shapes = model_shapes(base.model_config)
        for module, (a, b) in self._pairs.items():
            expected = shapes.get(f"{module}.weight")
            if expected is None or (b.shape[0], a.shape[1]) != tuple(expected):
                raise ValueError(
                    f"adapter {module} (lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)}) does not fit the base "
                    f"model's {module}.weight ({'absent' if expected is None else tuple(expected)})"
                )

    def __getattr__(self, name: str) -> Any:
        """What else the base offers (a checkpoint's `folder`, `tokenizer()`)."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._base, name)

    def load(self, name: str) -> Tensor:
        """One base tensor, with its adapter's update added when it has one."""
        tensor = self._base.load(name)
        pair = self._pairs.get(name.removesuffix(".weight"))
        return tensor if pair is None else _merged(tensor, *pair, self._scale)


def export_merged_hf(
    base: WeightSource,
    adapters: Mapping[str, Tensor],
    config: LoRAConfig,
    out: str | Path,
    tokenizer: Tokenizer,
    dtype: str = "fp32",
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
) -> Path:
    """Write base weights with the adapters merged in as a Hugging Face LlamaForCausalLM directory (`write_hf`).

    Streams one tensor at a time: each adapted weight is read, merged and written before the next is read.

    Args:
        base: The base weights, e.g. ``CheckpointReader(init_checkpoint)``.
        adapters: The trained adapters (`read_lora_checkpoint` of the LoRA run, or `lora_state_dict`).
        config: The adapters' LoRA settings.
        out: The directory to write.
        tokenizer: The tokenizer to save beside the weights (the fine-tuning run's, with its chat template).
        dtype: fp32, bf16 or fp16.
        max_shard_bytes: Largest safetensors file before the weights are split into shards.
        force: Replace a model already in `out`.

    Returns:
        `out` as a Path.
    """
    merged = MergedWeights(base, adapters, config)
    return write_hf(out, merged, tokenizer, dtype, max_shard_bytes=max_shard_bytes, force=force)


def peft_adapter_config(config: LoRAConfig, base_model_path: str | Path) -> dict[str, Any]:
    """adapter_config.json for peft: plain LoRA (no rsLoRA, DoRA or bias) on `config.targets` of a causal LM.

    Only long-standing LoraConfig fields are written; peft fills the rest with its defaults.
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_path),
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(config.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def export_peft_adapter(
    adapters: Mapping[str, Tensor],
    config: LoRAConfig,
    out_dir: str | Path,
    base_model_path: str | Path,
    dtype: str = "fp32",
    *,
    force: bool = False,
) -> Path:
    """Write adapters as a peft LoRA adapter directory: adapter_model.safetensors + adapter_config.json.

    ``peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_model_path), out_dir)`` then computes
    what the llamita model with these adapters computes. Tensor names are llamita's with ``base_model.model.``
    in front, as peft saves them (without the adapter name).

    Args:
        adapters: Adapter tensors under llamita names (`lora_state_dict` or `read_lora_checkpoint`).
        config: Their LoRA settings.
        out_dir: The directory to write (created).
        base_model_path: The base model's Hugging Face directory or hub id, recorded for peft.
        dtype: fp32, bf16 or fp16.
        force: Replace an adapter already in `out_dir`.

    Returns:
        `out_dir` as a Path.

    Raises:
        ValueError: An unknown dtype, a key that is not a factor, an incomplete pair, or a rank other than
            `config.rank`.
        FileExistsError: `out_dir` already holds an adapter and `force` is off.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    held = [name for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE) if (out / name).is_file()]
    if held and not force:
        raise FileExistsError(f"{out} already holds an adapter ({', '.join(held)}); choose another directory or force")
    tensors = {
        f"{PEFT_PREFIX}{module}.{factor}.weight": t.detach().to("cpu", DTYPES[dtype]).contiguous()
        for module, pair in _adapter_pairs(adapters, config).items()
        for factor, t in zip(_FACTORS, pair)
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    peft_config = peft_adapter_config(config, base_model_path)
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out


def export_run_adapter(run: str | Path, out_dir: str | Path, dtype: str = "fp32", *, force: bool = False) -> Path:
    """A LoRA run's adapters (latest checkpoint) as a peft adapter directory for its base model (`init.from`).

    Raises:
        llamita.train.checkpoint.CheckpointError: not a LoRA run's checkpoint.
    """
    folder = ckpt.resolve_checkpoint(run)
    saved = ckpt.read_state(folder)["run_config"]
    if not saved.get("lora", {}).get("rank"):
        raise ckpt.CheckpointError(f"{folder}: not a LoRA run (lora.rank 0): export the whole model without --adapter")
    base = saved["init"]["from"]
    return export_peft_adapter(
        read_lora_checkpoint(folder), LoRAConfig.of(saved["lora"]), out_dir, base, dtype, force=force
    )
