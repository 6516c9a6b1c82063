"""The pipeline manifest (issue 7): a step is skipped only when its record, inputs, settings and
outputs all still match; anything else reruns it. Checked with small steps that count their runs."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from quantkit.manifest import Manifest, Step, content_hash, run_steps


def make_steps(tmp_path, runs, settings=None):
    src = tmp_path / "input.txt"
    a, b = tmp_path / "out" / "a.txt", tmp_path / "out" / "b"

    def step_a():
        runs.append("a")
        a.parent.mkdir(parents=True, exist_ok=True)
        a.write_text(src.read_text().upper())

    def step_b():
        runs.append("b")
        b.mkdir(parents=True, exist_ok=True)
        (b / "x.txt").write_text(a.read_text() * 2)

    return [Step("a", [src], settings or {"mode": "upper"}, [a], step_a),
            Step("b", [a], {}, [b], step_b)]


def run(tmp_path, runs, settings=None):
    return run_steps(make_steps(tmp_path, runs, settings), Manifest.load(tmp_path / "out"), echo=lambda s: None)


def test_second_run_skips_everything(tmp_path):
    (tmp_path / "input.txt").write_text("hello")
    runs = []
    assert run(tmp_path, runs) == {"a": "ran", "b": "ran"}
    assert run(tmp_path, runs) == {"a": "done", "b": "done"} and runs == ["a", "b"]
    rec = json.loads((tmp_path / "out" / "pipeline.json").read_text())["steps"]
    assert rec["a"]["outputs"] == {str(tmp_path / "out" / "a.txt"): content_hash(tmp_path / "out" / "a.txt")}


def test_changed_input_reruns_it_and_what_follows(tmp_path):
    (tmp_path / "input.txt").write_text("hello")
    runs = []
    run(tmp_path, runs)
    (tmp_path / "input.txt").write_text("world")
    assert run(tmp_path, runs) == {"a": "ran", "b": "ran"}
    assert (tmp_path / "out" / "b" / "x.txt").read_text() == "WORLDWORLD"


def test_same_input_rewritten_identically_is_still_done(tmp_path):
    (tmp_path / "input.txt").write_text("hello")
    runs = []
    run(tmp_path, runs)
    (tmp_path / "input.txt").write_text("hello")          # new mtime, same content
    assert run(tmp_path, runs) == {"a": "done", "b": "done"}


def test_changed_settings_rerun_the_step(tmp_path):
    (tmp_path / "input.txt").write_text("hello")
    runs = []
    run(tmp_path, runs)
    assert run(tmp_path, runs, {"mode": "other"})["a"] == "ran"


def test_an_output_changed_or_missing_is_not_trusted(tmp_path):
    (tmp_path / "input.txt").write_text("hello")
    runs = []
    run(tmp_path, runs)
    (tmp_path / "out" / "b" / "x.txt").write_text("tampered")
    assert run(tmp_path, runs) == {"a": "done", "b": "ran"}
    (tmp_path / "out" / "a.txt").unlink()
    assert run(tmp_path, runs) == {"a": "ran", "b": "done"}   # a's rewrite is identical: b still holds


def test_outputs_without_a_record_are_redone(tmp_path):
    (tmp_path / "input.txt").write_text("hello")
    runs = []
    run(tmp_path, runs)
    (tmp_path / "out" / "pipeline.json").unlink()
    assert run(tmp_path, runs) == {"a": "ran", "b": "ran"}
    (tmp_path / "out" / "pipeline.json").write_text("{not json")
    assert run(tmp_path, runs) == {"a": "ran", "b": "ran"}


def test_directory_hash_sees_names_and_contents_but_not_staging(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("1")
    h = content_hash(d)
    (d / ".f.partial-123").write_text("half")
    assert content_hash(d) == h
    (d / "g").write_text("")
    assert content_hash(d) != h


def test_killed_during_a_step_leaves_the_finished_ones_recorded(tmp_path):
    """A step that dies (SIGKILL) mid-way: the next run skips the finished step and redoes the other."""
    (tmp_path / "input.txt").write_text("hello")
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from quantkit.manifest import Manifest, Step, run_steps
        t = Path({str(tmp_path)!r})
        def a(): (t / "out").mkdir(exist_ok=True); (t / "out" / "a.txt").write_text("HELLO")
        def b(): os.kill(os.getpid(), signal.SIGKILL)
        run_steps([Step("a", [t / "input.txt"], {{"mode": "upper"}}, [t / "out" / "a.txt"], a),
                   Step("b", [t / "out" / "a.txt"], {{}}, [t / "out" / "b"], b)], Manifest.load(t / "out"))
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert p.returncode == -9
    runs = []
    assert run(tmp_path, runs) == {"a": "done", "b": "ran"} and runs == ["b"]


def _count_reads(monkeypatch):
    """The files manifest reads to hash them, in order."""
    import quantkit.manifest as m
    reads, real = [], m.sha256_file
    monkeypatch.setattr(m, "sha256_file", lambda p: reads.append(Path(p).name) or real(p))
    return reads


def test_a_rerun_reads_no_file_unchanged_since_it_was_hashed(tmp_path, monkeypatch):
    """A second `quantkit run` of an 8B pipeline would otherwise read ~50 GB to learn nothing changed.
    The recorded hashes are checked against hashlib reading the files."""
    (tmp_path / "input.txt").write_text("hello")
    run(tmp_path, [])
    rec = json.loads((tmp_path / "out" / "pipeline.json").read_text())["steps"]
    assert rec["a"]["inputs"][str(tmp_path / "input.txt")] == hashlib.sha256(b"hello").hexdigest()
    reads = _count_reads(monkeypatch)
    assert run(tmp_path, []) == {"a": "done", "b": "done"} and reads == []
    steps = make_steps(tmp_path, [])
    assert run_steps(steps, Manifest.load(tmp_path / "out", trust_stats=False), echo=lambda s: None) == \
        {"a": "done", "b": "done"}
    assert sorted(reads) == ["a.txt", "input.txt", "x.txt"]          # --rehash: each file once


def test_a_file_rewritten_to_its_old_size_and_mtime_is_read_again(tmp_path, monkeypatch):
    """Same size, mtime put back (as `cp -p` or `touch -d` would): the change time still tells."""
    src = tmp_path / "input.txt"
    src.write_text("hello")
    run(tmp_path, [])
    st = src.stat()
    time.sleep(0.05)                                          # past the file system's clock tick
    src.write_text("HELLO")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (src.stat().st_size, src.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    reads = _count_reads(monkeypatch)
    assert run(tmp_path, []) == {"a": "ran", "b": "done"}     # a's output is the same "HELLO"
    assert "input.txt" in reads


def test_a_damaged_table_of_remembered_hashes_means_reading_the_files(tmp_path, monkeypatch):
    (tmp_path / "input.txt").write_text("hello")
    run(tmp_path, [])
    manifest = tmp_path / "out" / "pipeline.json"
    data = json.loads(manifest.read_text())
    assert str((tmp_path / "input.txt").resolve()) in data["file_hashes"]
    entries = data["file_hashes"]
    for damaged in ({k: [1, 2] for k in entries}, {k: "?" for k in entries}, [], "x",
                    {k: [*e[:5], None] for k, e in entries.items()}, {k: [*e[:5], 7] for k, e in entries.items()},
                    {k: [*map(str, e[:5]), e[5]] for k, e in entries.items()}):
        manifest.write_text(json.dumps({**data, "file_hashes": damaged}))
        reads = _count_reads(monkeypatch)
        assert run(tmp_path, []) == {"a": "done", "b": "done"}
        assert sorted(reads) == ["a.txt", "input.txt", "x.txt"]


def test_damaged_step_records_are_no_records(tmp_path):
    (tmp_path / "input.txt").write_text("hello")
    run(tmp_path, [])
    manifest = tmp_path / "out" / "pipeline.json"
    data = json.loads(manifest.read_text())
    for damaged in ({"a": "junk", "b": data["steps"]["b"]}, {"a": {**data["steps"]["a"], "inputs": None},
                                                            "b": data["steps"]["b"]}, None, [1]):
        manifest.write_text(json.dumps({**data, "steps": damaged}))
        runs = []
        assert run(tmp_path, runs)["a"] == "ran" and "a" in runs


def test_files_behind_symlinks_are_remembered_under_the_link(tmp_path, monkeypatch):
    """A Hugging Face snapshot's files are links into its blobs/: the link's path is the key, and a
    link pointed at another blob of the same size and mtime is read again (another inode)."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "1").write_text("hello")
    (blobs / "2").write_text("world")
    st = (blobs / "1").stat()
    os.utime(blobs / "2", ns=(st.st_atime_ns, st.st_mtime_ns))
    (tmp_path / "input.txt").symlink_to(blobs / "1")
    run(tmp_path, [])
    reads = _count_reads(monkeypatch)
    assert run(tmp_path, []) == {"a": "done", "b": "done"} and reads == []
    (tmp_path / "input.txt").unlink()
    (tmp_path / "input.txt").symlink_to(blobs / "2")
    assert run(tmp_path, []) == {"a": "ran", "b": "ran"} and "input.txt" in reads
    assert (tmp_path / "out" / "b" / "x.txt").read_text() == "WORLDWORLD"


def test_a_file_written_just_now_is_hashed_once_its_times_are_old_enough(tmp_path, monkeypatch):
    """git's racy-clean case: a same-size write in the clock tick of the stat that took the identity
    could leave it unchanged, so a fresh file waits until its times are RACY_NS old."""
    import quantkit.manifest as m
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 10)
    slept = []
    monkeypatch.setattr(m.time, "sleep", slept.append)          # no wait: the file stays fresh
    hashes = m.FileHashes()
    assert hashes.file(f) == hashlib.sha256(b"x" * 10).hexdigest()
    assert len(slept) == 1 and 0 < slept[0] <= m.RACY_NS / 1e9
    assert hashes.entries_under([tmp_path]) == {}                # too fresh to be remembered
    monkeypatch.undo()
    time.sleep(m.RACY_NS / 1e9)
    hashes.file(f)
    assert list(hashes.entries_under([tmp_path])) == [str(f)]
    reads = _count_reads(monkeypatch)
    hashes.file(f)
    assert reads == []
    f.unlink()
    assert hashes.entries_under([tmp_path]) == {}                # deleted files are not kept
