"""Benchmark: `quantkit merge` vs peft's merge_and_unload + save_pretrained, same base, same adapter.

A synthetic Llama-3.1-8B-shaped bf16 base (or its embeddings plus --layers layers) and an r=64
LoRA adapter on all seven projections. Each flow runs in a fresh process, timed with its peak RSS,
and the two outputs are compared tensor by tensor in bf16 ulps. Results go to
bench/results/merge_speed-<input>-<date>.json.

    python -m quantkit.bench.merge_speed --layers 4        # embeddings + 4 layers (CPU-sized)
    python -m quantkit.bench.merge_speed                   # the full 8B shape (needs ~40 GB disk)
"""
from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
from pathlib import Path

from quantkit.bench.proc import machine, run, save_result
from quantkit.families import presets


# peft's flow, as its documentation gives it: load the base in bf16, attach the adapter, merge, save
PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map=sys.argv[4])
PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])
"""


def compare(ours: Path, theirs: Path) -> dict:
    """Max and distribution of bf16 ulp differences, streaming one tensor at a time."""
    import torch
    from safetensors import safe_open

    def files(d: Path) -> dict[str, Path]:
        return {k: f for f in sorted(d.glob("*.safetensors")) for k in safe_open(f, "pt").keys()}

    def ordered(x):
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    a, b = files(ours), files(theirs)
    common = sorted(set(a) & set(b))
    worst, n, over = 0, 0, {1: 0, 2: 0}
    for name in common:
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            u = (ordered(fa.get_tensor(name)) - ordered(fb.get_tensor(name))).abs()
        worst = max(worst, int(u.max()))
        n += u.numel()
        for k in over:
            over[k] += int((u >= k).sum())
    return {"tensors": len(common), "only_ours": sorted(set(a) - set(b))[:5], "only_peft": sorted(set(b) - set(a))[:5],
            "max_ulp": worst, "values": n, "values_1_ulp_or_more": over[1], "values_2_ulp_or_more": over[2]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(p for p in presets() if p.endswith("-8b")))
    ap.add_argument("--layers", type=int, default=None, help="keep only this many layers")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--device", default="auto", help="quantkit --device, and peft's device_map (auto: cuda if present)")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--skip-reference", action="store_true", help="time quantkit only")
    a = ap.parse_args(argv)

    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    py = sys.executable
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = Path(tmp)
        base, adapter = work / "base", work / "adapter"
        cmd = [py, "-m", "quantkit.testing.synthetic", "checkpoint", a.preset, str(base)]
        subprocess.run(cmd + (["--layers", str(a.layers)] if a.layers else []), check=True, stdout=subprocess.DEVNULL)
        subprocess.run([py, "-m", "quantkit.testing.synthetic", "adapter", str(base), str(adapter), "--r", str(a.r)],
                       check=True, stdout=subprocess.DEVNULL)
        qk = Path(py).with_name("quantkit")
        ours = run([str(qk), "merge", str(base), "--lora", str(adapter), "-o", str(work / "ours"), "-q",
                    "--device", device])
        result = {
            "benchmark": "merge_speed", "date": dt.date.today().isoformat(), "machine": machine(),
            "input": {"preset": a.preset, "layers": a.layers, "r": a.r, "device": device,
                      "base_bytes": sum(p.stat().st_size for p in base.glob("*.safetensors")),
                      "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size},
            "quantkit": ours,
        }
        if not a.skip_reference:
            peft = run([py, "-c", PEFT_MERGE, str(base), str(adapter), str(work / "peft"), device])
            result["peft"] = peft
            result["speedup"] = round(peft["seconds"] / ours["seconds"], 2)
            result["rss_ratio"] = round(peft["peak_rss_mib"] / ours["peak_rss_mib"], 2)
            result["agreement"] = compare(work / "ours", work / "peft")
    tag = a.preset + (f"-{a.layers}layers" if a.layers else "") + f"-{device}"
    save_result("merge_speed", tag, result)
    return result


if __name__ == "__main__":
    main()
