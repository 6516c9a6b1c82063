"""`quantkit merge` and `quantkit residual extract`: write a complete HF model directory, streaming.

The output is sharded safetensors (+ `model.safetensors.index.json`), `config.json` (dtype and
embedding tying as merged), the non-weight files (tokenizer, chat template, generation config) of
`files_from`, and a JSON note of what was merged. Tensors go through in row chunks, so peak memory is
one chunk plus the adapters. Everything is written into a hidden staging directory beside the
output and renamed into place when complete; an existing output is replaced only with `force`, and
only once the new one is whole.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from quantkit.converters.safetensors_file import SafetensorsWriter, TensorSpec

from .adapters import load_adapter
from .errors import InputError
from .hfmodel import HFModel, row_ranges
from .merged import DTYPE_NAMES, MergedModel, Residual
from .outputs import copy_model_files, staged_output, write_json
from .streams import prefetch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
def parse_size(text: str) -> int:
    """'5GB', '500MiB', '2e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kmgt]i?b?)?\s*", text.lower())
    if not m:
        raise InputError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "").rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    try:
        size = int(float(m.group(1)) * scale)
    except (ValueError, OverflowError):
        raise InputError(f"not a size: {text!r} (e.g. 5GB, 500MB)") from None
    if size < 10**6:
        raise InputError(f"--shard-size {text!r} is {size} bytes: give at least 1MB (e.g. 5GB, 500MB)")
    return size


def open_model(base: str | Path, loras: list[str | Path] = (), weights: list[float] = (),
               residual: str | Path | None = None, scale: float = 1.0, *, dtype: str = "bf16",
               device: str = "cpu", ignore_base_name: bool = False) -> HFModel:
    """The base checkpoint, or a MergedModel of it with the adapters (and residual) merged in."""
    model = HFModel(base)
    if weights and len(weights) != len(loras):
        raise InputError(f"{len(weights)} --weight values for {len(loras)} --lora adapters (give one per adapter)")
    if scale != 1.0 and residual is None:
        raise InputError(f"--scale {scale:g} is the scale of --residual, and no --residual is given")
    if not loras and residual is None:
        return model
    adapters = [load_adapter(p, model, weight=w, ignore_base_name=ignore_base_name)
                for p, w in zip(loras, weights or [1.0] * len(loras))]
    res = Residual(HFModel(residual), scale) if residual is not None else None
    return MergedModel(model, adapters, res, dtype=DTYPES[dtype], device=device)


def stream_tensors(model: HFModel, writer: SafetensorsWriter, specs: list[TensorSpec], *, progress: bool,
                   desc: str, chunk_values: int = 1 << 24) -> None:
    """Every tensor of `specs`, row chunk by row chunk, from `model` to `writer`: a producer thread
    reads and merges the next chunks while this one writes."""
    def chunks():
        for i, spec in enumerate(specs):
            for rows in row_ranges(spec.shape, chunk_values):
                yield i, spec, model.read_rows(spec.name, rows.start, rows.stop).to(spec.dtype)

    bar = tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, disable=not progress,
               file=sys.stderr, desc=desc, dynamic_ncols=True)
    try:
        for i, spec, x in prefetch(chunks(), depth=3):
            bar.set_postfix_str(f"tensor {i + 1}/{len(specs)} {spec.name}", refresh=False)
            writer.write(spec.name, x)
            bar.update(x.numel() * x.element_size())
    finally:
        bar.close()


def _write_weights(model: MergedModel, dest: Path, shard_bytes: int, notes: dict[str, dict], progress: bool,
                   desc: str) -> list[Path]:
    """Every tensor of `model` as shards in `dest`, with `notes` as JSON in the safetensors metadata."""
    specs = [TensorSpec(name, model.dtype, ref.shape) for name, ref in model.tensors.items()]
    writer = SafetensorsWriter(dest, specs, shard_bytes=shard_bytes,
                               metadata={k: json.dumps(v, separators=(",", ":")) for k, v in notes.items()})
    try:
        stream_tensors(model, writer, specs, progress=progress, desc=desc)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise



def write_merged(model: MergedModel, out: str | Path, *, files_from: str | Path | None = None,
                 shard_bytes: int = 5 * 10**9, progress: bool = True, force: bool = False) -> dict:
    """Write the merged model as a HF model directory; returns the merge note (also in merge.json)."""
    t0 = time.perf_counter()
    files_from = Path(files_from) if files_from else model.base.path
    note = model.merge_note()
    inputs = model.input_paths() + [files_from]
    with staged_output(Path(out), force, inputs) as tmp:
        shards = _write_weights(model, tmp, shard_bytes, {"quantkit_merge": note}, progress, "merge")
        write_json(tmp / "config.json", model.config)
        note["files"] = {"shards": [p.name for p in shards], "copied_from": str(Path(files_from).resolve()),
                         "copied": copy_model_files(files_from, tmp)}
        write_json(tmp / "merge.json", note)
    # the time goes to the caller, not into merge.json: the same inputs give the same bytes
    note["seconds"] = round(time.perf_counter() - t0, 3)
    return note


def extract_residual(instruct: str | Path, base: str | Path, out: str | Path, *, dtype: str = "fp16",
                     shard_bytes: int = 5 * 10**9, progress: bool = True, force: bool = False) -> dict:
    """delta = instruct - base, computed in float32 and rounded once to `dtype`, written as a
    checkpoint with the instruct model's config and tokenizer files and a residual.json note."""
    t0 = time.perf_counter()
    inst, b = HFModel(instruct), HFModel(base)
    Residual(b).check(inst, mine="the base", theirs="the instruct model")   # same names and shapes
    delta = MergedModel(inst, residual=Residual(b, -1.0), dtype=DTYPES[dtype])   # I + (-1)*B == I - B exactly
    note = {"quantkit_residual": 1, "instruct": {"path": str(Path(inst.path).resolve()), "fingerprint": inst.fingerprint()},
            "base": {"path": str(Path(b.path).resolve()), "fingerprint": b.fingerprint()}, "dtype": DTYPE_NAMES[DTYPES[dtype]][1],
            "formula": "delta = instruct - base in float32, rounded once"}
    with staged_output(Path(out), force, [inst.path, b.path]) as tmp:
        shards = _write_weights(delta, tmp, shard_bytes, {"quantkit_residual": note}, progress, "residual")
        write_json(tmp / "config.json", delta.config)
        note["files"] = {"shards": [p.name for p in shards], "copied": copy_model_files(inst.path, tmp)}
        write_json(tmp / "residual.json", note)
    note["seconds"] = round(time.perf_counter() - t0, 3)
    return note
