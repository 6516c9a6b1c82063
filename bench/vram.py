"""VRAM: what each variant needs at a given context, and which GPUs that fits.

Without a GPU the figures are computed from the files and the architecture and labelled
"estimated"; on a GPU each variant is loaded in a fresh subprocess and device memory is read
from the driver (torch.cuda.mem_get_info, NVML's figure) before loading, after loading and after a
forward pass at each context length, with torch's peak allocator figures and llama.cpp's own
buffer sizes where those are the backend.

Estimate, for a context of L tokens (a serving setup: prefill in chunks of UBATCH tokens, flash
attention, fp16 KV cache):
    weights      GGUF: the tensors llama.cpp offloads (all but token_embd, which stays on the CPU
                 unless the output shares it); HF: the safetensors bytes
    KV cache     2 * layers * kv_heads * head_dim * 2 bytes * L
    compute      UBATCH * (vocab + 3 * ffn + 4 * hidden) * 4 bytes (logits and activations)
    overhead     the CUDA context and allocator slack: HEADROOM_MIB, kept free on every GPU
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30
UBATCH = 512
HEADROOM_MIB = 768          # CUDA context (~300-500 MiB) plus allocator slack
CONTEXTS = (4096, 8192, 32768)

# name, total device memory in MiB as the driver reports it (nvidia-smi "Total"), memory bandwidth in
# GB/s (datasheets; the SXM parts of A100 80GB and H100)
_GPUS = [
    ("RTX 3060 12GB", 12288, 360), ("RTX 3080 10GB", 10240, 760), ("RTX 4060 Ti 16GB", 16380, 288),
    ("RTX 3090 24GB", 24576, 936), ("RTX 4090 24GB", 24564, 1008), ("RTX 5090 32GB", 32607, 1792),
    ("T4 16GB", 15360, 320), ("L4 24GB", 23034, 300), ("A10 24GB", 23028, 600), ("A100 40GB", 40960, 1555),
    ("A100 80GB", 81920, 2039), ("H100 80GB", 81559, 3350), ("H200 141GB", 143771, 4800),
]
GPU_CATALOG: dict[str, int] = {name: mib for name, mib, _ in _GPUS}
BANDWIDTH_GBS: dict[str, float] = {name: gbs for name, _, gbs in _GPUS}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def parse_gpus(names: list[str] | None, extra: list[str] | None, catalog_file: Path | None = None) -> dict[str, int]:
    """The GPUs to report on: the catalog (plus a JSON file of name -> MiB and NAME=GiB entries),
    filtered to `names` (matched loosely: rtx4090, a100-40 ...) when given."""
    catalog = dict(GPU_CATALOG)
    if catalog_file is not None:
        catalog.update(_catalog_file(Path(catalog_file)))
    added = {}
    for item in extra or []:
        name, _, size = item.partition("=")
        try:
            gib = float(size)
        except ValueError:
            gib = 0.0
        if not name.strip() or not gib > 0 or gib == float("inf"):
            raise ValueError(f"--gpu {item!r}: expected NAME=GiB with a positive size, e.g. 'RTX 4070 12GB=12'")
        added[name.strip()] = int(gib * 1024)
    catalog.update(added)
    if not names:
        return catalog
    out = dict(added)       # GPUs given with --gpu are always reported
    for n in names:
        matches = [c for c in catalog if _key(n) and _key(n) in _key(c)]
        if not matches:
            raise ValueError(f"unknown GPU {n!r} (known: {', '.join(catalog)})")
        out.update({m: catalog[m] for m in matches})
    return out


def _catalog_file(path: Path) -> dict[str, int]:
    """A JSON object of GPU name -> MiB; ValueError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of GPU name -> MiB, e.g. {{\"RTX 4070 12GB\": 12282}}")
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise ValueError(f"{path}: {k!r}: expected a positive number of MiB, not {v!r}")
    return {str(k): int(v) for k, v in data.items()}


@dataclass(frozen=True)
class Arch:
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int
    max_ctx: int
    experts: int = 0            # a mixture of experts: how many, and how many a token uses
    experts_used: int = 0

    @classmethod
    def from_config(cls, cfg: dict) -> Arch:
        heads = cfg["num_attention_heads"]
        return cls(cfg["num_hidden_layers"], cfg.get("num_key_value_heads") or heads,
                   cfg.get("head_dim") or cfg["hidden_size"] // heads, cfg["hidden_size"], cfg["intermediate_size"],
                   cfg["vocab_size"], cfg.get("max_position_embeddings", 0),
                   cfg.get("num_local_experts") or cfg.get("num_experts") or 0, cfg.get("num_experts_per_tok") or 0)

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value

    def compute_bytes(self) -> int:
        return UBATCH * (self.vocab + 3 * self.ffn + 4 * self.hidden) * 4


def weights_on_gpu(path: Path, kind: str) -> int:
    path = Path(path)
    if kind == "gguf":
        from .gguf_diff import reader
        r = reader(path)
        names = {t.name: int(t.n_bytes) for t in r.tensors}
        total = sum(names.values())
        # llama.cpp keeps the input embedding on the CPU; a tied model's output reads it on the GPU
        return total - names.get("token_embd.weight", 0) if "output.weight" in names else total
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def estimate(weights: int, arch: Arch, contexts=CONTEXTS) -> dict:
    return {"source": "estimated", "weights_mib": round(weights / MIB),
            "kv_mib_per_1k_tokens": round(arch.kv_bytes_per_token() * 1024 / MIB, 1),
            "at_context": {str(L): round((weights + arch.kv_bytes_per_token() * L + arch.compute_bytes()) / MIB)
                           for L in contexts}}


def max_context(vram: dict, arch: Arch, gpu_mib: int) -> int:
    """The longest context (multiple of 256) whose KV cache fits beside the weights and compute buffers
    with HEADROOM_MIB kept free; 0 when even the weights do not fit. Capped at the model's own."""
    fixed = vram["weights_mib"] * MIB + arch.compute_bytes()
    if "measured_fixed_mib" in vram:
        fixed = vram["measured_fixed_mib"] * MIB
    free = (gpu_mib - HEADROOM_MIB) * MIB - fixed
    if free <= 0:
        return 0
    per = vram.get("measured_kv_bytes_per_token") or arch.kv_bytes_per_token()
    n = int(free // per) // 256 * 256
    return min(n, arch.max_ctx) if arch.max_ctx else n


# --- measured on a GPU, in a fresh process per variant --------------------------------------------

_MEASURE = r"""
import json, re, sys, torch
path, kind, contexts = sys.argv[1], sys.argv[2], [int(c) for c in sys.argv[3].split(",")]
torch.cuda.init()
free0, total = torch.cuda.mem_get_info()
out = {"total_mib": total / 2**20}
def used(): f, _ = torch.cuda.mem_get_info(); return (free0 - f) / 2**20
if kind == "gguf":
    import os, tempfile, llama_cpp
    log = tempfile.TemporaryFile(mode="w+")
    err = os.dup(2); os.dup2(log.fileno(), 2)
    for L in contexts:
        # llama.cpp allocates the whole KV cache for n_ctx when the context is made: one per length
        llm = llama_cpp.Llama(model_path=path, n_ctx=L, n_gpu_layers=-1, n_ubatch=512, verbose=True)
        out.setdefault("after_load_mib", used())
        llm.eval([1] * 512)
        out[f"after_forward_{L}_mib"] = used()
        llm.close(); del llm
    os.dup2(err, 2); log.seek(0)
    bufs = {}
    for line in log:
        m = re.search(r"(CUDA\d+) (model|KV|compute) buffer size\s*=\s*([\d.]+) MiB", line)
        if m: bufs.setdefault(m.group(2), []).append(float(m.group(3)))
    out["llama_cpp_buffers_mib"] = bufs
else:
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="cuda")
    out["after_load_mib"] = used()
    for L in contexts:
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            cache = None
            ids = torch.ones(1, L, dtype=torch.long, device="cuda")
            for s in range(0, L, 512):      # prefill in chunks, as a server does
                o = m(input_ids=ids[:, s:s + 512], past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = o.past_key_values
        out[f"after_forward_{L}_mib"] = used()
        out[f"torch_peak_{L}_mib"] = torch.cuda.max_memory_allocated() / 2**20
        del cache, o
        torch.cuda.empty_cache()
print(json.dumps(out))
"""


def measure(path: Path, kind: str, contexts=CONTEXTS, timeout: int = 900) -> dict:
    """Measured device memory of one variant, in a fresh process (GPU only)."""
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(path), kind, ",".join(map(str, contexts))],
                       capture_output=True, text=True, timeout=timeout, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if r.returncode != 0:
        raise RuntimeError(f"measuring {path} failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    at = {str(L): round(m[f"after_forward_{L}_mib"]) for L in contexts}
    (l1, v1), (l2, v2) = (contexts[0], at[str(contexts[0])]), (contexts[-1], at[str(contexts[-1])])
    per_token = max(0.0, (v2 - v1) * MIB / (l2 - l1))
    return {"source": "measured", "weights_mib": round(m["after_load_mib"]), "at_context": at, "raw": m,
            "measured_kv_bytes_per_token": per_token,
            "measured_fixed_mib": max(0, round(v1 - per_token * l1 / MIB))}


def gpu_fits(vram_by_variant: dict[str, dict], arch: Arch, gpus: dict[str, int]) -> dict[str, dict[str, int]]:
    """gpu -> variant -> max context (0: does not fit)."""
    return {g: {v: max_context(d, arch, mib) for v, d in vram_by_variant.items()} for g, mib in gpus.items()}


def human_ctx(n: int) -> str:
    if n <= 0:
        return "—"
    return f"{n // 1024}k" if n >= 1024 else str(n)


def gib(mib: float) -> str:
    return f"{mib / 1024:.1f} GB" if mib >= 1024 else f"{mib:.0f} MB"

