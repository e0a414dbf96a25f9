"""Interoperability: Hugging Face transformers directories (export and import) and llama.cpp's GGUF (export).

Every conversion streams one tensor at a time, so its peak memory is about one tensor, not one model.
"""

from llamita.interop.gguf import GGUFExportError, export_gguf
from llamita.interop.hf import HFFormatError, export_hf, import_hf, load_hf_state_dict
from llamita.interop.init_weights import load_init_weights, read_model_config

__all__ = [
    "GGUFExportError",
    "HFFormatError",
    "export_gguf",
    "export_hf",
    "import_hf",
    "load_hf_state_dict",
    "load_init_weights",
    "read_model_config",
]
