"""OUT/pipeline.json: what each pipeline step did, so a rerun redoes only what is not provably done.

A step is done when the manifest has its record AND the content hashes of its inputs and its
settings equal the recorded ones AND every recorded output exists with the recorded hash. Anything
else (no record, a changed input or setting, an output missing, changed or present without a
record) means the step runs again. Steps write their outputs under temporary names and rename them
when complete (outputs.staged_output); the manifest itself is rewritten the same way after each
step, so a kill at any moment leaves either the old record or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .outputs import sha256_file, write_text_atomic

VERSION = 1


_FILE_HASHES: dict[tuple[str, int, int], str] = {}      # (path, size, mtime_ns) -> sha256, this process


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted, hidden
    staging entries excluded). Cached per process by (path, size, mtime) so a step's outputs are
    read once when they become the next step's inputs."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256(b"dir\0")
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            rel = p.relative_to(path)
            if any(part.startswith(".") for part in rel.parts):
                continue
            h.update(str(rel).encode() + b"\0" + content_hash(p).encode() + b"\0")
        return h.hexdigest()
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_file(path)
    return _FILE_HASHES[key]


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Step:
    """One unit of work: `run()` must write exactly `outputs` (each atomically)."""
    name: str
    inputs: list[Path]
    settings: dict[str, Any]
    outputs: list[Path]
    run: Callable[[], None]
    expected_bytes: int = 0


@dataclass
class Manifest:
    path: Path
    steps: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, out_dir: Path) -> Manifest:
        path = Path(out_dir) / "pipeline.json"
        try:
            data = json.loads(path.read_text())
            steps = data["steps"] if data.get("quantkit_pipeline") == VERSION else {}
        except (OSError, ValueError, KeyError, TypeError):
            steps = {}                      # no manifest (or not ours): nothing is trusted
        return cls(path, dict(steps))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"quantkit_pipeline": VERSION, "steps": self.steps}, indent=2) + "\n",
                          fsync=True)

    def why_not_done(self, step: Step) -> str | None:
        """None when the step is provably done; else the reason it must run."""
        rec = self.steps.get(step.name)
        if rec is None:
            return "not run yet"
        if rec.get("settings_hash") != settings_hash(step.settings):
            return "settings changed"
        for p in step.inputs:
            if not Path(p).exists():
                return f"input {p} is missing"
            if rec.get("inputs", {}).get(str(p)) != content_hash(p):
                return f"input {Path(p).name} changed"
        for p in step.outputs:
            if not Path(p).exists():
                return f"output {Path(p).name} is missing"
            if rec.get("outputs", {}).get(str(p)) != content_hash(p):
                return f"output {Path(p).name} changed since it was written"
        return None

    def record(self, step: Step, seconds: float) -> None:
        self.steps[step.name] = {
            "settings": step.settings, "settings_hash": settings_hash(step.settings),
            "inputs": {str(p): content_hash(p) for p in step.inputs},
            "outputs": {str(p): content_hash(p) for p in step.outputs},
            "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self.save()


def run_steps(steps: list[Step], manifest: Manifest, echo: Callable[[str], None] = print) -> dict[str, str]:
    """Run what is not done, in order; returns step -> 'done' (skipped) or 'ran'."""
    status = {}
    for i, step in enumerate(steps, 1):
        reason = manifest.why_not_done(step)
        if reason is None:
            echo(f"[{i}/{len(steps)}] {step.name}: done before, skipped")
            status[step.name] = "done"
            continue
        echo(f"[{i}/{len(steps)}] {step.name}: running ({reason})")
        if manifest.steps.pop(step.name, None) is not None:      # the old record no longer vouches
            manifest.save()
        t0 = time.perf_counter()
        step.run()
        missing = [str(p) for p in step.outputs if not Path(p).exists()]
        if missing:
            raise RuntimeError(f"step {step.name} did not write {', '.join(missing)}")
        seconds = time.perf_counter() - t0
        manifest.record(step, seconds)
        echo(f"[{i}/{len(steps)}] {step.name}: done in {seconds:.1f} s")
        status[step.name] = "ran"
    return status
