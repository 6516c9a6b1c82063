"""The one orchestrator: merge → (imatrix →) GGUF → GPTQ → INT8 / NF4 → bench, as steps built from one
settings object (pipeline_config.Pipeline), which `quantkit run`'s pipeline.toml and flags and `quantkit
export`'s flags both fill. `run` executes them through the manifest (resumable); `export` in order.

Each stage is a manifest.Step with its inputs, settings and outputs; manifest.run_steps skips those
whose record still holds. Every stage writes through outputs.staged_output (a hidden directory
renamed into place), so a killed run leaves no output under its final name that is incomplete.

    OUT/merged/   (when adapters or a residual are given)
    OUT/imatrix/  imatrix.gguf (with [gguf] imatrix = "auto")
    OUT/gguf/     *.gguf + *.Modelfile + export.json
    OUT/gptq/, OUT/gptq-ct/, OUT/int8/, OUT/nf4/
    OUT/report/   report.md, report.json, *.png
    OUT/pipeline.json
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import OutputError, QuantkitError, UnsupportedError
from .hfmodel import HFModel
from .manifest import Manifest, Step
from .outputs import check_creatable, check_out_dir, check_output_dir, existing_ancestor, inside_input, staged_output
from .pipeline_config import Pipeline, gptq_formats


RUN, EXPORT = "run", "export"


@dataclass
class Plan:
    steps: list[Step]
    out: Path
    model_dir: Path            # what the transformers steps read: OUT/merged (a temporary copy for export) or the base
    temporary: list[Path] = field(default_factory=list)     # removed once the steps are done (export)
    results: dict[str, Any] = field(default_factory=dict)   # what each step made: ExportResult, directories


def build(cfg: Pipeline, device: str, *, progress: bool = True, mode: str = RUN, force: bool = False,
          checks: bool = True) -> Plan:
    """The steps of `cfg`, for both commands; `device` is resolved by the caller (cpu, cuda, cuda:N).

    mode "run" (`quantkit run`): OUT/merged, OUT/imatrix, OUT/gguf, OUT/gptq..., OUT/report, each staged and
    recorded in the manifest, replaced when its record no longer holds.
    mode "export" (`quantkit export`): the GGUFs straight into OUT, adapters merged on the fly as the
    tensors are read; a merged copy only when a transformers step needs one, removed after; an existing
    OUT/gptq, OUT/int8 ... needs `force`. checks=False skips check_inputs (a cluster's worker: the
    driver checked the same settings)."""
    inp, gg, g, b = cfg["input"], cfg["gguf"], cfg["gptq"], cfg["bench"]
    out, base = Path(cfg["output"]["dir"]), Path(inp["base"])
    base_model = HFModel(base)                         # checks the base now: a clear error before any step
    # export: the GGUF pass comes first (it checks its own inputs before any work), unless it needs an
    # importance matrix made first
    gguf_first = mode == EXPORT and bool(gg["types"]) and gg["imatrix"] != "auto"
    src = check_inputs(cfg, base_model, device, mode=mode, force=force, check_gguf=not gguf_first) if checks else \
        source(cfg, device) if inp["lora"] or inp["residual"] else base_model
    n = base_model.n_params()
    plan = Plan([], out, base)
    steps = plan.steps
    merged = bool(inp["lora"] or inp["residual"])
    types, bnb_modes = gg["types"], [m for m in ("int8", "nf4") if cfg["bnb"][m]]
    replace = mode == RUN or force                     # run replaces its own outputs; export needs --force
    needs_dir = g["enabled"] or bnb_modes or b["enabled"] or (types and gg["imatrix"] == "auto")

    if merged and (mode == RUN or needs_dir):
        plan.model_dir = out / "merged" if mode == RUN else out / f".merged.partial-{os.getpid()}-for-gptq"
        if mode == EXPORT:
            plan.temporary.append(plan.model_dir)      # a killed run's is swept by the next writer

        def do_merge():
            from .merge import write_merged
            write_merged(src, plan.model_dir, progress=progress, force=True)
        steps.append(Step("merge", [base, *_merged_in(inp)],
                          {"lora_weights": inp["lora_weights"], "residual_scale": inp["residual_scale"]},
                          [plan.model_dir], do_merge, expected_bytes=2 * n))

    imatrix = None
    if types and gg["imatrix"] == "auto":
        imatrix = out / "imatrix" / "imatrix.gguf" if mode == RUN else out / "imatrix.gguf"

        def do_imatrix():
            from . import imatrix as imx
            im = imx.collect(plan.model_dir, calib=Path(g["calib"]) if g["calib"] else None,
                             n_samples=gg["imatrix_samples"], seqlen=gg["imatrix_seqlen"], device=device,
                             progress=progress)
            if mode == RUN:
                with staged_output(imatrix.parent, True, [plan.model_dir]) as tmp:
                    imx.write(im, tmp / imatrix.name)
            else:
                imx.write(im, imatrix)
        steps.append(Step("imatrix", [plan.model_dir] + ([Path(g["calib"])] if g["calib"] else []),
                          {"samples": gg["imatrix_samples"], "seqlen": gg["imatrix_seqlen"], "calib": g["calib"]},
                          [imatrix.parent if mode == RUN else imatrix], do_imatrix, expected_bytes=1 << 20))
    elif types and gg["imatrix"]:
        imatrix = Path(gg["imatrix"])
    if types:
        from .plan import parse_variants
        variants = parse_variants(",".join(types))

        def gguf_into(dest: Path):
            from .export import export_gguf
            from .ollama import write_modelfiles
            # run reads OUT/merged and names the files after the base, as export --lora does (merged
            # would give "Merged"); export reads the base with the adapters merged on the fly
            res = export_gguf(plan.model_dir if mode == RUN else src, variants, dest, name=gg["name"] or None,
                              name_from=base if merged and mode == RUN else None, device=device,
                              progress=progress, imatrix=imatrix, overrides=overrides(gg), auto=auto_settings(cfg))
            if gg["ollama"]:
                write_modelfiles(base, res.files)
            plan.results["gguf"] = res

        def do_gguf():
            if mode == EXPORT:
                return gguf_into(out)
            with staged_output(out / "gguf", True, [plan.model_dir]) as tmp:
                gguf_into(tmp)
        steps.insert(0 if gguf_first else len(steps),
                     Step("gguf", [plan.model_dir] + ([imatrix] if imatrix else []), dict(gg),
                          [out / "gguf" if mode == RUN else out], do_gguf,
                          expected_bytes=int(sum(n * v.bpw / 8 for v in variants))))

    variants_for_bench: list[Path] = []
    if g["enabled"]:
        settings = gptq_settings(g, device)
        dirs = [out / ("gptq" if f == "gptq" else "gptq-ct") for f in settings.formats]

        def do_gptq():
            from .gptq import CALIBRATION, quantize, write
            if progress and settings.method == "gptq" and not (g["calib_samples"] and g["calib_seqlen"]):
                (gn, gs), (cn, cs) = CALIBRATION["cuda"], CALIBRATION["cpu"]
                print(f"GPTQ calibration on {device}: {settings.n_samples} samples x {settings.seqlen} tokens "
                      f"({gn} x {gs} on a GPU, {cn} x {cs} on a CPU, where a 135M model takes ~5 min; "
                      "--calib-samples / --calib-seqlen to change)", file=sys.stderr)
            model, result = quantize(plan.model_dir, settings, device, progress=progress)
            plan.results["gptq"] = write(model, result, settings, plan.model_dir, out, force=replace)
        steps.append(Step("gptq", [plan.model_dir] + ([Path(g["calib"])] if g["calib"] else []), dict(g), dirs,
                          do_gptq, expected_bytes=int(2 * n * (g["bits"] / 8 + 0.1))))
        if "compressed-tensors" in settings.formats:
            variants_for_bench.append(out / "gptq-ct")

    for mode_, frac in (("int8", 1.1), ("nf4", 0.6)):
        if mode_ in bnb_modes:
            def do_bnb(m=mode_):
                from . import bnb
                plan.results[m] = bnb.export(plan.model_dir, out / m, m, device=device, force=replace)
            steps.append(Step(mode_, [plan.model_dir], {"mode": mode_}, [out / mode_], do_bnb,
                              expected_bytes=int(n * frac)))
            variants_for_bench.append(out / mode_)

    if b["enabled"]:
        job = BenchJob(plan.model_dir, out / "report", out / "gguf" if types else None, variants_for_bench,
                       dict(text=Path(b["text"]) if b["text"] else None, ctx=b["ctx"], device=device,
                            limit_chunks=b["limit_chunks"] or None, progress=progress, top_k=b["top_k"],
                            name=_model_name(base) + (" + " + ", ".join(Path(a).name for a in _merged_in(inp))
                                                      if merged else "")),
                       b["gpus"])
        inputs = [plan.model_dir] + ([out / "gguf"] if types else []) + variants_for_bench + \
            ([Path(b["text"])] if b["text"] else [])
        steps.append(Step("bench", inputs, dict(b), [out / "report"], job.run, expected_bytes=1 << 20, job=job))
    return plan


@dataclass
class BenchJob:
    """The bench step's work, in the parts a cluster runs apart (cluster.py): score() the variants
    against the baseline, measure each on a GPU (bench.suite.measure_here), finish() the report.
    run() is all of it on this machine."""
    model_dir: Path
    report: Path
    gguf_dir: Path | None
    others: list[Path]
    score_args: dict
    gpu_names: list[str]

    def variants(self) -> list[Path]:
        return (sorted(self.gguf_dir.glob("*.gguf")) if self.gguf_dir else []) + self.others

    def score(self) -> dict:
        from .bench import suite
        return suite.score(self.model_dir, self.variants(), **self.score_args)

    def finish(self, results: dict, measurements: list[dict]) -> dict:
        from .bench import suite, vram
        with staged_output(self.report, True, [self.model_dir]) as tmp:
            return suite.finish(results, measurements, vram.parse_gpus(self.gpu_names or None, [], None), tmp)

    def run(self) -> None:
        from .bench import suite
        results = self.score()
        self.finish(results, suite.local_measurements(results))


def auto_settings(cfg: Pipeline):
    """The sensitivity pass of `auto:` GGUF types: [gptq] calib's text (or generated), [gguf] auto_* sizes."""
    from .export import AutoSettings
    g = cfg["gptq"]
    return AutoSettings(Path(g["calib"]) if g["calib"] else None, cfg["gguf"]["auto_samples"], cfg["gguf"]["auto_seqlen"])


