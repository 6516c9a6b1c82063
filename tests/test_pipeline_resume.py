"""`quantkit run` end to end on SmolLM2-135M-Instruct with a LoRA adapter (issue 7): every artifact
and the report; then the same run SIGKILLed at random moments, at least 10 times, and rerun until
it completes. The outputs must be byte-identical to the uninterrupted run's; after every kill, each
output under its final name is already identical to it (never half-written), pipeline.json parses,
and no step the manifest recorded as finished runs again.

The report's measured speeds (tokens/s, seconds), its date and its cache path are the only bytes
masked: they are measurements of this run, not functions of the inputs. Each run has its own
cache (calibration text, baseline scores), so nothing comes from the uninterrupted run's work.
Set QUANTKIT_KILL_SEED to replay a sequence of kill times.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantkit.testing import synthetic

pytest.importorskip("llama_cpp")
pytest.importorskip("bitsandbytes")

KILLS = 10
ARGS = ["--gguf", "q4_k_m,q5_k_m,q8_0", "--gptq", "--group-size", "64", "--calib-samples", "4",
        "--calib-seqlen", "256", "--int8", "--nf4", "--bench", "--ctx", "256", "--limit-chunks", "4",
        "--gpus", "rtx4090,a100-40", "-q"]
MEASURED = {"seconds", "tokens_per_s", "date", "cache"}


def _env(cache: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "QUANTKIT_CACHE": str(cache)}


def _cmd(base: Path, adapter: Path, out: Path) -> list[str]:
    return [str(Path(sys.executable).with_name("quantkit")), "run", "--base", str(base), "--lora", str(adapter),
            "-o", str(out), *ARGS]


def _drop_measured(x):
    if isinstance(x, dict):
        return {k: _drop_measured(v) for k, v in x.items() if k not in MEASURED}
    if isinstance(x, list):
        return [_drop_measured(v) for v in x]
    return x


def _mask_markdown(text: str) -> str:
    out, drop = [], None
    for line in re.sub(r"\d{4}-\d{2}-\d{2}", "DATE", text).splitlines():
        cells = line.split("|")
        if line.startswith("|") and "Tokens/s" in [c.strip() for c in cells]:
            drop = [c.strip() for c in cells].index("Tokens/s")
        if not line.startswith("|"):
            drop = None
        out.append("|".join(c for i, c in enumerate(cells) if i != drop) if drop is not None else line)
    return "\n".join(out)


def _comparable(rel: str, data: bytes) -> bytes:
    if rel.endswith("report.json"):
        return json.dumps(_drop_measured(json.loads(data)), sort_keys=True).encode()
    if rel.endswith("report.md"):
        return _mask_markdown(data.decode()).encode()
    return data


def _tree(d: Path) -> dict[str, bytes]:
    """Every visible file under d (hidden staging entries and the manifest aside), comparable bytes."""
    files = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and str(rel) != "pipeline.json":
            files[str(rel)] = _comparable(str(rel), p.read_bytes())
    return files


def _recorded(out: Path) -> set[str]:
    p = out / "pipeline.json"
    return set(json.loads(p.read_text())["steps"]) if p.exists() else set()


def _ran(log: str) -> set[str]:
    return set(re.findall(r"^\[\d+/\d+\] (\w+): running", log, re.M))


@pytest.fixture(scope="module")
def reference(smollm2_dir, tmp_path_factory):
    """The uninterrupted run: (adapter, OUT, where OUT was moved, its files, its step seconds, its wall
    time, its summary)."""
    work = tmp_path_factory.mktemp("pipeline-ref")
    adapter = synthetic.write_lora_adapter(smollm2_dir, work / "adapter", r=8)
    out = work / "out"
    t0 = time.perf_counter()
    r = subprocess.run(_cmd(smollm2_dir, adapter, out), env=_env(work / "cache"), capture_output=True, text=True,
                       timeout=1200, cwd=work)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    steps = json.loads((out / "pipeline.json").read_text())["steps"]
    files = _tree(out)
    # the interrupted runs write to the same path (paths are part of the notes and the report)
    ref = out.rename(work / "ref")
    return adapter, out, ref, files, {k: v["seconds"] for k, v in steps.items()}, wall, r.stdout


def test_every_artifact_and_the_report(reference):
    _, out, ref, files, seconds, _, summary = reference
    assert list(seconds) == ["merge", "gguf", "gptq", "int8", "nf4", "bench"]
    for rel in ["merged/model.safetensors", "merged/merge.json", "merged/tokenizer.json", "gptq/model.safetensors",
                "gptq/quantize_config.json", "gptq-ct/model.safetensors", "int8/model.safetensors",
                "nf4/model.safetensors", "report/report.md", "report/report.json", "report/quality.png",
                "report/vram.png"]:
        assert rel in files, rel
    ggufs = sorted(f for f in files if f.startswith("gguf/") and f.endswith(".gguf"))
    assert [g.rsplit("-", 1)[1] for g in ggufs] == ["Q4_K_M.gguf", "Q5_K_M.gguf", "Q8_0.gguf"]
    assert len([f for f in files if f.endswith(".Modelfile")]) == 3
    # the report measured every variant against the merged bf16 model (llama.cpp for the GGUFs,
    # transformers for the rest), and the numbers are sane: 8-bit close to bf16, 4-bit further
    rep = json.loads((ref / "report" / "report.json").read_text())
    assert rep["baseline"]["path"] == str(out / "merged")
    by = {v["label"]: v for v in rep["variants"]}
    assert set(by) == {"Q4_K_M", "Q5_K_M", "Q8_0", "GPTQ 4-bit g64 (CT)", "INT8", "NF4"}, set(by)
    assert by["Q8_0"]["kld_mean"] < 0.01 and by["INT8"]["kld_mean"] < 0.05
    assert by["Q8_0"]["kld_mean"] < by["Q4_K_M"]["kld_mean"] < 0.2 and by["NF4"]["kld_mean"] < 0.5
    assert set(rep["gpus"]) == {"RTX 4090 24GB", "A100 40GB"}
    assert rep["model"].endswith("+ adapter")
    # the summary table says where each artifact is, relative to the working directory (work/)
    shown = [line.split()[-1] for line in summary.splitlines()]
    for rel in ["merged/", "gptq-ct/", "int8/", "nf4/", "report/report.md", "pipeline.json"] + ggufs:
        assert f"out/{rel}" in shown, (rel, summary)


def test_killed_at_random_moments_resumes_to_identical_outputs(reference, smollm2_dir, tmp_path):
    adapter, out, _, want, seconds, wall, _ = reference
    seed = int(os.environ.get("QUANTKIT_KILL_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    # the kill moments: uniform over the uninterrupted run's timeline, in order; a rerun skips the
    # recorded steps in about no time, so moment m falls at m - (their seconds) into the rerun
    moments = sorted(rng.uniform(0.5, wall) for _ in range(KILLS))
    cache = tmp_path / "cache"
    kills, history = 0, []
    while True:
        recorded = _recorded(out)
        t = max(0.5, moments[kills] - sum(seconds[k] for k in recorded)) if kills < KILLS else None
        assert len(history) < 40, f"no end in sight: seed {seed}, runs {history}"
        log = tmp_path / f"run-{len(history)}.log"
        started = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(_cmd(smollm2_dir, adapter, out), env=_env(cache), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=t if t is not None else 1200)
                killed = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
        text = log.read_text()
        history.append((round(t or 0, 1), sorted(recorded), sorted(_ran(text)), "killed" if killed else proc.returncode))
        ctx = f"seed {seed}, runs so far {history}"
        assert not (_ran(text) & recorded), f"a finished step ran again: {ctx}"
        if killed:
            kills += 1
            json.loads((out / "pipeline.json").read_text()) if (out / "pipeline.json").exists() else None
            have = _tree(out) if out.exists() else {}
            for rel, data in have.items():         # whatever is under a final name is complete
                assert rel in want and data == want[rel], f"{rel} differs after a kill: {ctx}"
            continue
        assert proc.returncode == 0, f"{text[-3000:]}\n{ctx}"
        got = _tree(out)
        assert sorted(got) == sorted(want), ctx
        for rel in want:
            assert got[rel] == want[rel], f"{rel} differs: {ctx}"
        assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".pipeline.lock"], ctx
        if kills >= KILLS:
            break
        # finished before its kill: this chain runs faster than the reference did (its caches are
        # warm now, or the machine is less busy). Start another chain, with the kills still to make
        # drawn again over the run just seen.
        moments = moments[:kills] + sorted(rng.uniform(0.5, time.perf_counter() - started)
                                           for _ in range(KILLS - kills))
        shutil.rmtree(out)
    print(f"kill seed {seed}: {len(history)} runs, {kills} kills: {history}")
