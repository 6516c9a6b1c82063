"""`quantkit run pipeline.toml`: merge → (imatrix →) GGUF → GPTQ → INT8 / NF4 → bench, resumable.

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
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import OutputError, QuantkitError
from .hfmodel import HFModel
from .manifest import Manifest, Step
from .outputs import check_creatable, existing_ancestor, inside_input, staged_output
from .pipeline_config import Pipeline


@dataclass
class Plan:
    steps: list[Step]
    out: Path
    model_dir: Path            # what every export reads: OUT/merged or the base


def build(cfg: Pipeline, device: str, *, progress: bool = True) -> Plan:
    """The steps of `cfg`; `device` is resolved by the caller (cpu, cuda, cuda:N)."""
    inp, out_cfg = cfg["input"], cfg["output"]
    out = Path(out_cfg["dir"])
    base = Path(inp["base"])
    base_model = HFModel(base)                         # checks the base now: a clear error before any step
    check_inputs(cfg, base_model, device)
    n = base_model.n_params()
    steps: list[Step] = []
    merged = bool(inp["lora"] or inp["residual"])
    model_dir = out / "merged" if merged else base

    if merged:
        def do_merge():
            from .merge import open_model, write_merged
            src = open_model(base, inp["lora"], inp["lora_weights"], inp["residual"] or None, inp["residual_scale"],
                             device=device, ignore_base_name=inp["ignore_base_name"])
            write_merged(src, out / "merged", progress=progress, force=True)
        steps.append(Step("merge", [base, *_merged_in(inp)],
                          {"lora_weights": inp["lora_weights"], "residual_scale": inp["residual_scale"]},
                          [out / "merged"], do_merge, expected_bytes=2 * n))

    types, gg = cfg["gguf"]["types"], cfg["gguf"]
    imatrix = None
    if types and gg["imatrix"] == "auto":
        imatrix = out / "imatrix" / "imatrix.gguf"
        g = cfg["gptq"]

        def do_imatrix():
            from . import imatrix as imx
            with staged_output(out / "imatrix", True, [model_dir]) as tmp:
                im = imx.collect(model_dir, calib=Path(g["calib"]) if g["calib"] else None,
                                 n_samples=gg["imatrix_samples"], seqlen=gg["imatrix_seqlen"], device=device,
                                 progress=progress)
                imx.write(im, tmp / "imatrix.gguf")
        steps.append(Step("imatrix", [model_dir] + ([Path(g["calib"])] if g["calib"] else []),
                          {"samples": gg["imatrix_samples"], "seqlen": gg["imatrix_seqlen"], "calib": g["calib"]},
                          [out / "imatrix"], do_imatrix, expected_bytes=1 << 20))
    elif types and gg["imatrix"]:
        imatrix = Path(gg["imatrix"])
    if types:
        from .plan import parse_variants
        variants = parse_variants(",".join(types))

        def do_gguf():
            from .export import export_gguf
            from .ollama import write_modelfiles
            with staged_output(out / "gguf", True, [model_dir]) as tmp:
                # general.* from the base, as `export --lora` has them (OUT/merged would give "Merged")
                res = export_gguf(model_dir, variants, tmp, name_from=base if merged else None, device=device,
                                  progress=progress, imatrix=imatrix)
                if gg["ollama"]:
                    write_modelfiles(model_dir, res.files)
        steps.append(Step("gguf", [model_dir] + ([imatrix] if imatrix else []), dict(gg), [out / "gguf"], do_gguf,
                          expected_bytes=int(sum(n * v.bpw / 8 for v in variants))))

    variants_for_bench: list[Path] = []
    g = cfg["gptq"]
    if g["enabled"]:
        def do_gptq():
            from .gptq import GPTQSettings, calibration_size, quantize, write
            n_samples, seqlen = calibration_size(g["calib_samples"], g["calib_seqlen"], device)
            s = GPTQSettings(bits=g["bits"], group_size=g["group_size"], sym=g["sym"], act_order=g["desc_act"],
                             damp=g["damp"], calib=Path(g["calib"]) if g["calib"] else None,
                             n_samples=n_samples, seqlen=seqlen)
            model, result = quantize(model_dir, s, device, progress=progress)
            write(model, result, s, model_dir, out, force=True)
        steps.append(Step("gptq", [model_dir] + ([Path(g["calib"])] if g["calib"] else []), dict(g),
                          [out / "gptq", out / "gptq-ct"], do_gptq, expected_bytes=int(2 * n * (g["bits"] / 8 + 0.1))))
        variants_for_bench.append(out / "gptq-ct")

    for mode, frac in (("int8", 1.1), ("nf4", 0.6)):
        if cfg["bnb"][mode]:
            def do_bnb(mode=mode):
                from . import bnb
                bnb.export(model_dir, out / mode, mode, device=device, force=True)
            steps.append(Step(mode, [model_dir], {"mode": mode}, [out / mode], do_bnb, expected_bytes=int(n * frac)))
            variants_for_bench.append(out / mode)

    b = cfg["bench"]
    if b["enabled"]:
        def do_bench():
            from .bench import suite, vram
            ggufs = sorted((out / "gguf").glob("*.gguf")) if types else []
            gpus = vram.parse_gpus(b["gpus"] or None, [], None)
            with staged_output(out / "report", True, [model_dir]) as tmp:
                suite.run(model_dir, ggufs + variants_for_bench, tmp, text=Path(b["text"]) if b["text"] else None,
                          ctx=b["ctx"], device=device, limit_chunks=b["limit_chunks"] or None, gpus=gpus,
                          progress=progress, name=_model_name(base) + (" + " + ", ".join(
                              Path(a).name for a in inp["lora"] + ([inp["residual"]] if inp["residual"] else []))
                              if merged else ""))
        inputs = [model_dir] + ([out / "gguf"] if types else []) + variants_for_bench + \
            ([Path(b["text"])] if b["text"] else [])
        steps.append(Step("bench", inputs, dict(b), [out / "report"], do_bench, expected_bytes=1 << 20))
    return Plan(steps, out, model_dir)


def _merged_in(inp: dict) -> list[Path]:
    """The adapters and the residual of [input] that are merged into the base."""
    return [*map(Path, inp["lora"])] + ([Path(inp["residual"])] if inp["residual"] else [])


def check_inputs(cfg: Pipeline, base: HFModel, device: str = "cpu") -> None:
    """Everything that can be checked before a step runs, so a mistake costs seconds, not the
    minutes of the steps before it: adapters and residual against the base, the GGUF plan and the
    tokenizer, GPTQ's shapes and calibration text, the evaluation text, the GPU names, and OUT.
    (NaN/Inf in the weights shows only when they are read: the step reading them stops.)"""
    inp, out = cfg["input"], Path(cfg["output"]["dir"])
    src = inside_input(out, [base.path, *_merged_in(inp)])
    if src is not None:
        raise cfg.error("output", "dir", f"the output directory {out} is inside the input {src}: "
                        "choose a directory of its own")
    if inp["lora"] or inp["residual"]:
        from .merge import open_model
        open_model(base.path, inp["lora"], inp["lora_weights"], inp["residual"] or None, inp["residual_scale"],
                   ignore_base_name=inp["ignore_base_name"])
    if cfg["gguf"]["types"]:
        from .export import check
        from .plan import parse_variants
        try:
            variants = parse_variants(",".join(cfg["gguf"]["types"]))
        except QuantkitError as e:
            raise cfg.error("gguf", "types", str(e)) from None
        imatrix = cfg["gguf"]["imatrix"]
        check(base, variants, Path(imatrix) if imatrix not in ("", "auto") else None)
    g = cfg["gptq"]
    if g["enabled"]:
        from .gptq import GPTQSettings, check_shapes
        check_shapes(base, GPTQSettings(bits=g["bits"], group_size=g["group_size"]))
        if g["calib"]:
            from .gptq import calibration_size
            from .layerwise import text_tokens
            text_tokens(base.path, Path(g["calib"]), *calibration_size(g["calib_samples"], g["calib_seqlen"], device))
    b = cfg["bench"]
    if b["enabled"]:
        from .bench import suite, vram
        suite.check_extras(gguf=bool(cfg["gguf"]["types"]))
        try:
            vram.parse_gpus(b["gpus"] or None, [], None)
        except ValueError as e:
            raise cfg.error("bench", "gpus", str(e)) from None
        suite.load_text(base.path, Path(b["text"]) if b["text"] else None, b["ctx"], b["limit_chunks"] or None)
    check_creatable(out)


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
