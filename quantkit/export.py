"""One-pass GGUF export: read each HF tensor once → transform → quantize for every variant → write.

    read lazily (hfmodel) → name/permute (arch) → plan per tensor (plan) → quantize (kernels)
    → write (converters.gguf_file) → export.json (+ Ollama Modelfiles)
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from quantkit.converters.gguf_file import GGUFFile, TensorInfo
from quantkit.kernels import registry as qreg

from .arch import SourceTensor, architecture_of, hparams_of, source_tensors
from .errors import InputError, OutputError
from .hfmodel import HFModel
from .metadata import build_metadata
from .plan import TensorPlan, Variant, format_plan, make_plan
from .tokenizer import load_vocab

# A transform applied to every HF tensor as it is read (LoRA / residual merge plugs in here):
# hook(hf_name, rows, x) -> x', where x holds rows [rows.start, rows.stop) of the tensor.
TensorHook = Callable[[str, slice, torch.Tensor], torch.Tensor]

# Values per row chunk: the unit that is read, transformed and quantized at once. 16 M values is
# 64 MB in float32: an 8B model's largest tensor (128256 x 4096) goes through in 32 chunks.
CHUNK_VALUES = 1 << 24


@dataclass
class ExportResult:
    files: dict[str, Path]                      # variant name → path
    plan: list[TensorPlan]
    seconds: float
    report: dict = field(default_factory=dict)


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".quantkit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output directory is not writable ({e.strerror or e})", out_dir) from None


def _input_hash(model: HFModel) -> str:
    """A cheap content fingerprint: config + every shard's safetensors header, size and mtime."""
    h = hashlib.sha256((model.path / "config.json").read_bytes())
    for shard in model.shards:
        st = shard.stat()
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))
        h.update(f"{shard.name}:{st.st_size}".encode())
    return h.hexdigest()


def row_chunks(t: SourceTensor, max_values: int = CHUNK_VALUES) -> Iterator[slice]:
    rows = t.shape[0] if len(t.shape) > 1 else 1
    cols = t.shape[-1] if len(t.shape) > 1 else max(1, t.shape[0])
    step = max(t.row_granule, (max_values // cols) // t.row_granule * t.row_granule)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def read_chunk(model: HFModel, t: SourceTensor, rows: slice, hook: TensorHook | None) -> torch.Tensor:
    """Rows of one GGUF tensor as float32 [rows, cols] (1-D tensors as [1, n]): read, merged, permuted."""
    if t.generate is not None:
        x = t.generate()
    else:
        x = model.read_rows(t.hf_name, rows.start, rows.stop) if len(t.shape) > 1 else model.read(t.hf_name)
        if hook is not None:
            x = hook(t.hf_name, rows, x)
        x = x.to(torch.float32)
        if not torch.isfinite(x).all():
            raise InputError(f"tensor {t.hf_name!r} contains NaN or Inf", model.tensors[t.hf_name].shard)
        if t.transform is not None:
            x = t.transform(x)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)


def quantize(x: torch.Tensor, qtype: str, device: torch.device) -> torch.Tensor:
    return qreg.quantize_rows(x.to(device), qreg.get(qtype)).cpu()


def _iter_chunks(model: HFModel, plans: list[TensorPlan], hook: TensorHook | None,
                 progress: bool, chunk_values: int) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
    """(plan, float32 row chunk) for every tensor in file order, with a progress bar in input bytes."""
    def in_bytes(p: TensorPlan, rows: slice) -> int:
        if p.tensor.hf_name is None:
            return 0
        ref = model.tensors[p.tensor.hf_name]
        return ref.nbytes * (rows.stop - rows.start) // (ref.shape[0] if len(ref.shape) > 1 else 1)

    total = sum(model.tensors[p.tensor.hf_name].nbytes for p in plans if p.tensor.hf_name)
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=not progress, file=sys.stderr,
               desc="export", dynamic_ncols=True)
    try:
        for i, p in enumerate(plans):
            bar.set_postfix_str(f"tensor {i + 1}/{len(plans)} {p.tensor.gguf_name}", refresh=False)
            for rows in row_chunks(p.tensor, chunk_values):
                yield p, read_chunk(model, p.tensor, rows, hook)
                bar.update(in_bytes(p, rows))
    finally:
        bar.close()


def export_gguf(model_dir: str | Path, variants: list[Variant], out_dir: str | Path, *,
                name: str | None = None, device: str = "cpu", progress: bool = True,
                dry_run: bool = False, hook: TensorHook | None = None,
                hook_note: dict | None = None, chunk_values: int = CHUNK_VALUES) -> ExportResult:
    t0 = time.perf_counter()
    model = HFModel(model_dir)
    arch = architecture_of(model)
    hp = hparams_of(model)
    sources = source_tensors(model, arch, hp)
    plans = make_plan(sources, hp, variants)
    if dry_run:
        print(format_plan(plans, variants))
        return ExportResult({}, plans, time.perf_counter() - t0)

    vocab = load_vocab(model.path, hp.n_vocab)
    meta = build_metadata(model, arch, hp, sources, vocab, name)
    out_dir = Path(out_dir)
    _check_writable(out_dir)
    dev = torch.device(device)

    files: dict[str, GGUFFile] = {}
    for v in variants:
        infos = []
        for p in plans:
            qt = qreg.get(p.choices[v.name].qtype)
            shape = p.tensor.shape
            infos.append(TensorInfo(p.tensor.gguf_name, qt.ggml_type, (*shape[:-1], qreg.row_nbytes(qt, shape[-1]))))
        path = out_dir / f"{meta.name}-{v.label}.gguf"
        files[v.name] = GGUFFile(path, arch.name, meta.for_file_type(v.file_type), infos)
    try:
        for f in files.values():
            f.open()
        for p, x in _iter_chunks(model, plans, hook, progress, chunk_values):
            # each chunk is read once; each distinct type is quantized once and shared by the variants
            done: dict[str, torch.Tensor] = {}
            for v in variants:
                qtype = p.choices[v.name].qtype
                if qtype not in done:
                    done[qtype] = quantize(x, qtype, dev)
                files[v.name].write(p.tensor.gguf_name, done[qtype].numpy())
        written = {v: f.commit() for v, f in files.items()}
    except BaseException:
        for f in files.values():
            f.abort()
        raise

    seconds = time.perf_counter() - t0
    report = {
        "quantkit_export": 1,
        "input": {"path": str(model.path), "architecture": arch.hf_name, "hash": _input_hash(model),
                  "bytes": model.total_bytes(), "parameters": meta.total_params},
        "merge": hook_note,
        "seconds": round(seconds, 3),
        "files": {
            v.name: {
                "path": written[v.name].name, "bytes": written[v.name].stat().st_size,
                "file_type": v.file_type.name,
                "tensor_types": _type_counts(plans, v.name),
            } for v in variants
        },
    }
    _write_json_atomic(out_dir / "export.json", report)
    return ExportResult(written, plans, seconds, report)


def _type_counts(plans: list[TensorPlan], variant: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in plans:
        q = p.choices[variant].qtype.upper()
        counts[q] = counts.get(q, 0) + 1
    return dict(sorted(counts.items()))


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
