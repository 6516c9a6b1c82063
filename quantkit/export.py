"""One-pass GGUF export: read each HF tensor once → transform → quantize for every variant → write.

    read lazily (hfmodel, or merged: a base with adapters / a residual merged in as it is read)
    → name/permute (arch) → plan per tensor (plan) → quantize (kernels)
    → write (converters.gguf_file) → export.json (+ Ollama Modelfiles)
"""
from __future__ import annotations

import json
import sys
import time
from math import prod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from quantkit.converters.gguf_file import GGUFFile, TensorInfo
from quantkit.kernels import registry as qreg

from .families import SourceTensor, family_of, hparams_of
from .errors import InputError, UnsupportedError, OutputError
from .hfmodel import HFModel, row_ranges
from .metadata import build_metadata
from .outputs import partial_path, refuse_inputs, sha256_file, sweep_leftovers, write_text_atomic
from .plan import Overrides, TensorPlan, Variant, format_plan, make_plan
from .streams import Worker, prefetch, to_device, to_host
from .tokenizer import load_vocab
from .transforms import finite_flag

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
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("is a file, not a directory: choose a directory for the GGUF files", out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = partial_path(out_dir / "quantkit-write-test")
        probe.write_bytes(b"")
        probe.unlink()
        sweep_leftovers(out_dir)            # what a killed export left here
    except OSError as e:
        raise OutputError(f"output directory is not writable ({e.strerror or e})", out_dir) from None


def row_chunks(t: SourceTensor, max_values: int = CHUNK_VALUES) -> Iterator[slice]:
    if t.generate is not None or len(t.shape) < 2:
        return iter([slice(0, t.shape[0] if t.shape else 1)])
    return row_ranges(t.shape, max_values, t.row_granule)


def fetch(model: HFModel, t: SourceTensor, rows: slice) -> torch.Tensor | None:
    """Rows of one GGUF tensor's source as read (I/O only: see HFModel.fetch), or the generated tensor.
    For a stack (MoE experts) the rows are whole experts: each is read whole, one after the other,
    from its own tensor or, fused, as its rows of the fused tensor (one byte range each)."""
    if t.generate is not None:
        return t.generate()
    if t.fused is not None:
        return torch.stack([model.fetch_expert(t.hf_name, e, *t.fused) for e in range(*rows.indices(t.shape[0]))])
    if t.parts:
        return torch.stack([model.fetch(p, 0, model.tensors[p].shape[0]) for p in t.parts[rows]])
    return model.fetch(t.hf_name, rows.start, rows.stop)


def finish(model: HFModel, t: SourceTensor, rows: slice, x: torch.Tensor) -> torch.Tensor:
    """What the model adds to the rows read (a merged adapter's delta), part by part for a stack."""
    if t.fused is not None:
        return torch.stack([model.finish_expert(t.hf_name, e, *t.fused, x[i])
                            for i, e in enumerate(range(*rows.indices(t.shape[0])))])
    if t.parts:
        return torch.stack([model.finish(p, 0, x.shape[1], x[i]) for i, p in enumerate(t.parts[rows])])
    return model.finish(t.hf_name, rows.start, rows.stop, x)


def source_nbytes(model: HFModel, t: SourceTensor, rows: slice | None = None) -> int:
    """Checkpoint bytes behind a GGUF tensor (or some of its rows)."""
    if t.hf_name is None:
        return 0
    if t.parts:
        return sum(model.tensors[p].nbytes for p in t.parts[rows or slice(None)])
    ref = model.tensors[t.hf_name]
    if t.fused is not None:         # its share of the fused tensor
        n = len(range(*(rows or slice(None)).indices(t.shape[0])))
        return ref.nbytes * n * (t.fused[1] - t.fused[0]) // (ref.shape[0] * ref.shape[1])
    if rows is None:
        return ref.nbytes
    return ref.nbytes * (rows.stop - rows.start) // (ref.shape[0] if ref.shape else 1)


class _Float32Staging:
    """Chunks converted to float32 on the CPU into one kept buffer. A fresh 64 MB tensor per chunk
    pays for its page faults: bf16 → float32 of 16 M values takes 19 ms into a new tensor and 1.2 ms
    into a kept one (2 cores). The converted chunk lives for one loop iteration only: everything
    handed on (the quantized bytes, the finite flag) is a new tensor."""

    def __init__(self):
        self._buf: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, dev: torch.device) -> torch.Tensor:
        if dev.type != "cpu" or x.device.type != "cpu" or x.dtype == torch.float32:
            return x.to(device=dev, dtype=torch.float32)
        if self._buf is None or self._buf.numel() < x.numel():
            self._buf = torch.empty(x.numel(), dtype=torch.float32)
        return self._buf[:x.numel()].view(x.shape).copy_(x)


