"""Load a trained model and its tokenizer from a run directory or a checkpoint folder, for inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llamita.config import RunConfig, config_from_dict
from llamita.model import Llama, ModelConfig
from llamita.tokenizer import Tokenizer
from llamita.train import checkpoint as ckpt


@dataclass
class Pretrained:
    model: Llama
    tokenizer: Tokenizer
    model_config: ModelConfig
    run_config: RunConfig
    checkpoint: Path
    step: int


def load_pretrained(path: str | Path, device: torch.device | str = "cpu") -> Pretrained:
    """Model (in eval mode, fp32), tokenizer and configs of the checkpoint at `path`.

    `path` is a run directory (its latest complete checkpoint) or one ``step_XXXXXXXX`` folder. The tokenizer
    is the copy that pretraining saved in the run directory.
    """
    folder = ckpt.resolve_checkpoint(path)
    state = ckpt.read_state(folder)
    model_config = ModelConfig(**state["model_config"])
    run_config = config_from_dict(state["run_config"])
    tok_dir = folder.parent.parent / "tokenizer"
    if not tok_dir.is_dir():
        raise ckpt.CheckpointError(
            f"{tok_dir}: the run's tokenizer copy is missing; it is written by `llamita pretrain` next to "
            "the checkpoints/ folder"
        )
    tokenizer = Tokenizer.load(tok_dir)
    with torch.device("meta"):
        model = Llama(model_config)
    model.to_empty(device=device)
    model.init_weights()  # fills non-persistent buffers (RoPE); the weights come from the checkpoint
    if run_config.lora.rank > 0:  # a LoRA fine-tune: its adapters are loaded with the base, then merged in
        from llamita.chat.lora import LoRAConfig, apply_lora, merge_lora

        apply_lora(model, LoRAConfig.of(run_config.lora))
        ckpt.load_checkpoint(folder, model)
        merge_lora(model)
    else:
        ckpt.load_checkpoint(folder, model)
    model.eval()
    return Pretrained(model, tokenizer, model_config, run_config, folder, state["step"])
