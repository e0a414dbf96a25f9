"""Hugging Face transformers' format: export a llamita checkpoint to a `LlamaForCausalLM` directory, and import one.

Parameter names are already transformers' (`llamita.model.llama`), so the conversion is the config mapping and
the file formats: safetensors (sharded with an index above `max_shard_bytes`), or pytorch_model.bin read with
``torch.load(weights_only=True)``. Both directions stream one tensor at a time and need neither transformers nor
a GPU; transformers is only the reference the tests check against.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from llamita.interop.checkpoint_io import (
    WeightSource,
    model_shapes,
    open_checkpoint,
    weight_names,
    write_checkpoint,
)
from llamita.model import ModelConfig
from llamita.tokenizer import Tokenizer
from llamita.train.checkpoint import CheckpointError, list_checkpoints

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""`--dtype` choices of `export hf`."""
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""Shard size above which `export_hf` writes several files, as transformers' save_pretrained does (5 GB)."""
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# transformers' LlamaConfig defaults, for fields a config.json may leave out.
_HF_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
}
_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers that older transformers versions saved; llamita derives them from the config."""


class HFFormatError(ValueError):
    """A Hugging Face directory or config.json that llamita cannot read; the message names the file and field."""


# --------------------------------------------------------------------------------------------- config
def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a transformers Llama config.json, refusing what llamita's model cannot compute.

    Args:
        hf: the parsed config.json.
        source: the file, for error messages.

    Raises:
        HFFormatError: another model_type, or a feature the Llama-2 architecture here lacks (rope scaling,
            biases, another activation, a head_dim other than hidden_size / num_attention_heads, quantized
            weights); the message names the field.
    """
    value = {**_HF_DEFAULTS, **hf}.get

    def refuse(field: str, why: str) -> HFFormatError:
        return HFFormatError(f"{source}: {field}={hf.get(field)!r} is not supported: {why}")

    if hf.get("model_type") != "llama":
        raise refuse("model_type", "only Llama-architecture models (model_type 'llama') can be imported")
    if value("hidden_act") != "silu":
        raise refuse("hidden_act", "llamita's MLP is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if value(field):
            raise refuse(field, "llamita's linear layers have no bias")
    if "quantization_config" in hf:
        raise HFFormatError(f"{source}: quantization_config is set; import the unquantized model instead")
    # transformers 4 writes rope_theta and rope_scaling; 5 writes rope_parameters {rope_type, rope_theta}.
    rope_theta = value("rope_theta")
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise refuse(field, "expected a JSON object")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "none", None):
            raise HFFormatError(
                f"{source}: {field}.rope_type={kind!r} is not supported: llamita implements plain RoPE only "
                "(rope_type 'default')"
            )
        rope_theta = rope.get("rope_theta", rope_theta)
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [field for field in required if field not in hf]
    if missing:
        raise HFFormatError(f"{source}: missing field(s) {', '.join(missing)}")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * n_heads != hf["hidden_size"]:
        raise refuse(
            "head_dim", f"llamita's head dim is hidden_size / num_attention_heads ({hf['hidden_size']} / {n_heads})"
        )
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            intermediate_size=hf["intermediate_size"],
            max_seq_len=value("max_position_embeddings"),
            rope_theta=float(rope_theta),
            norm_eps=float(value("rms_norm_eps")),
            tie_embeddings=bool(value("tie_word_embeddings")),
            init_std=float(value("initializer_range")),
        )
    except ValueError as e:
        raise HFFormatError(f"{source}: {e}") from None