def to_rows(x: torch.Tensor, t: SourceTensor) -> torch.Tensor:
    """A chunk as read → float32 [rows, cols] in GGUF's layout (1-D tensors as [1, n]), on x's device."""
    x = x.to(torch.float32)
    if t.generate is None and t.transform is not None:
        x = t.transform(x)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)


def quantize(x: torch.Tensor, qtype, weights: torch.Tensor | None) -> torch.Tensor:
    """Rows [rows, cols] → their bytes; `weights` [cols], or [experts, cols] for a chunk of a stack of
    experts: each expert's rows (an equal share of x, in order) with its own (llama-quant.cpp's
    imatrix_for_row)."""
    if weights is None or weights.dim() == 1:
        return qreg.quantize_rows(x, qtype, weights)
    assert x.shape[0] % len(weights) == 0, (x.shape, weights.shape)
    return torch.cat([qreg.quantize_rows(rows, qtype, w) for rows, w in zip(x.chunk(len(weights)), weights)])


def _not_finite(model: HFModel, t: SourceTensor) -> InputError:
    return InputError(f"tensor {t.hf_name!r} contains NaN or Inf", model.tensors[t.hf_name].shard)


def _check_imatrix_support(family, imatrix, model: HFModel) -> None:
    if imatrix is not None and not family.imatrix:
        raise UnsupportedError(f"no importance matrix for {model.architecture} yet", imatrix)


def load_imatrix(path: Path, plans: list[TensorPlan]) -> tuple[dict[str, torch.Tensor], dict]:
    """The per-column weights of an imatrix file for the tensors of `plans` (as llama-quantize
    loads them: sums / count), and a note for export.json: float32 [columns] per matrix, [experts,
    columns] per stack of experts (each expert's own). A tensor the file does not cover is quantized
    without weights, as llama-quantize does; a size that does not match is an error (llama-quantize
    compares the values with columns x experts)."""
    from . import imatrix as imx
    im = imx.load(path)
    weights = im.weights()
    for p in plans:
        t, w = p.tensor, weights.get(p.tensor.gguf_name)
        if w is None:
            continue
        cols, experts = t.shape[-1], (t.shape[0] if t.stacked else 1)
        if t.stacked and w.numel() != cols * experts and w.numel() % cols == 0:
            raise InputError(f"imatrix for {t.gguf_name} holds {w.numel() // cols} experts, the model has {experts}: "
                             "it was made for another model", path)
        if w.numel() != cols * experts:
            raise InputError(f"imatrix for {t.gguf_name} has {w.numel()} values, the tensor has {cols} columns"
                             + (f" x {experts} experts" if t.stacked else "") + ": it was made for another model", path)
        weights[t.gguf_name] = w.reshape(experts, cols) if t.stacked else w
    covered = [p.tensor.gguf_name for p in plans if p.tensor.gguf_name in weights]
    if not covered:
        raise InputError("the imatrix covers none of this model's tensors: it was made for another model", path)
    note = {"path": str(Path(path).resolve()), "sha256": sha256_file(Path(path)), "entries": len(weights),
            "covered_tensors": len(covered), "datasets": im.datasets, "chunks": im.chunk_count,
            "chunk_size": im.chunk_size}
    return weights, note


def _imatrix_kv(given_path: str, note: dict) -> dict:
    """The keys llama-quantize --imatrix adds, in its order, after the model's own (as its
    kv_overrides): the file as given, the first dataset (both cut to 127 bytes), the number of
    entries and of chunks."""
    import gguf
    kv = {"quantize.imatrix.file": gguf.GGUFValue(given_path.encode()[:127].decode(errors="ignore"),
                                                   gguf.GGUFValueType.STRING)}
    if note["datasets"]:
        kv["quantize.imatrix.dataset"] = gguf.GGUFValue(note["datasets"][0].encode()[:127].decode(errors="ignore"),
                                                        gguf.GGUFValueType.STRING)
    kv["quantize.imatrix.entries_count"] = gguf.GGUFValue(note["entries"], gguf.GGUFValueType.UINT32)
    if note["chunks"] > 0:
        kv["quantize.imatrix.chunks_count"] = gguf.GGUFValue(note["chunks"], gguf.GGUFValueType.UINT32)
    return kv


