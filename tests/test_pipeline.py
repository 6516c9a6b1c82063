"""`quantkit init` / `quantkit run` (issue 7, in progress): a pipeline on a tiny model writes the
same GGUF as `quantkit export`, records every step, skips them on a rerun and redoes a step whose
settings or outputs changed."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli import main


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def ran(text: str) -> set[str]:
    """The steps a run's log says it ran ("[i/n] step: running (...)")."""
    return set(re.findall(r"^\[\d+/\d+\] (\w+): running", text, re.M))


def skipped(text: str) -> set[str]:
    return set(re.findall(r"^\[\d+/\d+\] (\w+): done before, skipped", text, re.M))


@pytest.fixture
def pipeline_file(tiny_model, tmp_path):
    code, out = cli("init", tmp_path / "pipeline.toml")
    assert code == 0, out
    p = tmp_path / "pipeline.toml"
    text = p.read_text()
    for a, b in [('base = "./my-model"', f'base = "{tiny_model}"'), ('lora = ["./my-adapter"]', "lora = []"),
                 ("limit_chunks = 0", "limit_chunks = 2"),
                 ('types = ["q4_k_m", "q5_k_m", "q8_0"]', 'types = ["q8_0", "q4_k_m"]')]:
        assert a in text, a
        text = text.replace(a, b)
    p.write_text(text)
    return p


def test_init_refuses_to_overwrite(tmp_path):
    (tmp_path / "p.toml").write_text("mine")
    code, out = cli("init", tmp_path / "p.toml")
    assert code == 2 and "exists" in out and (tmp_path / "p.toml").read_text() == "mine"


def test_run_then_rerun_skips_and_matches_export(pipeline_file, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    code, text = cli("run", pipeline_file, "--dry-run")
    assert code == 0 and "[1/2] gguf   will run (not run yet)" in text and "GiB free" in text, text
    assert not out.exists()
    code, text = cli("run", pipeline_file, "-q")
    assert code == 0, text
    assert ran(text) == {"gguf", "bench"}, text
    # the pipeline's GGUFs are the export command's
    code, _ = cli("export", tiny_model, "--gguf", "q8_0,q4_k_m", "-q", "-o", tmp_path / "direct")
    for f in sorted((out / "gguf").glob("*.gguf")):
        assert f.read_bytes() == (tmp_path / "direct" / f.name).read_bytes(), f.name
    assert len(list((out / "gguf").glob("*.Modelfile"))) == 2
    assert (out / "report" / "report.md").exists()
    rec = json.loads((out / "pipeline.json").read_text())["steps"]
    assert set(rec) == {"gguf", "bench"}
    code, text = cli("run", pipeline_file, "-q")
    assert code == 0 and skipped(text) == {"gguf", "bench"} and not ran(text), text
    # a changed output is not trusted: its step runs again; it writes the same bytes (no timings in
    # the files), so the report, whose inputs are unchanged, is not redone
    (out / "gguf" / "export.json").write_text("{}")
    code, text = cli("run", pipeline_file, "-q")
    assert ran(text) == {"gguf"} and skipped(text) == {"bench"}, text
    assert json.loads((out / "gguf" / "export.json").read_text())["files"]
    # a rerun reads no file unchanged since it was hashed; --rehash reads them all, and still skips
    import quantkit.manifest as m
    reads, sha256_file = [], m.sha256_file
    monkeypatch.setattr(m, "sha256_file", lambda f: reads.append(f) or sha256_file(f))
    code, text = cli("run", pipeline_file, "-q")
    assert code == 0 and skipped(text) == {"gguf", "bench"} and reads == [], (text, reads)
    code, text = cli("run", pipeline_file, "-q", "--rehash")
    assert code == 0 and skipped(text) == {"gguf", "bench"}, text
    assert {Path(f).name for f in reads} >= {f.name for f in (out / "gguf").glob("*.gguf")}


def test_not_enough_disk_stops_before_writing(pipeline_file, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 0))
    code, text = cli("run", pipeline_file, "-q")
    assert code != 0 and "not enough disk space" in text, text
    assert not (tmp_path / "out").exists()


def test_config_typo_names_the_line(pipeline_file):
    pipeline_file.write_text(pipeline_file.read_text().replace("ollama = true", "olama = true"))
    code, text = cli("run", pipeline_file)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "olama" in lines[0] and "did you mean 'ollama'" in lines[0], text


def test_with_an_adapter_the_merge_step_feeds_the_exports(pipeline_file, tiny_model, tmp_path, monkeypatch):
    import shutil

    from quantkit.testing import synthetic
    # a folder name with a size and a fine-tune part, which gguf-py's naming heuristics split
    base = shutil.copytree(tiny_model, tmp_path / "Tiny-Llama-Instruct")
    ad = synthetic.write_lora_adapter(base, tmp_path / "adapter", r=4)
    text = pipeline_file.read_text().replace("lora = []", f'lora = ["{ad}"]').replace("enabled = true ", "enabled = false ")
    pipeline_file.write_text(text.replace(f'base = "{tiny_model}"', f'base = "{base}"'))
    code, out = cli("run", pipeline_file, "-q")
    assert code == 0 and ran(out) == {"merge", "gguf"}, out
    monkeypatch.chdir(tmp_path)         # relative paths: merge records them resolved, as the pipeline's are
    code, _ = cli("merge", "Tiny-Llama-Instruct", "--lora", "adapter", "-q", "-o", tmp_path / "direct-merged")
    assert code == 0
    assert (tmp_path / "out" / "merged" / "model.safetensors").read_bytes() == \
        (tmp_path / "direct-merged" / "model.safetensors").read_bytes()
    # the GGUFs are export --lora's, names and general.* keys included (not those of OUT/merged)
    code, _ = cli("export", base, "--lora", ad, "--gguf", "q8_0,q4_k_m", "-q", "-o", tmp_path / "direct")
    ggufs = sorted((tmp_path / "out" / "gguf").glob("*.gguf"))
    assert len(ggufs) == 2 and [f.name for f in ggufs] == sorted(f.name for f in (tmp_path / "direct").glob("*.gguf"))
    for f in ggufs:
        assert f.read_bytes() == (tmp_path / "direct" / f.name).read_bytes(), f.name


def test_imatrix_auto_makes_one_and_the_ggufs_use_it(pipeline_file, tiny_model, tmp_path):
    text = pipeline_file.read_text()
    for a, b in [('imatrix = ""', 'imatrix = "auto"'), ("imatrix_samples = 64", "imatrix_samples = 2"),
                 ("imatrix_seqlen = 512", "imatrix_seqlen = 32"), ("enabled = true ", "enabled = false ")]:
        assert a in text, a
        text = text.replace(a, b)
    pipeline_file.write_text(text)
    code, out = cli("run", pipeline_file, "-q")
    assert code == 0 and ran(out) == {"imatrix", "gguf"}, out
    im = tmp_path / "out" / "imatrix" / "imatrix.gguf"
    code, _ = cli("export", tiny_model, "--imatrix", im, "--gguf", "q8_0,q4_k_m", "-q", "-o", tmp_path / "direct")
    code2, _ = cli("export", tiny_model, "--gguf", "q4_k_m", "-q", "-o", tmp_path / "plain")
    assert code == code2 == 0
    for f in sorted((tmp_path / "out" / "gguf").glob("*.gguf")):
        assert f.read_bytes() == (tmp_path / "direct" / f.name).read_bytes(), f.name
    (q4,) = (tmp_path / "out" / "gguf").glob("*Q4_K_M.gguf")
    assert q4.read_bytes() != (tmp_path / "plain" / q4.name).read_bytes()     # the imatrix was used
