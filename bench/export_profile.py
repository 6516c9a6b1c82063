"""Profile of the GGUF export, stage by stage, on the device it runs on: where the time goes.

    read      pread of the input as stored, as the reader thread does (MB/s)
    h2d, d2h  pinned host <-> GPU copies (GB/s; CUDA only)
    quantize  each quant type's kernel on float32 rows, at several kernel chunk sizes (Mvalues/s)
    write     appending to a file in the work dir, as the writer thread does (MB/s)
    ops       torch.profiler's top operators for one chunk of each K-quant type

From the rates and the export plan of the input it predicts the export's time: the sum of the
stages (nothing overlapped) and the slowest stage (everything overlapped), next to a measured
export of the same input. Results go to bench/results/export_profile-<input>-<device>-<date>.json.

    python -m quantkit.bench.export_profile                                    # SmolLM2, CPU
    python -m quantkit.bench.export_profile --input llama3-8b --layers 2
    python -m quantkit.bench.export_profile --input llama3-8b --device cuda --no-export
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from quantkit.bench.export_speed import prepare_input
from quantkit.bench.proc import machine, run, save_result
from quantkit.families import presets

VARIANTS = "q8_0,q5_k_m,q4_k_m"
READ_BYTES = 2 << 30        # read rate: on this much of the input at most


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev: torch.device, reps: int) -> float:
    fn()                                    # warm-up: allocations, lazy module loads
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / reps


def read_rate(model) -> dict:
    """pread of whole tensors as stored, as the export's reader does, up to READ_BYTES."""
    done, t0 = 0, time.perf_counter()
    for name, ref in model.tensors.items():
        model.read(name)
        done += ref.nbytes
        if done >= READ_BYTES:
            break
    sec = time.perf_counter() - t0
    return {"bytes": done, "seconds": round(sec, 3), "mb_per_s": round(done / sec / 1e6, 1)}


def copy_rates(dev: torch.device, nbytes: int = 256 << 20) -> dict:
    if dev.type != "cuda":
        return {}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    h2d = _timed(lambda: gpu.copy_(host, non_blocking=True), dev, 10)
    d2h = _timed(lambda: host.copy_(gpu, non_blocking=True), dev, 10)
    return {"h2d_gb_per_s": round(nbytes / h2d / 1e9, 2), "d2h_gb_per_s": round(nbytes / d2h / 1e9, 2)}


def write_rate(work: Path, nbytes: int = 1 << 30) -> dict:
    import numpy as np
    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)
    path = work / "write-probe"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // block.nbytes):
            block.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    sec = time.perf_counter() - t0
    path.unlink()
    return {"bytes": nbytes, "seconds": round(sec, 3), "mb_per_s": round(nbytes / sec / 1e6, 1),
            "note": "fsynced: the export fsyncs each file once, at its end"}