def execute(plan: Plan, after: Callable[[Step], None] | None = None) -> None:
    """Every step in order, without a manifest (`quantkit export`); the temporary copies go at the end,
    whatever happens."""
    try:
        for s in plan.steps:
            s.run()
            if after is not None:
                after(s)
    finally:
        for t in plan.temporary:
            shutil.rmtree(t, ignore_errors=True)


def source(cfg: Pipeline, device: str = "cpu"):
    """The model [input] describes: the base, or the base with its adapters and residual merged in as
    each tensor is read (merge.MergedModel)."""
    from .merge import open_model
    inp = cfg["input"]
    return open_model(Path(inp["base"]), inp["lora"], inp["lora_weights"], inp["residual"] or None,
                      inp["residual_scale"], device=device, ignore_base_name=inp["ignore_base_name"])


def overrides(gg: dict):
    """The [gguf] section's per-tensor choices (llama-quantize's overrides)."""
    from .plan import Overrides
    return Overrides.parse(gg["tensor_types"], gg["output_tensor_type"], gg["token_embedding_type"], gg["pure"])


def gptq_settings(g: dict, device: str):
    """gptq.GPTQSettings from a [gptq] section; calibration sizes of 0 take the device's defaults."""
    from .gptq import GPTQSettings, calibration_size
    n_samples, seqlen = calibration_size(g["calib_samples"], g["calib_seqlen"], device)
    return GPTQSettings(bits=g["bits"], group_size=g["group_size"], sym=g["sym"], act_order=g["desc_act"],
                        static_groups=g["static_groups"], damp=g["damp"], method=g["method"],
                        calib=Path(g["calib"]) if g["calib"] else None, n_samples=n_samples, seed=0, seqlen=seqlen,
                        formats=gptq_formats(g))


