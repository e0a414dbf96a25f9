"""The Llama-architecture model: its config and presets, and the torch module."""

from typing import TYPE_CHECKING

from llamita.model.config import PRESETS, ModelConfig, get_preset

if TYPE_CHECKING:
    from llamita.model.llama import KVCache, Llama

__all__ = ["PRESETS", "KVCache", "Llama", "ModelConfig", "get_preset"]


def __getattr__(name: str) -> object:
    # torch is imported on first use of the module classes, so reading configs and presets stays fast.
    if name in ("KVCache", "Llama"):
        from llamita.model import llama

        return getattr(llama, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
