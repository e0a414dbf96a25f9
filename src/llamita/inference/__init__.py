"""Generation on a trained model: the batched engine, its Python API (`LLM`, `SamplingParams`) and the chat loop."""

from llamita.inference.engine import Engine, EngineConfig
from llamita.inference.llm import LLM, Completion
from llamita.inference.sampling import SamplingParams

__all__ = ["LLM", "Completion", "Engine", "EngineConfig", "SamplingParams"]