def hf_config_dict(config: ModelConfig, dtype: torch.dtype, bos_id: int, eos_id: int) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM (readable by transformers 4.45+ and 5)."""
    dtype_name = _TORCH_DTYPE_NAMES[dtype]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **config.to_hf_config_dict(),
        "head_dim": config.head_dim,
        # transformers 5 reads rope_parameters, 4 reads rope_theta; each ignores the other's.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pretraining_tp": 1,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


# -------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{path}: unreadable JSON ({e})") from None


class HFWeights:
    """The weights of a Hugging Face Llama directory, read one tensor at a time.

    Reads ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
    ``pytorch_model.bin`` (sharded with ``pytorch_model.bin.index.json``); ``.bin`` files are unpickled with
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.

    Args:
        model_dir: the directory holding config.json and the weight files.

    Raises:
        FileNotFoundError: no config.json or no weight file.
        HFFormatError: an unsupported config (see `model_config_from_hf`), tensors missing, unexpected or of
            the wrong shape, or a .bin file holding other objects than tensors.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        config_file = self.dir / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{config_file}: not found; point to a Hugging Face model directory (config.json + weights)"
            )
        self.hf_config = _read_json(config_file)
        self.model_config = model_config_from_hf(self.hf_config, str(config_file))
        self._open_file: Path | None = None  # the .bin file whose tensors `_open` holds (memory-mapped)
        self._open: Any = None
        self._file_of = self._locate_tensors()
        self._shapes = model_shapes(self.model_config)
        self._check_names()
        self.names = weight_names(self.model_config)

    def _locate_tensors(self) -> dict[str, Path]:
        """Tensor name -> file holding it."""
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = self.dir / index_name
            if index.is_file():
                weight_map = _read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise HFFormatError(f"{index}: no weight_map object")
                return {name: self.dir / file for name, file in weight_map.items()}
        single = self.dir / "model.safetensors"
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        single = self.dir / "pytorch_model.bin"
        if single.is_file():
            return dict.fromkeys(self._load_bin(single), single)
        raise FileNotFoundError(
            f"{self.dir}: no model.safetensors, {SAFETENSORS_INDEX}, pytorch_model.bin or {BIN_INDEX}"
        )

    def _check_names(self) -> None:
        expected = self._shapes
        names = {n for n in self._file_of if not n.endswith(_IGNORED_TENSOR_SUFFIXES)}
        # A tied model's head is the embedding: files may omit it (transformers does) or repeat it.
        required = set(weight_names(self.model_config))
        missing = sorted(required - names)
        unexpected = sorted(names - set(expected))
        if missing or unexpected:
            raise HFFormatError(
                f"{self.dir}: the weights do not match config.json's Llama: "
                + "; ".join(
                    f"{what} {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                    for what, items in (("missing", missing), ("unexpected", unexpected))
                    if items
                )
            )
        for name in sorted(required):
            file = self._file_of[name]
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    shape = torch.Size(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise HFFormatError(
                        f"{file}: tensor {name!r} has shape {tuple(shape)}, config.json implies {tuple(expected[name])}"
                    )

    def _load_bin(self, file: Path) -> dict[str, Tensor]:
        if self._open_file != file:
            self._open = None  # drop the previous shard's tensors first
            try:
                self._open = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as e:
                raise HFFormatError(
                    f"{file}: refused to unpickle: the file holds objects other than tensors, which could run "
                    f"code ({e}); convert it to safetensors with code you trust"
                ) from None
            except RuntimeError as e:
                raise HFFormatError(f"{file}: not a readable PyTorch weights file ({e})") from None
            if not isinstance(self._open, dict):
                raise HFFormatError(f"{file}: expected a dict of tensors, found {type(self._open).__name__}")
            self._open_file = file
        return self._open

    def load(self, name: str) -> Tensor:
        """One tensor on the CPU, in the file's dtype."""
        file = self._file_of[name]
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                tensor = f.get_tensor(name)
        else:
            tensor = self._load_bin(file)[name].clone()  # a copy, not a view into the mapped file
        expected = self._shapes[name]
        if tensor.shape != expected:
            raise HFFormatError(
                f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected)}"
            )
        return tensor

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for name in self.names:
            yield name, self.load(name)


def load_hf_state_dict(model_dir: str | Path) -> tuple[ModelConfig, HFWeights]:
    """The ModelConfig of a Hugging Face Llama directory and its weights, iterable as (name, tensor) pairs.

    The weights are read lazily, one tensor per step of the iteration (or per `HFWeights.load(name)`); names are
    llamita's, which are transformers'. A tied model yields no ``lm_head.weight``.

    Raises:
        FileNotFoundError, HFFormatError: see `HFWeights`.
    """
    weights = HFWeights(model_dir)
    return weights.model_config, weights


# -------------------------------------------------------------------------------------------- writing
def _safetensors_header(entries: list[tuple[str, torch.Size]], dtype: torch.dtype) -> bytes:
    """The length-prefixed JSON header of a safetensors file holding `entries` back to back."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = shape.numel() * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    return len(text).to_bytes(8, "little") + text


def _plan_shards(entries: list[tuple[str, torch.Size]], dtype: torch.dtype, max_bytes: int) -> list[list]:
    """Split the tensors, in order, into files of at most `max_bytes` (a larger tensor gets a file of its own)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in entries:
        nbytes = shape.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_safetensors(out_dir: Path, source: WeightSource, dtype: torch.dtype, max_shard_bytes: int) -> list[Path]:
    """Write `source`'s weights as model.safetensors, or as shards plus an index, one tensor at a time."""
    shapes = model_shapes(source.model_config)
    entries = [(name, shapes[name]) for name in source.names]
    shards = _plan_shards(entries, dtype, max_shard_bytes)
    n = len(shards)
    files = [
        out_dir / ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors") for i in range(n)
    ]
    for file, shard in zip(files, shards):
        with file.open("wb") as f:
            f.write(_safetensors_header(shard, dtype))
            for name, _ in shard:
                tensor = source.load(name).to(dtype).contiguous()
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
                del tensor
    if n > 1:
        total = sum(shape.numel() for _, shape in entries) * dtype.itemsize
        index = {
            "metadata": {"total_size": total},
            "weight_map": {name: file.name for file, shard in zip(files, shards) for name, _ in shard},
        }
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
) -> Path:
    """Write a llamita checkpoint as a Hugging Face LlamaForCausalLM directory with its tokenizer.

    The directory holds model.safetensors (or shards + model.safetensors.index.json), config.json,
    generation_config.json and the tokenizer files; `AutoModelForCausalLM.from_pretrained(out)` and
    `AutoTokenizer.from_pretrained(out)` load it. A tied model's output head is omitted, as transformers expects.

    Args:
        checkpoint: a run directory (its latest checkpoint) or one checkpoint folder.
        out: the directory to write (created; one that already holds a model is replaced only with `force`).
        dtype: fp32 (lossless for llamita's fp32 checkpoints), bf16 or fp16.
        max_shard_bytes: largest safetensors file before the weights are split into shards.

    Returns:
        `out` as a Path.

    Raises:
        llamita.train.checkpoint.CheckpointError: no checkpoint at `checkpoint`, or its tokenizer copy is missing.
        ValueError: an unknown dtype.
        FileExistsError: `out` already holds a model (config.json or safetensors) and `force` is off.
    """
    _check_export(out, dtype, force)  # before reading the checkpoint
    source = open_checkpoint(checkpoint)
    return write_hf(out, source, source.tokenizer(), dtype, max_shard_bytes=max_shard_bytes, force=force)


