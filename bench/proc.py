"""Timing commands for the benchmarks: wall time and peak RSS of a fresh process, and the machine."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; its wall time and peak RSS (of it and its children).

    Run the benchmark's own heavy preparation in subprocesses too: Linux carries a process's peak
    RSS over fork and exec into its children, so a parent that had held 8B of weights would report
    its own peak for every command timed after."""
    # stderr goes to a file, not a pipe: llama-quantize logs every tensor, and a pipe nobody
    # reads until the end fills up and blocks the child
    with tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
    return {"seconds": round(wall, 3), "peak_rss_mib": round(ru.ru_maxrss / 1024, 1)}


def machine() -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def save_result(benchmark: str, tag: str, result: dict) -> Path:
    """bench/results/<benchmark>-<tag>-<date>.json, and the result on stdout."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{benchmark}-{tag}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written {out}")
    return out
