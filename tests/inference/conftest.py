"""The engine tests' model: a tiny float64 Llama (`inference_models.tiny_model`)."""

from __future__ import annotations

import pytest
from inference_models import tiny_model

from llamita.model import Llama


@pytest.fixture(scope="module")
def model() -> Llama:
    return tiny_model()