@dataclass
class _Chunk:
    """One row chunk of one tensor on its way through the stages."""
    plan: TensorPlan
    index: int                                  # of the plan in file order, for the progress bar
    in_bytes: int                               # of the input, for the progress bar
    rows: slice
    data: dict[str, torch.Tensor] = field(default_factory=dict)    # qtype → quantized bytes (host)
    finite: torch.Tensor | None = None          # the input's NaN/Inf check (from the GPU: a copy back)
    ready: object = None                        # CUDA: an event recorded after the copies back


def _reads(model: HFModel, plans: list[TensorPlan], chunk_values: int, pin: bool) -> Iterator[tuple[_Chunk, torch.Tensor]]:
    """(chunk, its rows as stored) for every tensor in file order: the reader thread's work. It
    does I/O only (pinning for a CUDA copy): torch ops in a second thread fight the main thread's
    for the cores (on 2 cores, converting here made the whole export 2x slower)."""
    for i, p in enumerate(plans):
        for rows in row_chunks(p.tensor, chunk_values):
            nbytes = source_nbytes(model, p.tensor, rows)
            x = fetch(model, p.tensor, rows)
            yield _Chunk(p, i, nbytes, rows), (x.pin_memory() if pin and x is not None else x)


def prepare(model: HFModel, variants: list[Variant], imatrix: bool = False, overrides: Overrides = Overrides()):
    """What an export checks and plans before reading a weight: the architecture, the tensors'
    names and shapes against the config, and the per-tensor type plan (some of llama.cpp's rules
    depend on whether an importance matrix is given). (family, hparams, sources, plans)."""
    family = family_of(model)
    hp = hparams_of(model)
    sources = family.source_tensors(model, hp)
    return family, hp, sources, make_plan(sources, hp, variants, imatrix=imatrix, overrides=overrides)


def check(model: HFModel, variants: list[Variant], imatrix: Path | None = None,
          overrides: Overrides = Overrides()) -> None:
    """Everything `export_gguf` would refuse, without reading weights (NaN/Inf shows only when read)."""
    family, hp, _, plans = prepare(model, variants, imatrix is not None, overrides)
    _check_imatrix_support(family, imatrix, model)
    load_vocab(model.path, hp.n_vocab, family.sentencepiece_only, family.added_token_rules)
    if imatrix is not None:
        load_imatrix(imatrix, plans)


@dataclass(frozen=True)
class AutoSettings:
    """The sensitivity pass of `auto:` types: calibration text (None: generated by the model) and its
    size (0: quantkit.mix.calibration_size's defaults)."""
    calib: Path | None = None
    n_samples: int = 0
    seqlen: int = 0


