"""llama.cpp's own export flow, used as the reference in tests and benchmarks.

- convert_hf_to_gguf.py from the llama.cpp sources vendored in the llama-cpp-python sdist
  (`make install-test` unpacks them into .cache/llama.cpp-src; override with QUANTKIT_LLAMACPP_SRC)
- llama_model_quantize from the llama-cpp-python build (what `llama-quantize` runs)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# llama.cpp's LLAMA_FTYPE values for the variants quantkit writes
FTYPES = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "bf16": 32, "f16": 1}


def llamacpp_src() -> Path | None:
    env = os.environ.get("QUANTKIT_LLAMACPP_SRC")
    for cand in ([Path(env)] if env else []) + [REPO / ".cache" / "llama.cpp-src"]:
        if (cand / "convert_hf_to_gguf.py").is_file():
            return cand.resolve()
    return None


def convert_hf_to_gguf(model_dir: Path, out: Path, outtype: str = "bf16", *, quiet: bool = True) -> Path:
    src = llamacpp_src()
    if src is None:
        raise FileNotFoundError("llama.cpp sources not found: run `make install-test` or set QUANTKIT_LLAMACPP_SRC")
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"), HF_HUB_OFFLINE="1", NO_LOCAL_GGUF="")
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
           "--outfile", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=quiet, text=True, cwd=src)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{(r.stderr or '')[-3000:]}")
    return out


def llama_quantize(inp: Path, out: Path, variant: str, *, nthread: int = 0) -> Path:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[variant]
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({inp}, {variant}) returned {rc}")
    return out