def kernel_rates(dev: torch.device, chunk_sizes: list[int], values: int) -> dict:
    """Mvalues/s of quantize_rows per type and kernel chunk size (registry.CHUNK_VALUES for the device)."""
    from quantkit.kernels import backends
    from quantkit.kernels import registry as qreg
    x = (torch.randn(values // 4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(dev)
    out: dict = {}
    saved = dict(qreg.CHUNK_VALUES)
    # on a GPU, Q8_0 and the K-quants also without the whole-block kernels (the torch code around the
    # compiled searches), to see what the blocks are worth there
    variants = [(q, True) for q in ("q8_0", "q4_k", "q5_k", "q6_k", "q5_0", "bf16")]
    if dev.type == "cuda":
        variants += [(q, False) for q in ("q8_0", "q4_k", "q5_k", "q6_k")]
    try:
        for qtype, blocks in variants:
            qt = qreg.get(qtype)
            key = qtype if blocks else f"{qtype} (no whole-block kernel)"
            out[key] = {}
            on = backends.enabled() if blocks else {b for b in backends.enabled() if not b.endswith("-blocks")}
            with backends.only(*on):
                for cv in chunk_sizes:
                    qreg.CHUNK_VALUES[dev.type] = cv
                    sec = _timed(lambda: qreg.quantize_rows(x, qt), dev, 2 if dev.type == "cpu" else 5)
                    out[key][str(cv)] = round(x.numel() / sec / 1e6, 1)
    finally:
        qreg.CHUNK_VALUES.clear()
        qreg.CHUNK_VALUES.update(saved)
    return out


def top_ops(dev: torch.device, values: int, rows: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from quantkit.kernels import registry as qreg
    x = (torch.randn(values // 4096, 4096, generator=torch.Generator().manual_seed(1)) * 0.02).to(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for qtype in ("q4_k", "q6_k"):
        qreg.quantize_rows(x, qreg.get(qtype))
        _sync(dev)
        with profile(activities=acts) as prof:
            qreg.quantize_rows(x, qreg.get(qtype))
            _sync(dev)
        tables[qtype] = prof.key_averages().table(sort_by=key, row_limit=rows).splitlines()
    return tables


def plan_values(model) -> dict:
    """Values quantized per type by one export of VARIANTS (a type shared by variants for the
    same tensor counts once, as the export shares it), and the bytes written."""
    from quantkit.export import prepare
    from quantkit.plan import parse_variants, variant_nbytes
    variants = parse_variants(VARIANTS)
    *_, plans = prepare(model, variants)
    values: dict[str, int] = {}
    for p in plans:
        n = math.prod(p.tensor.shape)
        for q in {p.choices[v.name].qtype for v in variants}:
            values[q] = values.get(q, 0) + n
    written = sum(variant_nbytes(plans, v) for v in variants)
    return {"values": values, "bytes_written": written, "bytes_read": model.total_bytes()}


def predict(plan: dict, rates: dict) -> dict:
    best = {q: max(r.values()) * 1e6 for q, r in rates["quantize"].items()}
    stages = {"read": plan["bytes_read"] / (rates["read"]["mb_per_s"] * 1e6),
              "quantize": sum(v / best[q] for q, v in plan["values"].items() if q in best),
              "write": plan["bytes_written"] / (rates["write"]["mb_per_s"] * 1e6)}
    if rates.get("copies"):
        stages["h2d"] = plan["bytes_read"] / (rates["copies"]["h2d_gb_per_s"] * 1e9)
        stages["d2h"] = plan["bytes_written"] / (rates["copies"]["d2h_gb_per_s"] * 1e9)
    return {"stages_s": {k: round(v, 2) for k, v in stages.items()},
            "sum_s": round(sum(stages.values()), 2), "slowest_stage_s": round(max(stages.values()), 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="smollm2", choices=["smollm2", *sorted(presets())])
    ap.add_argument("--layers", type=int, default=None, help="synthetic inputs: keep only this many layers")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--no-export", action="store_true", help="skip the measured export")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    cpu = dev.type == "cpu"
    chunk_sizes = [1 << 16, 1 << 18, 1 << 20] if cpu else [1 << 22, 1 << 24, 1 << 26]
    values = 1 << 20 if cpu else 1 << 26

    from quantkit.hfmodel import HFModel
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = Path(tmp)
        model = HFModel(prepare_input(a.input, work, a.layers))
        measured = None
        if not a.no_export:     # first: a child inherits the peak RSS this process reaches below
            stats = work / "stats.json"
            measured = run([sys.executable, "-m", "quantkit", "export", str(model.path), "--gguf", VARIANTS,
                            "-o", str(work / "out"), "--device", str(dev), "--stats", str(stats), "-q"])
            measured["stats"] = json.loads(stats.read_text())
            shutil.rmtree(work / "out")
        rates = {"read": read_rate(model), "copies": copy_rates(dev), "write": write_rate(work),
                 "quantize": kernel_rates(dev, chunk_sizes, values)}
        plan = plan_values(model)
        result = {"benchmark": "export_profile", "date": dt.date.today().isoformat(), "machine": machine(),
                  "device": str(dev), "input": {"name": a.input, "layers": a.layers},
                  "rates": rates, "plan": plan, "predicted": predict(plan, rates),
                  "top_ops": top_ops(dev, values)}
        if measured:
            result["export"] = measured
    tag = a.input + (f"-{a.layers}layers" if a.layers else "") + f"-{dev.type}"
    save_result("export_profile", tag, result)
    print(_summary(result))
    return result


def _summary(r: dict) -> str:
    lines = [f"read {r['rates']['read']['mb_per_s']} MB/s, write {r['rates']['write']['mb_per_s']} MB/s"
             + (f", h2d {r['rates']['copies']['h2d_gb_per_s']} GB/s, d2h {r['rates']['copies']['d2h_gb_per_s']} GB/s"
                if r["rates"]["copies"] else "")]
    for q, by_chunk in r["rates"]["quantize"].items():
        lines.append(f"{q:6} " + "  ".join(f"chunk {int(c):>9,}: {v:8.1f} Mval/s" for c, v in by_chunk.items()))
    p = r["predicted"]
    lines.append(f"predicted: {p['stages_s']}; sum {p['sum_s']} s, slowest stage {p['slowest_stage_s']} s")
    if "export" in r:
        lines.append(f"measured export: {r['export']['seconds']} s, peak RSS {r['export']['peak_rss_mib']} MiB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
