"""Benchmark: the same sweep run by `quantkit run` one pipeline after the other, and by `quantkit run
--ray` on a Ray cluster started on this machine (its CPUs as one node).

The sweep: N models (random checkpoints of SmolLM2's shape shrunk to --hidden / --layers, with its
real tokenizer, other seeds) × 3 GGUF types + the bench (--limit-chunks windows of 128 tokens). Each
run starts from empty output directories and an empty baseline cache (QUANTKIT_CACHE), in a fresh
process. Reported: both wall times and their ratio; per task, the wall time the driver saw (queued to
recorded) and the step's own time on its worker, whose difference is what a task costs beyond its
work (waiting for a CPU, a fresh worker process, the plan's checks, recording); and the round trip of
an empty Ray task, Ray's own cost.

Run it where Ray binds only loopback (a network namespace of its own), as the tests do:

    unshare --net sh -c 'ip link set lo up && python -m quantkit.bench.cluster_speed'

Results go to bench/results/cluster_speed-<tag>-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantkit.bench.proc import machine, save_result

TYPES = ["q8_0", "q4_k_m", "q5_k_m"]
ROW = re.compile(r"^(\S+):(\w+)\s+done\s+([\d.]+) s\s+([\d.]+) s\s+(\d+)\s", re.M)


def models(where: Path, n: int, hidden: int, layers: int) -> list[Path]:
    from quantkit.default_model import build_default_model
    from quantkit.testing import synthetic
    src = build_default_model()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
               head_dim=hidden // 4, num_hidden_layers=layers)
    out = []
    for i in range(n):
        d = synthetic.write_checkpoint(where / f"model-{i}", cfg, seed=i)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            shutil.copyfile(src / f, d / f)
        out.append(d)
    return out


def pipelines(bases: list[Path], where: Path, limit_chunks: int) -> list[Path]:
    where.mkdir(parents=True, exist_ok=True)
    files = []
    for i, base in enumerate(bases):
        p = where / f"model-{i}.toml"
        p.write_text(f'[input]\nbase = "{base}"\n[output]\ndir = "out-{i}"\ndevice = "cpu"\n[gguf]\n'
                     f'types = {json.dumps(TYPES)}\n[bench]\nlimit_chunks = {limit_chunks}\nctx = 128\n'
                     '[cluster]\ncpus_per_step = 1\n')
        files.append(p)
    return files


def timed(cmd: list[str], cache: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1",
                                                                     QUANTKIT_CACHE=str(cache)))
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout


def empty_task_round_trip(n: int = 50) -> dict:
    """An empty task's submit-to-result time on a fresh local Ray (after one warm-up)."""
    import ray
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        @ray.remote(num_cpus=1)
        def nothing():
            return 0
        ray.get(nothing.remote())
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            ray.get(nothing.remote())
            times.append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
    return {"median_ms": round(1e3 * statistics.median(times), 2), "max_ms": round(1e3 * max(times), 2), "n": n}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--limit-chunks", type=int, default=1)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cluster-speed-") as tmp:
        tmp = Path(tmp)
        bases = models(tmp / "models", a.models, a.hidden, a.layers)
        quantkit = [sys.executable, "-m", "quantkit", "run", "-q"]
        seq_s, _ = timed(quantkit + list(map(str, pipelines(bases, tmp / "seq", a.limit_chunks))), tmp / "cache-seq")
        ray_s, out = timed(quantkit + list(map(str, pipelines(bases, tmp / "ray", a.limit_chunks))) + ["--ray"],
                           tmp / "cache-ray")
        same = all((tmp / "seq" / f"out-{i}" / "gguf" / f.name).read_bytes() == f.read_bytes()
                   for i in range(a.models) for f in (tmp / "ray" / f"out-{i}" / "gguf").glob("*.gguf"))
    tasks = [{"task": f"{m}:{s}", "wall_s": float(w), "in_step_s": float(i), "attempts": int(n)}
             for m, s, w, i, n in ROW.findall(out)]
    extra = [t["wall_s"] - t["in_step_s"] for t in tasks]
    result = {
        "benchmark": "cluster_speed", "date": dt.date.today().isoformat(), "machine": machine(),
        "sweep": {"models": a.models, "hidden": a.hidden, "layers": a.layers, "gguf_types": TYPES,
                  "bench_windows": a.limit_chunks, "ctx": 128},
        "sequential_s": round(seq_s, 2), "ray_s": round(ray_s, 2), "ray_over_sequential": round(ray_s / seq_s, 3),
        "ggufs_identical": same, "tasks": tasks,
        "per_task_beyond_the_step_s": {"mean": round(statistics.mean(extra), 2), "max": round(max(extra), 2)},
        "empty_task_round_trip": empty_task_round_trip(),
        "note": "Ray's wall time includes starting Ray here (a few seconds); each step runs in a fresh worker "
                "process (max_calls=1: a step's memory goes back when it ends), which imports torch and "
                "quantkit and rebuilds the plan's checks: that, not Ray's scheduling, is most of the cost "
                "beyond the step.",
    }
    save_result("cluster_speed", f"{a.models}x-h{a.hidden}-l{a.layers}", result)
    return result


if __name__ == "__main__":
    main()
