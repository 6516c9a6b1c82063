"""`quantkit bench`: score the baseline once, every variant against it, work out VRAM, write the report.

    tokenize (baseline's tokenizer) → windows → baseline top-k log-probs (cached on disk)
    → each variant: ppl, Δppl, KLD, top-1 agreement → VRAM (measured on a GPU, else estimated)
    → which GPU fits what → report.md / report.json / PNGs
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import torch

from quantkit.errors import InputError, UnsupportedError
from quantkit.hfmodel import HFModel

from . import decode, evaluate, report, scoring, vram
from .backends import TransformersBackend, open_backend, variant_kind
from .proc import machine


def label(path: Path, kind: str) -> str:
    """What a person calls the variant: Q4_K_M, GPTQ 4-bit g128, INT8, NF4, BF16."""
    path = Path(path)
    if kind == "gguf":
        import gguf

        from .gguf_diff import reader
        r = reader(path)
        f = r.fields.get("general.file_type")
        if f is not None:
            try:
                return gguf.LlamaFileType(int(f.contents())).name.removeprefix("MOSTLY_").replace("ALL_", "")
            except ValueError:
                pass
        return path.stem
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    if kind in ("gptq", "compressed-tensors"):
        if kind == "gptq":
            bits, group = q.get("bits", 4), q.get("group_size", 128)
        else:
            w = next(iter((q.get("config_groups") or {}).values()), {}).get("weights") or {}
            bits, group = w.get("num_bits", "?"), w.get("group_size", "?")
        note = path / "quantkit_gptq.json"        # ours says whether it is GPTQ or the RTN baseline
        method = json.loads(note.read_text()).get("method", "gptq") if note.exists() else "gptq"
        name = f"{'RTN' if method == 'rtn' else 'GPTQ'} {bits}-bit g{group}"
        return name if kind == "gptq" else f"{name} (CT)"
    if kind == "bitsandbytes":
        return "INT8" if q.get("load_in_8bit") else "NF4" if q.get("bnb_4bit_quant_type") == "nf4" else "4-bit"
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(cfg.get("torch_dtype") or cfg.get("dtype"), "HF")


def file_bytes(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))


def load_text(baseline: Path, text: Path | None, ctx: int, limit_chunks: int | None):
    """The evaluation text (default: the bundled WikiText-2 test split), tokenized by the baseline's
    tokenizer and cut into windows; an InputError naming the text if it cannot be read or is too
    short for one window. (path, raw text, tokens, bos, windows)."""
    text = Path(text) if text else evaluate.default_text()
    try:
        raw = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the text ({e})", text) from None
    try:
        tokens, bos = evaluate.tokenize(Path(baseline), raw)
        windows = scoring.plan_windows(tokens, ctx, bos, limit_chunks)
    except ValueError as e:
        raise InputError(str(e), text) from None
    return text, raw, tokens, bos, windows


def check_extras(gguf: bool) -> None:
    """What scoring and the report need (transformers for the baseline, matplotlib for the plots,
    llama-cpp-python for GGUF variants), checked before any variant is scored."""
    import importlib.util

    needed = ["transformers", "matplotlib"] + (["llama_cpp"] if gguf else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise UnsupportedError(f"quantkit bench needs {', '.join(missing)}: pip install 'quantkit[bench]'")


def baseline_bytes(model: HFModel, windows, top_k: int) -> int:
    """Disk the cached baseline takes: llama-perplexity's log-probability file for the whole
    vocabulary, or the top-k arrays."""
    n_vocab = int(model.config.get("vocab_size") or (model.config.get("text_config") or {}).get("vocab_size") or 0)
    per_token = 8 * top_k + 16 if top_k else 16
    extra = evaluate.LogProbFile.nbytes(n_vocab, windows) if top_k == 0 else 0
    return extra + per_token * windows.n_scored


def check_disk(where: Path, model: HFModel, windows, top_k: int) -> None:
    """Refuse, before any scoring, a baseline that would not fit on the cache's disk."""
    need = baseline_bytes(model, windows, top_k)
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if need + 2**30 > free:
        raise InputError(f"not enough disk space for the baseline's log-probabilities over the whole vocabulary: "
                         f"they need {need / 1e9:.1f} GB ({windows.n_chunks} windows), {free / 1e9:.1f} GB are free: "
                         f"score fewer windows "
                         f"(--limit-chunks), set QUANTKIT_CACHE to a larger disk, or use --top-k 128 "
                         f"(a compact approximation that reads low)", where)


def run(baseline: Path, variants: list[Path], out_dir: Path, *, text: Path | None = None, ctx: int = 512,
        device: str = "cpu", limit_chunks: int | None = None, gpus: dict[str, int] | None = None,
        top_k: int = evaluate.TOP_K, measure_vram: bool | None = None, progress: bool = True,
        name: str | None = None) -> dict:
    """The whole bench on this machine: score(), local_measurements(), finish()."""
    results = score(baseline, variants, text=text, ctx=ctx, device=device, limit_chunks=limit_chunks, top_k=top_k,
                    progress=progress, name=name)
    return finish(results, local_measurements(results, measure_vram), gpus, out_dir)


def local_measurements(results: dict, measure_vram: bool | None = None) -> list[dict]:
    """measure_here() for every row of score()'s results when this machine has a GPU (or
    measure_vram says to); none otherwise (finish() then estimates)."""
    measure = torch.cuda.is_available() if measure_vram is None else measure_vram
    return [measure_here(r, "cuda") for r in [results["baseline"]] + results["variants"]] if measure else []


