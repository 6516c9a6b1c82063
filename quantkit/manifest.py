"""OUT/pipeline.json: what each pipeline step did, so a rerun redoes only what is not provably done.

A step is done when the manifest has its record AND the content hashes of its inputs and its
settings equal the recorded ones AND every recorded output exists with the recorded hash. Anything
else (no record, a changed input or setting, an output missing, changed or present without a
record) means the step runs again. Steps write their outputs under temporary names and rename them
when complete (outputs.staged_output); the manifest itself is rewritten the same way after each
step, so a kill at any moment leaves either the old record or the new one, never half of one.

Hashing an 8B model's files takes tens of seconds (more from a cold disk), so the manifest also
keeps each file's hash with its identity when hashed: size, modification and change times, inode
and device. A later run takes the hash of a file whose identity is unchanged without reading it, as
git's index and rsync's quick check do; any write, rename onto it, `touch` or `cp -p` changes the
change time at least. A file written less than RACY_NS ago is hashed once its times are that old,
so that a write in the same clock tick cannot hide. `quantkit run --rehash`
(Manifest.load(..., trust_stats=False)) reads everything again.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .outputs import sha256_file, write_text_atomic

VERSION = 1


# A write in the same clock tick as the stat that took a file's identity may leave its times
# unchanged (git's "racy clean" files): a file written less than this long ago is hashed only once
# its times are this old, so that any later write shows in them.
RACY_NS = 100_000_000


def _is_hex_digest(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


class FileHashes:
    """sha256 of files, each remembered with the file's identity when it was read (size, mtime,
    ctime, inode, device): while that identity holds, the file is not read again. Files are keyed
    by absolute path, symlinks not resolved (a Hugging Face snapshot's files link into its blobs)."""

    def __init__(self, known: dict | None = None):
        self._known = {p: (tuple(e[:5]), e[5]) for p, e in (known or {}).items()
                       if isinstance(p, str) and isinstance(e, list) and len(e) == 6
                       and all(type(v) is int for v in e[:5]) and _is_hex_digest(e[5])}

    @staticmethod
    def _identity(st: os.stat_result) -> tuple:
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev

    @staticmethod
    def _age_ns(st: os.stat_result) -> int:
        return time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns)

    def file(self, path: Path) -> str:
        key = str(Path(path).absolute())
        st = os.stat(key)
        seen = self._known.get(key)
        if seen is not None and seen[0] == self._identity(st):
            return seen[1]
        age = self._age_ns(st)
        if 0 <= age < RACY_NS:                         # written just now: wait until a write would show
            time.sleep((RACY_NS - age) / 1e9)
            st = os.stat(key)
        digest = sha256_file(Path(key))
        if self._identity(os.stat(key)) == self._identity(st) and self._age_ns(st) >= RACY_NS:
            self._known[key] = (self._identity(st), digest)   # not written to while read, nor just before
        return digest

    def entries_under(self, roots: list[Path]) -> dict[str, list]:
        """The remembered files at or below `roots` that still exist, as JSON (for the manifest)."""
        tops = [str(Path(r).absolute()) for r in roots]
        return {p: [*ident, digest] for p, (ident, digest) in sorted(self._known.items())
                if any(p == t or p.startswith(t + os.sep) for t in tops) and os.path.isfile(p)}


def _valid_record(rec) -> bool:
    return isinstance(rec, dict) and all(
        isinstance(rec.get(kind), dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in rec[kind].items())
        for kind in ("inputs", "outputs"))


def content_hash(path: Path, hashes: FileHashes | None = None) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted, hidden
    staging entries excluded). With `hashes`, files are read once while unchanged."""
    hashes = FileHashes() if hashes is None else hashes
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256(b"dir\0")
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            rel = p.relative_to(path)
            if any(part.startswith(".") for part in rel.parts):
                continue
            h.update(str(rel).encode() + b"\0" + content_hash(p, hashes).encode() + b"\0")
        return h.hexdigest()
    return hashes.file(path)


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
    job: Any = None             # the bench step's BenchJob, which a cluster runs in parts


@dataclass
class Manifest:
    path: Path
    steps: dict[str, dict] = field(default_factory=dict)
    hashes: FileHashes = field(default_factory=FileHashes)

    @classmethod
    def load(cls, out_dir: Path, trust_stats: bool = True) -> Manifest:
        """OUT/pipeline.json's records; with trust_stats, also the file hashes it remembers."""
        path = Path(out_dir) / "pipeline.json"
        try:
            data = json.loads(path.read_text())
            ours = data.get("quantkit_pipeline") == VERSION
            steps = data["steps"] if ours else {}
            # a damaged record is no record: its step runs again
            steps = {k: v for k, v in steps.items() if isinstance(k, str) and _valid_record(v)}
            known = data.get("file_hashes") if ours and trust_stats else None
            hashes = FileHashes(known if isinstance(known, dict) else None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            steps, hashes = {}, FileHashes()    # no manifest (or not ours): nothing is trusted
        return cls(path, steps, hashes)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        roots = [Path(p) for rec in self.steps.values() for kind in ("inputs", "outputs") for p in rec.get(kind, {})]
        write_text_atomic(self.path, json.dumps({"quantkit_pipeline": VERSION, "steps": self.steps,
                                                 "file_hashes": self.hashes.entries_under(roots)}, indent=2) + "\n",
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
            if rec.get("inputs", {}).get(str(p)) != content_hash(p, self.hashes):
                return f"input {Path(p).name} changed"
        for p in step.outputs:
            if not Path(p).exists():
                return f"output {Path(p).name} is missing"
            if rec.get("outputs", {}).get(str(p)) != content_hash(p, self.hashes):
                return f"output {Path(p).name} changed since it was written"
        return None

    def record(self, step: Step, seconds: float) -> None:
        self.steps[step.name] = {
            "settings": step.settings, "settings_hash": settings_hash(step.settings),
            "inputs": {str(p): content_hash(p, self.hashes) for p in step.inputs},
            "outputs": {str(p): content_hash(p, self.hashes) for p in step.outputs},
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