def _merged_in(inp: dict) -> list[Path]:
    """The adapters and the residual of [input] that are merged into the base."""
    return [*map(Path, inp["lora"])] + ([Path(inp["residual"])] if inp["residual"] else [])


def check_inputs(cfg: Pipeline, base: HFModel, device: str = "cpu", *, mode: str = RUN, force: bool = False,
                 check_gguf: bool = True) -> HFModel:
    """Everything that can be checked before a step runs, so a mistake costs seconds, not the
    minutes of the steps before it: adapters and residual against the base, the GGUF plan and the
    tokenizer, the libraries the steps need, GPTQ's shapes and calibration text, the evaluation text,
    the GPU names, and OUT. (NaN/Inf in the weights shows only when they are read: the step reading
    them stops.) Returns the model [input] describes (source()), opened once for every step."""
    inp, out, g = cfg["input"], Path(cfg["output"]["dir"]), cfg["gptq"]
    bnb_modes = [m for m in ("int8", "nf4") if cfg["bnb"][m]]
    inputs = [base.path, *_merged_in(inp)]
    if mode == RUN:
        src = inside_input(out, inputs)
        if src is not None:
            raise cfg.error("output", "dir", f"the output directory {out} is inside the input {src}: "
                            "choose a directory of its own")
    src = source(cfg, device) if inp["lora"] or inp["residual"] else base
    if cfg["gguf"]["types"] and check_gguf:
        from .export import check
        from .plan import parse_variants
        try:
            variants = parse_variants(",".join(cfg["gguf"]["types"]))
        except QuantkitError as e:
            raise cfg.error("gguf", "types", str(e)) from None
        imatrix = cfg["gguf"]["imatrix"]
        check(base, variants, Path(imatrix) if imatrix not in ("", "auto") else None, overrides(cfg["gguf"]))
        if any(v.target for v in variants):
            if mode == EXPORT and _merged_in(inp):
                raise cfg.error("gguf", "types", "auto: types measure the merged model: merge it first (quantkit "
                                "merge), or use quantkit run, which keeps a merged copy")
            if g["calib"]:
                from .layerwise import text_tokens
                from .mix import calibration_size
                text_tokens(base.path, Path(g["calib"]),
                            *calibration_size(device, cfg["gguf"]["auto_samples"], cfg["gguf"]["auto_seqlen"]))
    if g["enabled"] or bnb_modes:
        needed = ["transformers"] + (["bitsandbytes"] if bnb_modes else [])
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            raise UnsupportedError(f"GPTQ / INT8 / NF4 need {' and '.join(missing)}: pip install 'quantkit[quant]'")
    if g["enabled"]:
        from .gptq import check_shapes
        settings = gptq_settings(g, device)
        check_shapes(base, settings)
        if g["calib"]:
            from .layerwise import text_tokens
            text_tokens(base.path, settings.calib, settings.n_samples, settings.seqlen)
    b = cfg["bench"]
    if b["enabled"]:
        from .bench import evaluate, suite, vram
        suite.check_extras(gguf=bool(cfg["gguf"]["types"]))
        try:
            vram.parse_gpus(b["gpus"] or None, [], None)
        except ValueError as e:
            raise cfg.error("bench", "gpus", str(e)) from None
        *_, windows = suite.load_text(base.path, Path(b["text"]) if b["text"] else None, b["ctx"],
                                      b["limit_chunks"] or None)
        suite.check_disk(evaluate.cache_dir(), base, windows, b["top_k"])
    if mode == RUN:
        check_creatable(out)
    elif g["enabled"] or bnb_modes:            # the GGUF pass checks its own place
        check_out_dir(out, *inputs)
        dirs = [("gptq" if f == "gptq" else "gptq-ct") for f in gptq_formats(g)] if g["enabled"] else []
        for d in dirs + bnb_modes:
            check_output_dir(out / d, force, inputs)
    return src


