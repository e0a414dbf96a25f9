"""llamita: small Llama-architecture language models from raw text to release."""

__version__ = "0.1.0"