def resolve_auto(model: HFModel, hp, sources, plans: list[TensorPlan], variants: list[Variant],
                 weights: dict[str, torch.Tensor], imatrix: bool, overrides: Overrides, settings: AutoSettings,
                 device: str, progress: bool) -> tuple[list[Variant], dict]:
    """Measure the model once and give every `auto:` variant its types (quantkit.mix); the note for
    export.json: the budgets, the predicted divergences and every tensor's measured figures."""
    import dataclasses

    from . import mix
    from .plan import VARIANTS, Choice, variant_nbytes

    if type(model) is not HFModel:
        raise UnsupportedError("auto: types measure the merged model: merge it first (quantkit merge, or quantkit run, "
                               "which keeps a merged copy)", model.path)
    searched = {}
    for p in plans:
        t = p.tensor
        c = p.choices[next(v.name for v in variants if v.target)]
        if (c.qtype in ("f32", "f16", "bf16") or c.reason.startswith("override") or t.stacked or not t.hf_name
                or len(t.shape) != 2 or not mix.ladder(t.shape[-1])):
            continue
        searched[t.gguf_name] = (t.hf_name, t.shape)
    measured = mix.measure(model.path, searched, weights, settings.calib, settings.n_samples, settings.seqlen,
                           device, progress)
    shapes = {n: s for n, (_, s) in searched.items()}
    out, files = [], {}
    for v in variants:
        if not v.target:
            out.append(v)
            continue
        note = {"target": v.target.spec}
        if v.target.variant:        # the named file's bytes for the searched tensors
            ref = VARIANTS[v.target.variant]
            ref_plans = make_plan(sources, hp, [ref], imatrix=imatrix, overrides=overrides)
            ref_types = {p.tensor.gguf_name: p.choices[ref.name].qtype for p in ref_plans if p.tensor.gguf_name in searched}
            budget = sum(mix.tensor_nbytes(shapes[n], t) for n, t in ref_types.items())
            note |= {"reference": ref.label, "reference_bytes": variant_nbytes(ref_plans, ref),
                     "reference_predicted_kld": sum(measured.sensitivity[n].predicted(t) for n, t in ref_types.items())}
        else:                       # bits per weight over every tensor, less what the others take
            fixed = sum(mix.tensor_nbytes(p.tensor.shape, p.choices[v.name].qtype) for p in plans
                        if p.tensor.gguf_name not in searched)
            budget = int(v.target.bpw * sum(prod(p.tensor.shape) for p in plans) / 8) - fixed
        types = mix.choose(shapes, measured, budget)
        assigned = {n: Choice(t, f"auto: predicted KLD {measured.sensitivity[n].predicted(t):.2e}")
                    for n, t in types.items()}
        files[v.name] = {**note, "budget_bytes": budget, "tensor_bytes": sum(mix.tensor_nbytes(shapes[n], t)
                                                                             for n, t in types.items()),
                         "predicted_kld": sum(measured.sensitivity[n].predicted(t) for n, t in types.items()),
                         "types": types}
        out.append(dataclasses.replace(v, assigned=assigned))
    note = {"calibration": {"text": measured.calibration, "tokens": measured.tokens},
            "seconds": round(measured.seconds, 1), "files": files,
            "sensitivity": {n: {"probe": s.probe, "probe_kld": s.probe_kld, "error": s.error}
                            for n, s in measured.sensitivity.items()}}
    return out, note


