"""A llamita checkpoint's model tensors, read and written one tensor at a time, without a process group or GPU.

Checkpoints are DCP folders (see `llamita.train.checkpoint`) whose model tensors sit under the key prefix
``model.`` (``model.model.layers.0.self_attn.q_proj.weight``); FSDP ranks may have written each tensor in pieces,
and DCP reassembles them into whatever full-size tensor a load asks for. Reading one key per `dcp.load` and
writing through a planner that fetches each tensor only when DCP is about to write it keeps the peak memory at
about one tensor, whatever the model's size.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from llamita.config import RunConfig, to_dict
from llamita.model import Llama, ModelConfig
from llamita.tokenizer import Tokenizer
from llamita.train import checkpoint as ckpt

MODEL_KEY = "model"
"""The top-level key of the model's state dict in a checkpoint (the optimizer's is ``optim``)."""
TIED_HEAD = "lm_head.weight"
"""The output head; with tied embeddings it is the token embedding and formats that know tying omit it."""
EMBEDDING = "model.embed_tokens.weight"


class WeightSource(Protocol):
    """Model weights that can be read one tensor at a time (a llamita checkpoint or a Hugging Face directory)."""

    model_config: ModelConfig
    """The architecture the weights belong to."""
    names: list[str]
    """Tensor names (Hugging Face / llamita), in model order; without ``lm_head.weight`` when tied."""

    def load(self, name: str) -> Tensor:
        """One tensor, on the CPU, in the source's dtype, with the shape `model_shapes` gives for `name`."""
        ...


def model_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor in the state dict of `Llama(config)`, in model order (built on meta)."""
    with torch.device("meta"):
        return {name: t.shape for name, t in Llama(config).state_dict().items()}


def weight_names(config: ModelConfig) -> list[str]:
    """`model_shapes`'s names without the output head when it is tied to the embedding."""
    return [n for n in model_shapes(config) if not (config.tie_embeddings and n == TIED_HEAD)]


def tokenizer_dir(folder: Path) -> Path:
    """Where a checkpoint folder's run keeps its tokenizer copy (``<run>/tokenizer``)."""
    return Path(folder).parent.parent / "tokenizer"