# what a killed step leaves in OUT: staging directories and half-written files under hidden names
_STALE = re.compile(r"^\..+\.(partial|old)-[^/]*$|^\..+\.partial$")


@contextmanager
def claim(out: Path) -> Iterator[None]:
    """Hold OUT for this run: one `quantkit run` at a time per OUT (an exclusive lock), and what
    killed runs left there (hidden staging directories, temporary files) is removed first."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".pipeline.lock", "a")
    except OSError as e:
        raise OutputError(f"cannot be created ({e.strerror or e})", out) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError("another `quantkit run` is writing here; wait for it or stop it", out) from None
        for p in out.iterdir():
            if _STALE.match(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        yield


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _human(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def summary(plan: Plan, status: dict[str, str], manifest: Manifest) -> list[str]:
    """The table printed at the end: every artifact, its size and where it is."""
    rows = []
    for s in plan.steps:
        state = {"ran": f"ran ({manifest.steps[s.name]['seconds']:.1f} s)", "done": "done before"}[status[s.name]]
        for o in s.outputs:
            files = sorted(o.glob("*.gguf")) if s.name == "gguf" else \
                [o / "report.md"] if s.name == "bench" else [o]
            rows += [(s.name, state, _size(f), _shown(f) + ("/" if f.is_dir() else "")) for f in files]
    w = max(len(r[1]) for r in rows)
    lines = [f"{'step':7} {'':{w}} {'size':>10}  artifact"]
    lines += [f"{n:7} {st:{w}} {_human(sz):>10}  {where}" for n, st, sz, where in rows]
    lines.append(f"manifest: {_shown(plan.out / 'pipeline.json')}")
    return lines


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter to read), else whole."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _model_name(model_dir: Path) -> str:
    import gguf
    return gguf.Metadata.load(None, model_dir, None, 0).name or model_dir.name


def check_disk(plan: Plan, manifest: Manifest) -> tuple[int, int]:
    """(bytes the steps still to run need, bytes free where OUT lives); require_disk refuses when short."""
    need = sum(s.expected_bytes for s in plan.steps if manifest.why_not_done(s) is not None)
    return need, shutil.disk_usage(existing_ancestor(plan.out)).free


def describe(plan: Plan, manifest: Manifest) -> list[str]:
    """The --dry-run listing: each step, whether it will run (and why), its outputs and sizes."""
    lines = []
    for i, s in enumerate(plan.steps, 1):
        why = manifest.why_not_done(s)
        state = "done, will be skipped" if why is None else f"will run ({why})"
        lines.append(f"[{i}/{len(plan.steps)}] {s.name:6} {state}")
        for o in s.outputs:
            lines.append(f"        {o}  (~{s.expected_bytes / len(s.outputs) / 2**20:,.0f} MiB)")
    need, free = check_disk(plan, manifest)
    lines.append(f"disk: ~{_human(need)} to write, {_human(free)} free in {plan.out}")
    return lines


def require_disk(plan: Plan, manifest: Manifest) -> None:
    need, free = check_disk(plan, manifest)
    if need > free:
        raise OutputError(f"not enough disk space: the steps still to run need ~{_human(need)}, "
                          f"{_human(free)} is free", plan.out)
