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
FTYPES = {"q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q5_k_s": 16, "q4_k_m": 15, "q4_k_s": 14, "q5_1": 9, "q5_0": 8, "q4_1": 3,
          "q4_0": 2, "iq4_nl": 25, "iq4_xs": 30, "bf16": 32, "f16": 1}


def vocab_test_vectors(inp: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors (models/ggml-vocab-*.gguf.inp / .out): the inputs, separated by
    a line `__ggml_vocab_test__`, and the expected ids of each (no BOS)."""
    inp = Path(inp)
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    ids = [[int(x) for x in line.split()]
           for line in inp.with_suffix(".out").read_text(encoding="utf-8").split("\n")]
    return list(zip(texts, ids))


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


def read_imatrix(path: Path) -> dict:
    """An imatrix GGUF as llama-quantize loads it (tools/quantize/quantize.cpp, load_imatrix, over
    common_imatrix_load): for each tensor, the sums cut into as many rows as <name>.counts has
    values (one per expert of a stacked MoE tensor, else one), each row divided by its own count
    (rounded as std::lround does) in float32, or 1 where that count is 0; flat, expert after expert."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    t = {x.name: np.asarray(x.data, dtype=np.float32).reshape(-1) for x in r.tensors}
    out = {}
    for name in t:
        if name.endswith(".in_sum2"):
            base = name.removesuffix(".in_sum2")
            sums, counts = t[name], t[base + ".counts"]
            ne0 = sums.size // counts.size
            e = np.empty_like(sums)
            for j, c in enumerate(counts):
                count = np.float32(np.sign(c) * np.floor(abs(c) + 0.5))
                e[j * ne0:(j + 1) * ne0] = sums[j * ne0:(j + 1) * ne0] / count if count > 0 else 1
            out[base] = e
    return out


def imatrix_overrides(path: str) -> list[tuple[str, str | int]]:
    """The metadata llama-quantize --imatrix FILE adds (tools/quantize/quantize.cpp): the file name
    as given, the first dataset, the number of entries and of chunks."""
    import gguf
    r = gguf.GGUFReader(str(path))
    datasets = r.fields["imatrix.datasets"].contents() if "imatrix.datasets" in r.fields else []
    chunks = r.fields["imatrix.chunk_count"].contents() if "imatrix.chunk_count" in r.fields else 0
    out = [("quantize.imatrix.file", path)] + ([("quantize.imatrix.dataset", datasets[0])] if datasets else [])
    out.append(("quantize.imatrix.entries_count", len(read_imatrix(path))))
    return out + ([("quantize.imatrix.chunks_count", chunks)] if chunks > 0 else [])


def llama_quantize(inp: Path, out: Path, variant: str, *, nthread: int = 0, imatrix: dict | None = None,
                   kv_overrides: list[tuple[str, str | int]] = (), tensor_types: list[tuple[str, str]] = (),
                   output_tensor_type: str = "", token_embedding_type: str = "", pure: bool = False) -> Path:
    """llama_model_quantize(inp -> out, variant); `imatrix` (tensor name -> float32 per column, as
    read_imatrix gives) goes in params.imatrix and `kv_overrides` (key, str or int) in
    params.kv_overrides, as llama-quantize --imatrix passes them; `tensor_types` ((regex, type name))
    in params.tt_overrides, the other three in their fields, as llama-quantize's --tensor-type,
    --output-tensor-type, --token-embedding-type and --pure set them."""
    import ctypes

    import gguf
    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[variant]
    params.nthread = nthread
    keep = []
    if output_tensor_type:
        params.output_tensor_type = int(gguf.GGMLQuantizationType[output_tensor_type.upper()])
    if token_embedding_type:
        params.token_embedding_type = int(gguf.GGMLQuantizationType[token_embedding_type.upper()])
    params.pure = pure
    if tensor_types:
        tts = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, qtype) in enumerate(tensor_types):
            keep.append(pattern.encode())
            tts[i].pattern = keep[-1]
            tts[i].type = int(gguf.GGMLQuantizationType[qtype.upper()])
        tts[len(tensor_types)].pattern = None                  # the terminator
        keep.append(tts)
        params.tt_overrides = tts
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep += [name.encode(), values]
            entries[i].name = keep[-2]
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        entries[len(imatrix)].name = None                      # the terminator
        params.imatrix = entries
    if kv_overrides:
        kvs = (llama_cpp.llama_model_kv_override * (len(kv_overrides) + 1))()
        for i, (key, value) in enumerate(kv_overrides):
            kvs[i].key = key.encode()
            if isinstance(value, str):
                kvs[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                kvs[i].value.val_str = value.encode()[:127]
            else:
                kvs[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                kvs[i].value.val_i64 = int(value)
        kvs[len(kv_overrides)].key = b""                        # the terminator
        keep.append(kvs)
        params.kv_overrides = kvs
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({inp}, {variant}) returned {rc}")
    return out


def logits_agreement(model_dir: Path, gguf_path: Path, n_tokens: int = 48, seed: int = 1) -> tuple[float, float, float]:
    """(mean cosine, min cosine, share of equal argmax) between transformers' float32 logits of the HF
    model and llama.cpp's on the GGUF, over BOS (id 1) and n_tokens - 1 random token ids; llama.cpp
    with a float32 KV cache (the default f16 one rounds k and v more than these comparisons allow)."""
    import llama_cpp
    import numpy as np
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = hf.config.get_text_config().vocab_size
    ids = [1] + torch.randint(100, vocab, (n_tokens - 1,), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double().numpy()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    llm.close()
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    return float(cos.mean()), float(cos.min()), float((got.argmax(1) == ref.argmax(1)).mean())
