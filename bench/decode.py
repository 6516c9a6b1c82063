"""Decode speed: tokens per second generating one token at a time, measured where a device ran the
variant and estimated for every other GPU from its memory bandwidth.

Decoding one token is memory-bound: it reads each weight it uses once and the KV cache so far. The
weights it uses are the active ones: all of a dense model's; for a mixture of experts the shared
tensors plus expert_used / expert_count of the experts' (a router picks that many per token; over a
layer's tokens every expert is read, but a single-stream decode reads only those). The input
embedding reads one row per token and is left out, unless the output shares it. So

    tokens/s ≈ efficiency × bandwidth / (active weight bytes + KV bytes at the context)

The efficiency (the part of the datasheet bandwidth the backend reaches) is calibrated on the GPUs
that measured: the median over their measurements of tokens/s × bytes per token / bandwidth.
Without a GPU measurement it is DEFAULT_EFFICIENCY, and the report says the estimate is uncalibrated.
A measurement made on a CPU (a node that had no CUDA device) is reported as such and calibrates
nothing.

Measured: a prompt of PROMPT tokens is decoded as one batch, then NEW tokens one at a time, timed;
the context averages CONTEXT tokens over them, and the estimates are for that context too.
"""
from __future__ import annotations

import inspect
import json
import re
import statistics
import time
from pathlib import Path

from quantkit.hfmodel import _read_header

from .vram import BANDWIDTH_GBS, _key

PROMPT, NEW = 256, 64
CONTEXT = PROMPT + NEW // 2
DEFAULT_EFFICIENCY = 0.6


def catalog_name(gpu_type: str, total_mib: float | None, catalog: dict[str, int]) -> str | None:
    """The catalog entry a measured GPU is: by its model (Ray's accelerator type "A100", or the
    driver's name "NVIDIA A100-SXM4-80GB"), where what follows the model is at most a form factor
    SXM, a memory size and HBM (so an L40S is no L4, an RTX 3060 Ti no RTX 3060, an H100 PCIe no
    H100 SXM); among several (A100 40GB / 80GB), the one of closest memory. None: not in the catalog
    (its measurement is shown, and calibrates nothing)."""
    k = re.sub(r"^(nvidia)?(geforce)?", "", _key(gpu_type))
    model = {c: _key(re.sub(r"\s*\d+\s*GB$", "", c, flags=re.I)) for c in catalog}
    found = [c for c, m in model.items() if m and k.startswith(m)
             and re.fullmatch(r"(sxm\d*)?(\d+gb)?(hbm\d*e?)?", k[len(m):])]
    if not found:
        return None
    return min(found, key=lambda c: abs(catalog[c] - total_mib)) if total_mib else found[0]


def active_weight_bytes(path: Path, kind: str, experts: int = 0, experts_used: int = 0) -> int:
    """Bytes of weights one decoded token reads (see the module's note)."""
    path = Path(path)
    frac = experts_used / experts if experts and experts_used else 1.0
    if kind == "gguf":
        from .gguf_diff import reader
        sizes = {t.name: int(t.n_bytes) for t in reader(path).tensors}
        embed, tied = "token_embd.weight", "output.weight" not in sizes
        expert = [n for n in sizes if "_exps." in n]
    else:
        sizes = {}
        for shard in _shards(path):
            header, _ = _read_header(shard)
            sizes.update({n: e - b for n, i in header.items() if n != "__metadata__" for b, e in [i["data_offsets"]]})
        embed = next((n for n in sizes if n.endswith("embed_tokens.weight")), "")
        tied = not any(n.startswith("lm_head.") for n in sizes)
        expert = [n for n in sizes if ".experts." in n]
    total = sum(sizes.values()) - sum(sizes[n] for n in expert) * (1 - frac)
    return int(total - (0 if tied else sizes.get(embed, 0)))


def _shards(path: Path) -> list[Path]:
    """The checkpoint's shards as its index names them (a Mistral repository also ships a
    consolidated.safetensors beside them), else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(path.glob("*.safetensors"))


def measure(path: Path, kind: str, device: str = "cpu") -> dict:
    """Tokens/s of NEW tokens decoded one at a time after a PROMPT-token prompt, on `device`."""
    if kind == "gguf":
        import llama_cpp
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT + NEW, n_batch=PROMPT,
                              n_gpu_layers=-1 if device.startswith("cuda") else 0, verbose=False)
        try:
            llm.eval([1] * PROMPT)
            t0 = time.perf_counter()
            for _ in range(NEW):
                llm.eval([1])
            seconds = time.perf_counter() - t0
        finally:
            llm.close()
    else:
        import torch
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        out = None
        try:
            with torch.no_grad():
                ids = torch.ones(1, PROMPT, dtype=torch.long, device=device)
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                one = ids[:, :1]
                # transformers 5.25 renamed the argument (and warns on the old name); older ones know only it
                arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
                sync()
                t0 = time.perf_counter()
                for _ in range(NEW):
                    out = model(input_ids=one, use_cache=True, **{arg: out.past_key_values})
                sync()
                seconds = time.perf_counter() - t0
        finally:
            model = out = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {"tokens_per_s": round(NEW / seconds, 2), "prompt": PROMPT, "new": NEW, "device": device}


def summarize(rows: dict[str, int], measurements: list[dict], gpus: dict[str, int]) -> dict:
    """rows: row name -> active bytes per token (weights + KV at CONTEXT); measurements: the
    measure() results with "row", "gpu_type", "total_mib", "device", "node" and "host".

    Returns {"context", "efficiency", "calibrated_on", "bytes_per_token", "per_gpu": {GPU: {row:
    {"tokens_per_s", "source", ...}}}}: every catalog GPU of `gpus` and every measured GPU type."""
    measured: dict[str, dict[str, dict]] = {}
    ratios, calibrated_on = [], []
    for m in measurements:
        if not m.get("decode"):
            continue
        on_gpu = str(m.get("device", "")).startswith("cuda")
        name = (catalog_name(m["gpu_type"], m.get("total_mib"), gpus) if on_gpu else None) or m["gpu_type"]
        entry = {"tokens_per_s": m["decode"]["tokens_per_s"], "node": m.get("node"), "host": m.get("host"),
                 "source": "measured" if on_gpu else "measured on the node's CPU (no CUDA device there)"}
        measured.setdefault(name, {})[m["row"]] = entry
        if on_gpu and name in BANDWIDTH_GBS:
            ratios.append(entry["tokens_per_s"] * rows[m["row"]] / (BANDWIDTH_GBS[name] * 1e9))
            calibrated_on.append(name)
    eff = statistics.median(ratios) if ratios else DEFAULT_EFFICIENCY
    per_gpu: dict[str, dict[str, dict]] = {}
    for g in list(gpus) + [g for g in measured if g not in gpus]:
        per_gpu[g] = {}
        for row, nbytes in rows.items():
            if row in measured.get(g, {}):
                per_gpu[g][row] = measured[g][row]
            elif g in BANDWIDTH_GBS:
                per_gpu[g][row] = {"tokens_per_s": round(eff * BANDWIDTH_GBS[g] * 1e9 / nbytes, 1),
                                   "source": "estimated"}
    return {"context": CONTEXT, "efficiency": round(eff, 4), "calibrated_on": sorted(set(calibrated_on)),
            "bytes_per_token": rows, "per_gpu": per_gpu}
