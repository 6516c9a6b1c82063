"""Benchmark: quantkit's one-pass export vs llama.cpp's convert_hf_to_gguf.py + llama-quantize ×3.

Both flows run on the same input in the same run, each step in a fresh subprocess (wall time and
peak RSS from wait4; quantkit's peak GPU memory from its --stats file), and the outputs are
compared as whole files by sha256 (tensor by tensor where they differ, unless --low-disk deleted them). Results go to
bench/results/export_speed-<input>-<date>.json.

    python -m quantkit.bench.export_speed                       # SmolLM2-135M (the bundled model)
    python -m quantkit.bench.export_speed --input llama3-8b     # synthetic Llama-3.1-8B shape
    python -m quantkit.bench.export_speed --input llama3-8b --layers 2   # its embeddings + 2 layers
    python -m quantkit.bench.export_speed --input qwen3-8b --device cuda   # on a GPU machine
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from quantkit.bench.proc import machine, run, save_result
from quantkit.families import presets
from quantkit.outputs import sha256_file

VARIANTS = ["q8_0", "q5_k_m", "q4_k_m"]


def prepare_input(name: str, work: Path, layers: int | None = None) -> Path:
    """The input checkpoint, made in a subprocess: Linux carries a process's peak RSS over fork and
    exec into its children, so a parent that had generated 8B of random weights itself would
    report its own peak for every step timed after."""
    if name == "smollm2":
        cmd = [sys.executable, "-m", "quantkit", "default-model"]
        return Path(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())
    from quantkit.testing.synthetic import preset_tokenizer, tokenizer_dir
    tok = tokenizer_dir(preset_tokenizer(name))
    cmd = [sys.executable, "-m", "quantkit.testing.synthetic", "checkpoint", name, str(work / name), "--tokenizer", str(tok)]
    subprocess.run(cmd + (["--layers", str(layers)] if layers else []), check=True, stdout=subprocess.DEVNULL)
    return work / name


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="smollm2", choices=["smollm2", *sorted(presets())])
    ap.add_argument("--device", default="auto", help="quantkit --device (auto, cpu, cuda)")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=None, help="synthetic inputs: keep only this many layers")
    ap.add_argument("--skip-reference", action="store_true", help="time quantkit only")
    ap.add_argument("--low-disk", action="store_true",
                    help="delete each output once hashed (a full 8B run then peaks at input + bf16 GGUF + one file)")
    ap.add_argument("--types", default=",".join(VARIANTS), help="comma-separated GGUF variants (default: all three)")
    a = ap.parse_args(argv)
    variants = [v.strip() for v in a.types.split(",") if v.strip()]

    from quantkit.bench.gguf_diff import compare
    from quantkit.testing.llamacpp_ref import llamacpp_src

    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        work = Path(tmp)
        model = prepare_input(a.input, work, a.layers)
        ours = run([sys.executable, "-m", "quantkit", "export", str(model), "--gguf", ",".join(variants),
                    "-o", str(work / "ours"), "--device", a.device, "--stats", str(work / "stats.json"), "-q"])
        print(f"quantkit: {ours['seconds']} s, peak RSS {ours['peak_rss_mib']} MiB "
              f"({(work / 'stats.json').read_text().strip()})", flush=True)   # in the log even if cut short
        ours_files = json.loads((work / "ours" / "export.json").read_text())["files"]
        ours_sha = {v: sha256_file(work / "ours" / ours_files[v]["path"]) for v in variants}
        if a.low_disk:
            shutil.rmtree(work / "ours")
        result = {
            "benchmark": "export_speed", "date": dt.date.today().isoformat(), "machine": machine(),
            "input": {"name": a.input, "layers": a.layers, "path": str(model),
                      "bytes": sum(p.stat().st_size for p in model.glob("*.safetensors"))},
            "quantkit": {**ours, "export": json.loads((work / "stats.json").read_text()), "variants": variants},
        }
        if not a.skip_reference:
            src = llamacpp_src()
            if src is None:
                raise SystemExit("llama.cpp sources not found: run `make install-test`")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src / "gguf-py"), os.environ.get("PYTHONPATH")])),
                       HF_HUB_OFFLINE="1")
            ref = {"convert_bf16": run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model),
                                        "--outtype", "bf16", "--outfile", str(work / "ref-bf16.gguf")], env)}
            for v in variants:
                # llama_model_quantize is llama-quantize's whole job; nthread 0 = every core
                ref[f"quantize_{v}"] = run([sys.executable, "-c",
                                            "import sys; from pathlib import Path; from quantkit.testing.llamacpp_ref import llama_quantize; "
                                            "llama_quantize(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])",
                                            str(work / "ref-bf16.gguf"), str(work / f"ref-{v}.gguf"), v])
                steps = ", ".join(f"{k} {r['seconds']} s" for k, r in ref.items())
                print(f"llama.cpp: {steps}", flush=True)
                ref_sha = sha256_file(work / f"ref-{v}.gguf")
                mine, theirs = work / "ours" / ours_files[v]["path"], work / f"ref-{v}.gguf"
                same = ref_sha == ours_sha[v]
                result.setdefault("identical", {})[v] = {"whole_file_sha256": same, **(
                    {} if same or a.low_disk else compare(mine, theirs))}
                if a.low_disk:
                    theirs.unlink()
            total = sum(r["seconds"] for r in ref.values())
            result["llama_cpp"] = {"steps": ref, "seconds": round(total, 3),
                                   "peak_rss_mib": max(r["peak_rss_mib"] for r in ref.values()),
                                   "threads": os.cpu_count(), "library": llama_cpp_build()}
            result["speedup"] = round(total / ours["seconds"], 2)
    device = result["quantkit"]["export"]["device"]
    tag = a.input + (f"-{a.layers}layers" if a.layers else "") + ("" if variants == VARIANTS else "-" + "-".join(variants)) + ("" if device == "cpu" else f"-{device.split(':')[0]}")
    save_result("export_speed", tag, result)
    return result


def llama_cpp_build() -> dict:
    """Which llama.cpp did the reference run: the version and ggml's CPU features."""
    try:
        import llama_cpp
        return {"llama_cpp_python": llama_cpp.__version__,
                "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}
    except Exception as e:  # the reference ran in its own process; this is only a label
        return {"error": str(e)}


if __name__ == "__main__":
    main()