class CheckpointReader:
    """The model tensors of a llamita checkpoint (run directory or ``step_XXXXXXXX`` folder), read one by one.

    Args:
        path: a run directory (its latest complete checkpoint) or one checkpoint folder.
        verify: compare every file with the checkpoint's checksums.json first (one read of the checkpoint), as
            every command that reads weights does; off only to read the model config.

    Raises:
        llamita.train.checkpoint.CheckpointError: no complete checkpoint there, a file whose sha256 differs from
            checksums.json, unreadable metadata, or a model tensor that the checkpoint's model config implies is
            missing or has another shape.
    """

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.folder = ckpt.resolve_checkpoint(path)
        if verify:
            ckpt.verify_checksums(self.folder)
        state = ckpt.read_state(self.folder)
        try:
            self.model_config = ModelConfig(**state["model_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.CheckpointError(
                f"{self.folder / ckpt.STATE_FILE}: no valid model_config ({e}); was it written by llamita?"
            ) from None
        self.tokenizer_dir = tokenizer_dir(self.folder)
        try:
            stored = FileSystemReader(str(self.folder)).read_metadata().state_dict_metadata
        except (OSError, RuntimeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{self.folder}: unreadable DCP metadata ({e})") from None
        self._stored = stored
        self._meta: dict[str, TensorStorageMetadata] = {}
        for name, shape in model_shapes(self.model_config).items():
            meta = stored.get(f"{MODEL_KEY}.{name}")
            if not isinstance(meta, TensorStorageMetadata):
                raise ckpt.CheckpointError(
                    f"{self.folder}: no model tensor {name!r}, which its model_config implies; the checkpoint is "
                    "incomplete or was written by another program"
                )
            if meta.size != shape:
                raise ckpt.CheckpointError(
                    f"{self.folder}: model tensor {name!r} has shape {tuple(meta.size)}, but its model_config "
                    f"implies {tuple(shape)}"
                )
            self._meta[name] = meta
        self.names = weight_names(self.model_config)

    def lora_settings(self) -> Any:
        """The `chat.lora.LoRAConfig` of a LoRA run's checkpoint (it holds adapter factors), else None."""
        if not any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in self._stored):
            return None
        from llamita.chat.lora import LoRAConfig

        return LoRAConfig.of(ckpt.read_state(self.folder)["run_config"]["lora"])

    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer copy (``<run>/tokenizer``)."""
        if not self.tokenizer_dir.is_dir():
            raise ckpt.CheckpointError(
                f"{self.tokenizer_dir}: the run's tokenizer copy is missing; `llamita pretrain` and `llamita import` "
                "write it next to the checkpoints/ folder"
            )
        return Tokenizer.load(self.tokenizer_dir)

    def load(self, name: str) -> Tensor:
        """One full tensor, reassembled from however many ranks' pieces, on the CPU."""
        meta = self._meta[name]
        out = torch.empty(meta.size, dtype=meta.properties.dtype)
        with warnings.catch_warnings():
            # DCP warns that it runs without a process group; reading in one process is the intent.
            warnings.simplefilter("ignore", UserWarning)
            try:
                dcp.load({MODEL_KEY: {name: out}}, checkpoint_id=self.folder)
            except (RuntimeError, ValueError, KeyError, OSError) as e:
                raise ckpt.CheckpointError(f"{self.folder}: cannot read model tensor {name!r}: {e}") from e
        return out

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for name in self.names:
            yield name, self.load(name)


def open_checkpoint(path: str | Path, *, verify: bool = True) -> WeightSource:
    """The weights of a llamita checkpoint as a `WeightSource`; a LoRA run's with its adapters merged in.

    Every reader of weights goes through here (exports, `init.from`), so a LoRA fine-tune is never read as its
    base model. The result also has the reader's `folder` and `tokenizer()`.
    """
    reader = CheckpointReader(path, verify=verify)
    lora = reader.lora_settings()
    if lora is None:
        return reader
    from llamita.chat.lora import MergedWeights, read_lora_checkpoint

    return MergedWeights(reader, read_lora_checkpoint(reader.folder, verify=False), lora)


class _StreamingSavePlanner(DefaultSavePlanner):
    """Plans on meta tensors and fetches each real tensor only when DCP writes it."""

    def __init__(self, fetch: Callable[[str], Tensor]) -> None:
        super().__init__()
        self._fetch = fetch

    def lookup_object(self, index: MetadataIndex) -> Any:
        prefix = f"{MODEL_KEY}."
        assert index.fqn.startswith(prefix), index.fqn  # only the model's tensors are planned
        return self._fetch(index.fqn[len(prefix) :])


def write_checkpoint(out: str | Path, source: WeightSource, *, note: dict[str, Any] | None = None) -> Path:
    """Write `source` as a llamita run directory holding one step-0 checkpoint (model only, fp32).

    The layout is a training run's: ``<out>/checkpoints/step_00000000/`` (DCP model tensors and
    trainer_state.json with the model config and a default run config), so `llamita generate`, `evaluate` and
    `export` accept `out` as they accept a run. The caller writes ``<out>/tokenizer/``. There is no optimizer
    state: the checkpoint initialises a new run (`load_init_weights`) rather than resuming one.

    Args:
        out: the run directory to create.
        source: the weights; each tensor is read, converted to fp32 and written before the next is read.
        note: extra JSON fields for trainer_state.json (e.g. where the weights came from).

    Returns:
        The checkpoint folder.
    """
    config = source.model_config
    shapes = model_shapes(config)
    path = ckpt.checkpoint_path(Path(out), 0)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def fetch(name: str) -> Tensor:
        tensor = source.load(EMBEDDING if config.tie_embeddings and name == TIED_HEAD else name)
        return tensor.to(torch.float32)

    # llamita checkpoints hold both keys of a tied pair, as `get_model_state_dict` of a tied Llama does.
    planned = {name: torch.empty(shape, dtype=torch.float32, device="meta") for name, shape in shapes.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no process group, as intended
        # One file per tensor: DCP's writer keeps every tensor of a file in memory until the file is complete.
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=False)
        dcp.save({MODEL_KEY: planned}, storage_writer=writer, planner=_StreamingSavePlanner(fetch))
    run_config = RunConfig(out_dir=str(out))
    run_config.data.tokenizer = str(Path(out) / "tokenizer")
    run_config.data.seq_len = config.max_seq_len
    state = {
        "step": 0,
        "tokens": 0,
        "model_config": dataclasses.asdict(config),
        "run_config": to_dict(run_config),
        **(note or {}),
    }
    (tmp / ckpt.STATE_FILE).write_text(json.dumps(state, indent=1))
    ckpt.write_checksums(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