def _check_export(out: str | Path, dtype: str, force: bool) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    held = [p.name for p in [out / "config.json", *out.glob("model*.safetensors")] if p.is_file()]
    if held and not force:
        raise FileExistsError(
            f"{out} already holds a model ({', '.join(sorted(held))}); choose another --out, or pass --force to "
            "replace it"
        )


def write_hf(
    out: str | Path,
    source: WeightSource,
    tokenizer: Tokenizer,
    dtype: str = "fp32",
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
) -> Path:
    """Write weights read one tensor at a time, and a tokenizer, as a Hugging Face LlamaForCausalLM directory.

    `export_hf` with the weights and tokenizer given rather than read from a checkpoint: e.g. a base checkpoint
    with LoRA adapters merged in one tensor at a time (`llamita.chat.lora.export_merged_hf`).

    Args:
        out: the directory to write (created; one that already holds a model is replaced only with `force`).
        source: the weights (`CheckpointReader`, `HFWeights`, or a wrapper around one).
        tokenizer: saved beside the weights, with its chat template when it has one.
        dtype: fp32, bf16 or fp16.
        max_shard_bytes: largest safetensors file before the weights are split into shards.

    Returns:
        `out` as a Path.

    Raises:
        ValueError: an unknown dtype.
        FileExistsError: `out` already holds a model (config.json or safetensors) and `force` is off.
    """
    _check_export(out, dtype, force)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / SAFETENSORS_INDEX]:
        stale.unlink(missing_ok=True)  # a previous export's shards would be read alongside the new ones
    write_safetensors(out, source, DTYPES[dtype], max_shard_bytes)
    config = source.model_config
    hf = hf_config_dict(config, DTYPES[dtype], tokenizer.bos_id, tokenizer.eos_id)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    eos: int | list[int] = tokenizer.eos_id
    if tokenizer.chat_template:  # generate() stops at the template's end of turn too (ChatML's <|im_end|>)
        from llamita.chat.templates import stop_ids

        eos = sorted({tokenizer.eos_id, *stop_ids(tokenizer.chat_template, tokenizer)})
        eos = eos[0] if len(eos) == 1 else eos
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.model_max_length = config.max_seq_len
    tokenizer.save(out)  # with the chat template, when the model has one (tokenizer_config.json's chat_template)
    return out


def import_hf(model_dir: str | Path, out: str | Path) -> Path:
    """Convert a Hugging Face Llama directory into a llamita run directory.

    Writes ``<out>/checkpoints/step_00000000/`` (model weights in fp32, no optimizer state) and
    ``<out>/tokenizer/``, so `llamita generate --checkpoint OUT`, `evaluate`, `export` and `pretrain`'s
    initialisation from a checkpoint accept `out`.

    Args:
        model_dir: a directory with config.json, weights (safetensors or pytorch_model.bin) and a tokenizer
            (tokenizer.json or tokenizer.model).
        out: the run directory to create.

    Returns:
        The checkpoint folder.

    Raises:
        FileNotFoundError, HFFormatError: see `HFWeights`; also a missing or unreadable tokenizer.
        llamita.train.checkpoint.CheckpointError: `out` already holds checkpoints.
    """
    model_dir, out = Path(model_dir), Path(out)
    weights = HFWeights(model_dir)
    existing = list_checkpoints(out)
    if existing:
        raise CheckpointError(
            f"{out}: already a run directory with checkpoints ({existing[-1].name}, ...); import into a new directory"
        )
    try:
        tokenizer = Tokenizer.load(model_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; a model directory to import needs its tokenizer") from None
    if tokenizer.vocab_size > weights.model_config.vocab_size:
        raise HFFormatError(
            f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
            f"{weights.model_config.vocab_size}"
        )
    folder = write_checkpoint(out, weights, note={"imported_from": str(model_dir.resolve())})
    tok_out = out / "tokenizer"
    shutil.rmtree(tok_out, ignore_errors=True)
    tokenizer.save(tok_out)
    return folder


__all__ = [
    "DTYPES",
    "HFFormatError",
    "HFWeights",
    "export_hf",
    "hf_config_dict",
    "import_hf",
    "load_hf_state_dict",
    "model_config_from_hf",
    "write_hf",
]