def export_gguf(model: str | Path | HFModel, variants: list[Variant], out_dir: str | Path, *,
                name: str | None = None, name_from: Path | None = None, device: str = "cpu", progress: bool = True,
                dry_run: bool = False, chunk_values: int = CHUNK_VALUES, imatrix: Path | None = None,
                overrides: Overrides = Overrides(), auto: AutoSettings | None = None) -> ExportResult:
    """Write one GGUF per variant. `model` is a HF model directory, or a model object such as
    quantkit.merged.MergedModel (a base with adapters merged in as it is read). `name` sets
    general.name; `name_from` is the directory whose card, config and folder name give the general.*
    names (default: the model's; `quantkit run` passes the base of its merged copy)."""
    t0 = time.perf_counter()
    if not isinstance(model, HFModel):
        model = HFModel(model)
    family, hp, sources, plans = prepare(model, variants, imatrix is not None, overrides)
    skipped = family.skipped_tensors(model)
    if skipped:
        print(f"note: {len(skipped)} tensors of {model.architecture}'s vision tower and projector are left out: "
              "the GGUF holds the text model", file=sys.stderr)
    auto_note = None
    if any(v.target for v in variants):
        _check_imatrix_support(family, imatrix, model)
        weights, _ = load_imatrix(imatrix, plans) if imatrix is not None else ({}, None)
        variants, auto_note = resolve_auto(model, hp, sources, plans, variants, weights, imatrix is not None,
                                           overrides, auto or AutoSettings(), device, progress)
        plans = make_plan(sources, hp, variants, imatrix=imatrix is not None, overrides=overrides)
    if dry_run:
        print(format_plan(plans, variants))
        if auto_note:
            for name, a in auto_note["files"].items():
                print(f"{name}: {a['tensor_bytes'] / 1e6:,.1f} MB of searched tensors (budget {a['budget_bytes'] / 1e6:,.1f} MB), "
                      f"predicted KLD {a['predicted_kld']:.4f}" + (f" ({a['reference']}: {a['reference_predicted_kld']:.4f})"
                                                                   if a.get("reference") else ""))
        return ExportResult({}, plans, time.perf_counter() - t0, {"auto": auto_note} if auto_note else {})

    _check_imatrix_support(family, imatrix, model)
    weights, imatrix_note = load_imatrix(imatrix, plans) if imatrix is not None else ({}, None)
    imatrix_kv = _imatrix_kv(str(imatrix), imatrix_note) if imatrix_note else {}
    vocab = load_vocab(model.path, hp.n_vocab, family.sentencepiece_only, family.added_token_rules)
    meta = build_metadata(model, family, hp, sources, vocab, name, name_from)
    out_dir = Path(out_dir)
    refuse_inputs(out_dir, model.input_paths())
    created = not out_dir.exists()
    _check_writable(out_dir)
    dev = torch.device(device)

    files: dict[str, GGUFFile] = {}
    for v in variants:
        infos = []
        for p in plans:
            qt = qreg.get(p.choices[v.name].qtype)
            shape = p.tensor.shape
            if v.quantized:     # llama-quantize writes ggml's dimensions: leading ones (trailing in ggml) go
                while len(shape) > 1 and shape[0] == 1:
                    shape = shape[1:]
            infos.append(TensorInfo(p.tensor.gguf_name, qt.ggml_type, (*shape[:-1], qreg.row_nbytes(qt, shape[-1]))))
        path = out_dir / f"{meta.name}-{v.label}.gguf"
        files[v.name] = GGUFFile(path, {**meta.for_file_type(v.file_type, v.quantized), **imatrix_kv}, infos)
    weights = {k: w.to(dev) for k, w in weights.items()}
    total = sum(source_nbytes(model, p.tensor) for p in plans)
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=not progress, file=sys.stderr,
               desc="export", dynamic_ncols=True)

    def write(c: _Chunk) -> None:               # the writer thread, in file order
        if c.ready is not None:
            c.ready.synchronize()
        if c.finite is not None and not bool(c.finite):
            raise _not_finite(model, c.plan.tensor)
        for v in variants:
            files[v.name].write(c.plan.tensor.gguf_name, c.data[c.plan.choices[v.name].qtype].numpy())
        bar.set_postfix_str(f"tensor {c.index + 1}/{len(plans)} {c.plan.tensor.gguf_name}", refresh=False)
        bar.update(c.in_bytes)

    try:
        for f in files.values():
            f.open()
        # read (a thread) → copy to the GPU (a side stream) → quantize every distinct type once
        # (here) → copy back (no wait) → write every variant (a thread); bounded queues between
        chunks = to_device(prefetch(_reads(model, plans, chunk_values, pin=dev.type == "cuda"), depth=2), dev)
        as_float32 = _Float32Staging()
        with Worker(write, depth=4, name="quantkit-writer") as writer:
            for c, x in chunks:
                t = c.plan.tensor
                if t.generate is None:      # merged (a MergedModel), then checked by the writer
                    x = as_float32(finish(model, t, c.rows, x), dev)
                    c.finite = to_host(finite_flag(x))
                x = to_rows(x, t)
                w = weights.get(t.gguf_name)
                w = w[c.rows] if w is not None and w.dim() == 2 else w     # a stack: this chunk's experts'
                for qtype in dict.fromkeys(c.plan.choices[v.name].qtype for v in variants):
                    c.data[qtype] = to_host(quantize(x, qreg.get(qtype), w))
                if dev.type == "cuda":
                    c.ready = torch.cuda.Event()
                    c.ready.record()
                writer.put(c)
        written = {v: f.commit() for v, f in files.items()}
    except BaseException:
        for f in files.values():
            f.abort()
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()                     # made for this export: not left behind empty
        raise
    finally:
        bar.close()

    seconds = time.perf_counter() - t0
    report = {
        "quantkit_export": 1,
        "input": {"path": str(model.path), "architecture": model.architecture, "hash": model.fingerprint(),
                  "bytes": model.total_bytes(), "parameters": meta.total_params},
        "merge": model.merge_note(),
        **({"imatrix": imatrix_note} if imatrix_note else {}),
        **({"auto": auto_note} if auto_note else {}),
        **({"overrides": {"tensor_types": [f"{p}={t}" for p, t in overrides.tensor_types],
                          "output_tensor_type": overrides.output, "token_embedding_type": overrides.token_embd,
                          "pure": overrides.pure}} if overrides else {}),
        "files": {
            v.name: {
                "path": written[v.name].name, "bytes": written[v.name].stat().st_size,
                "file_type": v.file_type.name,
                "tensor_types": _type_counts(plans, v.name),
            } for v in variants
        },
    }
    write_text_atomic(out_dir / "export.json", json.dumps(report, indent=2) + "\n")
    return ExportResult(written, plans, seconds, report)


def _type_counts(plans: list[TensorPlan], variant: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in plans:
        q = p.choices[variant].qtype.upper()
        counts[q] = counts.get(q, 0) + 1
    return dict(sorted(counts.items()))