def score(baseline: Path, variants: list[Path], *, text: Path | None = None, ctx: int = 512, device: str = "cpu",
          limit_chunks: int | None = None, top_k: int = evaluate.TOP_K, progress: bool = True,
          name: str | None = None) -> dict:
    """Perplexity, KLD and top-1 agreement of every variant against the baseline on the same windows:
    the results dict without the per-GPU figures (finish() adds them)."""
    baseline = Path(baseline)
    model = HFModel(baseline)
    if variant_kind(baseline) != "hf":
        raise UnsupportedError("the baseline must be an unquantized HF model directory (bf16/fp16)", baseline)
    kinds = [variant_kind(v) for v in variants]
    text, raw, tokens, bos, windows = load_text(baseline, text, ctx, limit_chunks)
    arch = vram.Arch.from_config(model.config)

    # the baseline, once (and from the disk cache when this exact run was made before)
    base_backend_name = f"transformers-{device}"
    key = evaluate.baseline_key(model.fingerprint(), windows, top_k, base_backend_name, device)
    cache = evaluate.cache_dir() / f"baseline-{key}.npz"
    logprobs = cache.with_suffix(".kld") if top_k == 0 else None
    hf = None
    if cache.exists() and (logprobs is None or logprobs.exists()):
        base_scores = evaluate.BaselineScores.load(cache, logprobs)
    else:
        check_disk(cache.parent, model, windows, top_k)
        hf = TransformersBackend(baseline, device)
        base_scores = evaluate.score_baseline(hf, windows, top_k, progress, logprobs)
        base_scores.save(cache)
    base = {"name": baseline.name, "path": str(baseline), "kind": "hf", "backend": "transformers",
            "label": label(baseline, "hf"), "file_bytes": file_bytes(baseline),
            **scoring.perplexity(base_scores.nll), "seconds": round(base_scores.seconds, 3),
            "tokens_per_s": round(windows.n_chunks * ctx / max(base_scores.seconds, 1e-9), 1),
            "cache": str(cache)}
    if hf is not None:
        hf.close()

    results_v = []
    for path, kind in zip(variants, kinds):
        backend = open_backend(path, ctx, device)
        try:
            r = evaluate.score_variant(backend, windows, base_scores, progress)
        finally:
            backend.close()
        results_v.append({"name": Path(path).name, "path": str(path), "kind": kind, "backend": backend.kind,
                          "label": label(path, kind), "file_bytes": file_bytes(path), **r})
    return {
        "quantkit_bench": 1, "date": dt.date.today().isoformat(), "machine": machine(),
        "model": name or model.config.get("_name_or_path") or baseline.name,
        "text": {"name": text.name, "path": str(text), "sha256": hashlib.sha256(raw.encode()).hexdigest(),
                 "tokens": int(len(tokens))},
        "ctx": ctx, "chunks": windows.n_chunks, "scored_tokens": windows.n_scored, "bos": bos, "top_k": top_k,
        "kld_over": "the whole vocabulary" if top_k == 0 else f"the baseline's top {top_k} tokens and the rest",
        "device": device, "contexts": list(vram.CONTEXTS),
        "arch": {**arch.__dict__, "kv_mib_per_1k_tokens": round(arch.kv_bytes_per_token() * 1024 / 2**20, 1)},
        "baseline": base, "variants": results_v,
    }


def measure_here(row: dict, device: str, gpu_type: str | None = None) -> dict:
    """One row (baseline or variant, as score() gives them) measured on this process's `device`: the
    decode speed, and on a GPU the VRAM (in a fresh process). `gpu_type`: what the scheduler asked
    for (a Ray accelerator type), else the device's own name."""
    import os
    import socket
    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    device = device if on_gpu else "cpu"
    props = torch.cuda.get_device_properties(device) if on_gpu else None
    path, kind = Path(row["path"]), row["kind"]
    out = {"row": row["name"], "gpu_type": gpu_type or (props.name if props else "cpu"),
           "gpu_name": props.name if props else None,
           "total_mib": round(props.total_memory / 2**20) if props else None, "device": device,
           "host": socket.gethostname(), "pid": os.getpid(), "node": None, "vram": None, "decode": None}
    try:            # a row that does not fit or load there fails its own cell, not the report
        out["vram"] = vram.measure(path, kind) if on_gpu else None
        out["decode"] = decode.measure(path, kind, device)
    except Exception as e:  # noqa: BLE001 - out of memory, a load failure, the measuring process' error
        out["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return out


def finish(results: dict, measurements: list[dict], gpus: dict[str, int] | None, out_dir: Path) -> dict:
    """The per-GPU figures and the report: VRAM measured where a GPU measured the row, else
    estimated; which GPU fits what; decode speed measured or estimated per GPU (decode.summarize)."""
    model = HFModel(results["baseline"]["path"])
    arch = vram.Arch.from_config(model.config)
    rows = [results["baseline"]] + results["variants"]
    measurements = sorted(measurements, key=lambda m: (m["row"], m["gpu_type"]))     # not in the order they ended
    vram_measured = {}
    for m in measurements:                      # a row's VRAM: the first GPU type (by name) that measured it
        if m.get("vram"):
            vram_measured.setdefault(m["row"], m["vram"])
    for r in rows:
        r["vram"] = vram_measured.get(r["name"]) or vram.estimate(vram.weights_on_gpu(Path(r["path"]), r["kind"]), arch)
    gpus = gpus if gpus is not None else dict(vram.GPU_CATALOG)
    kv = arch.kv_bytes_per_token() * decode.CONTEXT
    per_token = {r["name"]: decode.active_weight_bytes(Path(r["path"]), r["kind"], arch.experts, arch.experts_used) + kv
                 for r in rows}
    results.update(gpus=gpus, measurements=measurements,
                   fits=vram.gpu_fits({r["name"]: r["vram"] for r in rows}, arch, gpus),
                   decode=decode.summarize(per_token, measurements, gpus))
    report.write(results, Path(out_dir))
    return results
