"""Benchmark: WikiText-2 perplexity, ours beside llama.cpp's own llama-perplexity, in the same run.

Times (a) our transformers scoring of the bf16 baseline (batched windows; the figure the GPU target
is about), (b) our llama.cpp scoring of a GGUF of the same weights through llama-cpp-python, and
(c) llama-perplexity on that GGUF, when its binary is given, with the same context and number of
windows. All three perplexities are recorded: (b) and (c) differ only where the HF and llama.cpp
tokenizers split a line differently. Results: bench/results/ppl_speed-<model>-<device>-<date>.json.

    python -m quantkit.bench.ppl_speed --limit-chunks 40                      # SmolLM2 on this machine
    python -m quantkit.bench.ppl_speed --baseline ./Llama-3.1-8B --gguf ./Llama-3.1-8B-BF16.gguf \\
        --llama-perplexity ./llama.cpp/build/bin/llama-perplexity --device cuda
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import tempfile
import time
from pathlib import Path

from quantkit.bench.proc import machine, save_result


def llama_perplexity(binary: Path, gguf: Path, text: Path, ctx: int, chunks: int | None, device: str) -> dict:
    cmd = [str(binary), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-b", str(ctx),
           "-ngl", "99" if device != "cpu" else "0"]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", r.stdout + r.stderr)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"llama-perplexity failed:\n{(r.stderr or r.stdout)[-2000:]}")
    return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)), "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="bf16 HF model directory (default: the bundled SmolLM2)")
    ap.add_argument("--gguf", type=Path, help="a GGUF of the same weights (default: our f16 export of it)")
    ap.add_argument("--llama-perplexity", type=Path, help="llama.cpp's llama-perplexity binary, if built")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--limit-chunks", type=int, default=None)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)

    import torch

    from quantkit.bench import backends, evaluate, scoring
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if a.baseline is None:
        from quantkit.default_model import build_default_model
        a.baseline = build_default_model()
    text = evaluate.default_text()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = a.gguf
        if gguf is None:
            from quantkit.export import export_gguf
            from quantkit.plan import VARIANTS
            gguf = export_gguf(a.baseline, [VARIANTS["f16"]], Path(tmp), progress=False).files["f16"]
        tokens, bos = evaluate.tokenize(a.baseline, text.read_text(encoding="utf-8"))
        windows = scoring.plan_windows(tokens, a.ctx, bos, a.limit_chunks)

        hf = backends.TransformersBackend(a.baseline, device)
        base = evaluate.score_baseline(hf, windows, k=1, progress=False)     # perplexity only
        hf.close()
        ours_hf = {**scoring.perplexity(base.nll), "seconds": round(base.seconds, 3),
                   "tokens_per_s": round(windows.n_chunks * a.ctx / base.seconds, 1), "backend": "transformers"}
        lc = backends.LlamaCppBackend(gguf, a.ctx, device)
        t0 = time.perf_counter()
        r = evaluate.score_variant(lc, windows, base, progress=False)
        lc.close()
        ours_gguf = {"ppl": r["ppl"], "ppl_err": r["ppl_err"], "seconds": round(time.perf_counter() - t0, 3),
                     "backend": "llama-cpp-python"}
        result = {"benchmark": "ppl_speed", "date": dt.date.today().isoformat(), "machine": machine(),
                  "model": str(a.baseline), "gguf": str(gguf), "ctx": a.ctx, "chunks": windows.n_chunks,
                  "tokens": windows.n_chunks * a.ctx, "device": device,
                  "quantkit_transformers_bf16": ours_hf, "quantkit_llama_cpp_gguf": ours_gguf}
        if a.llama_perplexity:
            ref = llama_perplexity(a.llama_perplexity, gguf, text, a.ctx, a.limit_chunks, device)
            result["llama_perplexity"] = ref
            result["speedup_vs_llama_perplexity"] = round(ref["seconds"] / ours_hf["seconds"], 2)
            result["ppl_rel_diff_gguf_vs_llama_perplexity"] = round(ours_gguf["ppl"] / ref["ppl"] - 1, 6)
    save_result("ppl_speed", f"{Path(a.baseline).name}-{device}", result)
    return result


if __name__ == "__main__":
    main()
