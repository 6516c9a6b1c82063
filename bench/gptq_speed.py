"""Benchmark: time and peak memory of `quantkit export --gptq` on a synthetic 8B-shaped model.

A Llama-3.1-8B-shaped (or Qwen3-8B-shaped) bf16 checkpoint with random weights, and random token
ids as calibration (128 samples x 2048 tokens by default, the GPTQ paper's setting): the timing
of GPTQ does not depend on what the tokens say. The run happens in a fresh process, which reports
its wall time, peak RSS and (on CUDA) peak GPU memory; the packed checkpoint is written too.
Target (issue 6): <= 10 minutes on one H100 with <= 24 GB of GPU memory.

    python -m quantkit.bench.gptq_speed                          # 8B shapes, 128 x 2048, on the GPU
    python -m quantkit.bench.gptq_speed --layers 2 --samples 8 --seqlen 512 --device cpu   # a CPU smoke run

Results go to bench/results/gptq_speed-<preset>[-<n>layers]-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from quantkit.bench.proc import machine, run, save_result
from quantkit.families import presets

# the timed process: quantize with the given tokens, write the AutoGPTQ layout, report GPU peak
QUANTIZE = """
import json, sys, time, torch
from pathlib import Path
from quantkit.gptq import GPTQSettings, quantize, write
model_dir, out, device, samples, seqlen, fmt = sys.argv[1:7]
s = GPTQSettings(group_size=128, formats=(fmt,))
vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
tokens = torch.randint(0, vocab, (int(samples), int(seqlen)), generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
model, result = quantize(Path(model_dir), s, device, progress=False, tokens=tokens)
t1 = time.perf_counter()
write(model, result, s, Path(model_dir), Path(out))
t2 = time.perf_counter()
gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
json.dump({"quantize_s": round(t1 - t0, 2), "write_s": round(t2 - t1, 2), "peak_gpu_mib": gpu,
           "layers_quantized": len(result.layers)}, open(Path(out) / "timing.json", "w"))
"""


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(p for p in presets() if p.endswith("-8b")))
    ap.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    a = ap.parse_args(argv)

    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    py = sys.executable
    from quantkit.testing.synthetic import preset_tokenizer, tokenizer_dir
    tok = tokenizer_dir(preset_tokenizer(a.preset))
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = Path(tmp)
        base = work / "base"
        cmd = [py, "-m", "quantkit.testing.synthetic", "checkpoint", a.preset, str(base), "--tokenizer", str(tok)]
        subprocess.run(cmd + (["--layers", str(a.layers)] if a.layers else []), check=True, stdout=subprocess.DEVNULL)
        out = work / "out"
        out.mkdir()
        timed = run([py, "-c", QUANTIZE, str(base), str(out), device, str(a.samples), str(a.seqlen), "gptq"])
        inner = json.loads((out / "timing.json").read_text())
        cfg = json.loads((base / "config.json").read_text())
        result = {
            "benchmark": "gptq_speed", "date": dt.date.today().isoformat(), "machine": machine(),
            "input": {"preset": a.preset, "layers": cfg["num_hidden_layers"], "samples": a.samples,
                      "seqlen": a.seqlen, "device": device, "bits": 4, "group_size": 128,
                      "base_bytes": sum(p.stat().st_size for p in base.glob("*.safetensors"))},
            "quantkit": {**timed, **inner,
                         "out_bytes": sum(p.stat().st_size for p in (out / "gptq").glob("*.safetensors"))},
            "target": "<= 600 s and <= 24 GiB GPU memory for the full 8B shape on one H100",
        }
    tag = a.preset + (f"-{a.layers}layers" if a.layers else "") + f"-{device}"
    save_result("gptq_speed", tag, result)
    return result


if __name__ == "__main__":
    main()
