"""Benchmark: quantkit's one-pass export vs llama.cpp's convert_hf_to_gguf.py + llama-quantize ×3.

Both flows run on the same input in the same run, each step in a fresh subprocess (wall time and
peak RSS from wait4), and the outputs are compared tensor for tensor. Results go to
bench/results/export_speed-<input>-<date>.json.

    python -m quantkit.bench.export_speed                       # SmolLM2-135M (the bundled model)
    python -m quantkit.bench.export_speed --input llama3-8b     # synthetic Llama-3.1-8B shape
    python -m quantkit.bench.export_speed --input llama3-8b --layers 2   # its embeddings + 2 layers
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from quantkit.bench.proc import machine, run, save_result

VARIANTS = ["q8_0", "q5_k_m", "q4_k_m"]


def prepare_input(name: str, work: Path, layers: int | None = None) -> Path:
    """The input checkpoint, made in a subprocess: Linux carries a process's peak RSS over fork and
    exec into its children, so a parent that had generated 8B of random weights itself would
    report its own peak for every step timed after."""
    if name == "smollm2":
        cmd = [str(Path(sys.executable).with_name("quantkit")), "default-model"]
        return Path(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())
    tok = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizers" / name.split("-")[0]
    cmd = [sys.executable, "-m", "quantkit.bench.synthetic", "checkpoint", name, str(work / name), "--tokenizer", str(tok)]
    subprocess.run(cmd + (["--layers", str(layers)] if layers else []), check=True, stdout=subprocess.DEVNULL)
    return work / name


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="smollm2", choices=["smollm2", "llama3-8b", "qwen3-8b", "llama3-tiny", "qwen3-tiny"])
    ap.add_argument("--device", default="auto", help="quantkit --device (auto, cpu, cuda)")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=None, help="synthetic inputs: keep only this many layers")
    ap.add_argument("--skip-reference", action="store_true", help="time quantkit only")
    a = ap.parse_args(argv)

    from quantkit.bench.gguf_diff import compare
    from quantkit.bench.llamacpp_ref import llamacpp_src

    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = Path(tmp)
        model = prepare_input(a.input, work, a.layers)
        qk = Path(sys.executable).with_name("quantkit")
        ours = run([str(qk), "export", str(model), "--gguf", ",".join(VARIANTS), "-o", str(work / "ours"),
                    "--device", a.device, "-q"])
        ours_files = json.loads((work / "ours" / "export.json").read_text())["files"]
        result = {
            "benchmark": "export_speed", "date": dt.date.today().isoformat(), "machine": machine(),
            "input": {"name": a.input, "layers": a.layers, "path": str(model),
                      "bytes": sum(p.stat().st_size for p in model.glob("*.safetensors"))},
            "quantkit": {**ours, "variants": VARIANTS},
        }
        if not a.skip_reference:
            src = llamacpp_src()
            if src is None:
                raise SystemExit("llama.cpp sources not found: run `make install-test`")
            env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"), HF_HUB_OFFLINE="1")
            ref = {"convert_bf16": run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model),
                                        "--outtype", "bf16", "--outfile", str(work / "ref-bf16.gguf")], env)}
            for v in VARIANTS:
                ref[f"quantize_{v}"] = run([sys.executable, "-c",
                                            "import sys; from pathlib import Path; from quantkit.bench.llamacpp_ref import llama_quantize; "
                                            "llama_quantize(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])",
                                            str(work / "ref-bf16.gguf"), str(work / f"ref-{v}.gguf"), v])
            total = sum(r["seconds"] for r in ref.values())
            result["llama_cpp"] = {"steps": ref, "seconds": round(total, 3),
                                   "peak_rss_mib": max(r["peak_rss_mib"] for r in ref.values()),
                                   "threads": os.cpu_count()}
            result["speedup"] = round(total / ours["seconds"], 2)
            result["identical"] = {v: compare(work / "ours" / ours_files[v]["path"], work / f"ref-{v}.gguf")
                                   for v in VARIANTS}
    tag = a.input + (f"-{a.layers}layers" if a.layers else "")
    save_result("export_speed", tag, result)
    return result


if __name__ == "__main__":
    main()
