"""Where logits come from: transformers for HF directories (bf16/fp16, GPTQ, bitsandbytes), llama.cpp
(llama-cpp-python) for GGUF files. Every backend takes the same token windows and returns float32
logits of the scored positions (ctx/2 .. ctx-2) of each window.
"""
from __future__ import annotations

import functools

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from quantkit.errors import InputError, UnsupportedError


class _NotTheCast(logging.Filter):
    """bitsandbytes logs "inputs will be cast" on every int8 layer call with bf16 activations; the
    cast is what we want, so the line is dropped."""
    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_NotTheCast())


class Backend(Protocol):
    name: str
    kind: str               # "transformers" or "llama.cpp"
    n_vocab: int
    batch_windows: int      # windows per call that fit comfortably

    def scored_logits(self, windows: np.ndarray, first: int) -> torch.Tensor:
        """windows int64 [B, ctx] -> float32 logits [B, ctx - 1 - first, n_vocab] (CPU)."""
        ...

    def close(self) -> None: ...


@functools.lru_cache(maxsize=64)
def _gguf_problem(path: str, size: int, mtime_ns: int) -> str | None:
    """Why gguf-py cannot read the header and every tensor's place (a truncated or empty file), so
    that it is refused before the baseline is scored, not after; None if it reads (once per file
    version). A tensor type newer than gguf-py's is left for llama.cpp to judge."""
    from .gguf_diff import reader
    try:
        reader(Path(path))          # parsed once: the label and the VRAM figures read it again
    except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError, struct.error, IndexError ...
        text = " ".join(str(e).split()) or type(e).__name__
        return None if "GGMLQuantizationType" in text else text
    return None


def variant_kind(path: Path) -> str:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        problem = _gguf_problem(str(path), st.st_size, st.st_mtime_ns)
        if problem:
            raise InputError(f"not a readable GGUF file ({problem})", path)
        return "gguf"
    if path.is_dir() and (path / "config.json").exists():
        import json
        q = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
        method = q.get("quant_method", "")
        return {"gptq": "gptq", "bitsandbytes": "bitsandbytes", "compressed-tensors": "compressed-tensors"}.get(
            method, "hf")
    raise InputError("not a GGUF file or a HF model directory", path)


@dataclass
class TransformersBackend:
    """A HF model directory through transformers. On CUDA the weights' own dtype (bf16) computes; on
    the CPU the bf16 weights compute in float32 (CPU bf16 matmuls are slow and round activations)."""
    path: Path
    device: str = "cpu"
    name: str = ""
    kind: str = "transformers"

    def __post_init__(self):
        import transformers
        self.path = Path(self.path)
        kind = variant_kind(self.path)
        quantized = kind != "hf"
        dtype = torch.float32 if (self.device == "cpu" and not quantized) else "auto"
        kw = {"device_map": self.device} if quantized or self.device != "cpu" else {}
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, **kw).eval()
        except Exception as e:
            raise InputError(f"transformers cannot load it ({str(e).splitlines()[0]})", self.path) from None
        if not quantized and self.device != "cpu":
            self.model.to(self.device)
        self.n_vocab = self.model.config.vocab_size
        self.name = self.name or self.path.name
        self.batch_windows = 8 if self.device != "cpu" else 2

    def scored_logits(self, windows: np.ndarray, first: int) -> torch.Tensor:
        ids = torch.from_numpy(np.asarray(windows)).to(self.model.device)
        ctx = ids.shape[1]
        with torch.no_grad():
            # only the last ctx - first positions are needed (the last one predicts past the window)
            out = self.model(input_ids=ids, logits_to_keep=ctx - first, use_cache=False)
        return out.logits[:, :-1].float().cpu()

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class LlamaCppBackend:
    """A GGUF file through llama-cpp-python: all layers offloaded on CUDA when present."""
    path: Path
    ctx: int
    device: str = "cpu"
    name: str = ""
    kind: str = "llama.cpp"

    def __post_init__(self):
        try:
            import llama_cpp
        except ImportError:
            raise UnsupportedError("scoring GGUF files needs llama-cpp-python (pip install llama-cpp-python)") from None
        self.path = Path(self.path)
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=self.ctx, n_batch=self.ctx, n_ubatch=self.ctx,
                                   logits_all=True, n_gpu_layers=-1 if self.device != "cpu" else 0,
                                   n_threads=os.cpu_count(), verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.name = self.name or self.path.name
        self.batch_windows = 1

    def scored_logits(self, windows: np.ndarray, first: int) -> torch.Tensor:
        rows = []
        for w in np.asarray(windows):
            self.llm.reset()
            self.llm.eval(w.tolist())
            rows.append(torch.from_numpy(np.array(self.llm.scores[first:len(w) - 1], dtype=np.float32)))
        return torch.stack(rows)

    def close(self) -> None:
        self.llm.close()


def open_backend(path: Path, ctx: int, device: str) -> Backend:
    kind = variant_kind(path)
    if kind == "gguf":
        return LlamaCppBackend(path, ctx, device)
    return TransformersBackend(path, device)
