"""`quantkit run` on bad input (issue 7): each case gives one line naming the cause, a non-zero exit,
no file in OUT (a hidden lock file aside), and leaves its inputs untouched. Most are caught before
the first step; NaN/Inf only shows when a step reads the weights, and that step leaves nothing."""
from __future__ import annotations

import fcntl
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantkit.testing import synthetic
from quantkit.cli import main

EVAL_TEXT = Path(__import__("quantkit").__file__).parent / "data" / "wiki.test.raw"


def _edit_tensors(m: Path, fn) -> None:
    t = load_file(m / "model.safetensors")
    fn(t)
    save_file(t, m / "model.safetensors")


def _edit_config(m: Path, **changes) -> None:
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(changes)
    (m / "config.json").write_text(json.dumps(cfg))


class Case:
    """A fresh copy of the tiny model in `m`, a work dir `w`; `toml` is the pipeline file's text
    (None: flags only) and `args` the extra flags. Each case function edits them and returns the
    fragments its one error line must contain."""
    def __init__(self, m: Path, w: Path):
        self.m, self.w = m, w
        self.out = w / "out"
        self.args: list[str] = ["--base", str(m), "-o", str(self.out), "--gguf", "q8_0", "--no-bench"]
        self.toml: str | None = None
        self.inputs: list[Path] = [m]

    def adapter(self, base: Path | None = None) -> Path:
        a = synthetic.write_lora_adapter(base or self.m, self.w / "adapter", r=4)
        self.args += ["--lora", str(a)]
        self.inputs.append(a)
        return a

    def other_model(self, **changes) -> Path:
        cfg = json.loads((self.m / "config.json").read_text())
        cfg.update(changes)
        return synthetic.write_checkpoint(self.w / "other", cfg)


def missing_shard(c):
    names = load_file(c.m / "model.safetensors").keys()
    wm = {n: "model-00001-of-00002.safetensors" for n in names}
    (c.m / "model.safetensors").rename(c.m / "model-00001-of-00002.safetensors")
    wm["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (c.m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return ["model-00002-of-00002.safetensors", "does not exist"]


def truncated_shard(c):
    p = c.m / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    return ["model.safetensors", "truncated"]


def corrupt_safetensors_header(c):
    p = c.m / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[:8] = struct.pack("<Q", len(b) * 2)
    p.write_bytes(bytes(b))
    return ["model.safetensors", "corrupt safetensors header"]


def wrong_dtype(c):
    _edit_tensors(c.m, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                          t["model.layers.0.self_attn.k_proj.weight"].to(torch.int8)}))
    return ["model.safetensors", "k_proj", "I8"]


def nan_in_weights(c):
    def f(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    _edit_tensors(c.m, f)
    return ["model.layers.1.mlp.up_proj.weight", "NaN"]


def inf_in_weights_under_an_adapter(c):
    def f(t):
        t["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("inf")
    _edit_tensors(c.m, f)
    c.adapter()
    return ["v_proj", "NaN or Inf"]


def adapter_for_another_base(c):
    c.adapter(c.other_model(hidden_size=96, head_dim=24))
    return ["adapter_config.json", "other", "does not look like the base"]


def adapter_shapes_do_not_fit(c):
    # an adapter that claims this base but was trained on another shape
    a = c.adapter(c.other_model(intermediate_size=192))
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(c.m)
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return ["adapter", "mlp", "shape"]


def residual_with_mismatched_shapes(c):
    r = c.other_model(intermediate_size=192)
    c.args += ["--residual", str(r)]
    c.inputs.append(r)
    return ["mlp", "shape"]


def unknown_architecture(c):
    _edit_config(c.m, architectures=["GPT2LMHeadModel"])
    return ["config.json", "GPT2LMHeadModel"]


def missing_config(c):
    (c.m / "config.json").unlink()
    return ["config.json", "not found"]


def missing_tokenizer(c):
    (c.m / "tokenizer.json").unlink()
    return ["tokenizer.json"]


def unknown_pre_tokenizer(c):
    spec = json.loads((c.m / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Punctuation", "behavior": "Isolated"},
                                                                   spec["pre_tokenizer"]]}
    (c.m / "tokenizer.json").write_text(json.dumps(spec))
    return ["tokenizer.json", "unknown pre-tokenizer"]


def config_typo(c):
    c.toml = f'[input]\nbase = "{c.m}"\n[output]\ndir = "{c.out}"\n[gguf]\ntypes = ["q8_0"]\nolama = false\n'
    c.args = []
    return ["pipeline.toml", "line 7", "olama", "did you mean 'ollama'"]


def config_wrong_type(c):
    c.toml = f'[input]\nbase = "{c.m}"\n[output]\ndir = "{c.out}"\n[bench]\nctx = "512"\n'
    c.args = []
    return ["pipeline.toml", "line 6", "ctx", "an integer"]


def unknown_gguf_type(c):
    c.args += ["--gguf", "q4_k_m,q3_k_xl"]
    return ["--gguf", "q3_k_xl", "q8_0"]


def unwritable_output(c):
    blocker = c.w / "a-file"
    blocker.write_text("")
    c.out = blocker / "out"
    c.args += ["-o", str(c.out)]
    return [str(c.out), "not a directory"]


def output_inside_the_base(c):
    c.out = c.m / "out"
    c.args += ["-o", str(c.out)]
    return ["--out", "inside the input"]


def full_disk(c, monkeypatch):
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 10 << 20, 1 << 20))
    return [str(c.out), "not enough disk space", "1.0 MiB is free"]


def output_in_use_by_another_run(c, monkeypatch):
    c.out.mkdir()
    lock = open(c.out / ".pipeline.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    monkeypatch.setattr(c, "held_lock", lock, raising=False)
    return [str(c.out), "another `quantkit run`"]


def calibration_text_too_short(c):
    calib = c.w / "calib.txt"
    calib.write_text("A few words are not enough to calibrate anything.")
    c.args += ["--gptq", "--group-size", "32", "--calib", str(calib), "--calib-seqlen", "256"]
    return ["calib.txt", "fewer than one sample of 256"]


def calibration_on_the_eval_text(c):
    c.args += ["--gptq", "--group-size", "32", "--calib", str(EVAL_TEXT)]
    return ["wiki.test.raw", "evaluation text"]


def group_size_does_not_divide(c):
    c.args += ["--gptq", "--group-size", "48"]
    return ["--group-size 48", "not a multiple"]


def unknown_gpu_name(c):
    c.args += ["--bench", "--gpus", "rtx4090,rtx9090"]
    return ["--gpus", "unknown GPU 'rtx9090'"]


def eval_text_too_short(c):
    t = c.w / "short.txt"
    t.write_text("Too short to score.")
    c.args += ["--bench", "--text", str(t)]
    return ["short.txt", "tokens"]


def imatrix_of_another_model(c):
    from quantkit.imatrix import collect, write
    other = c.other_model(hidden_size=96, head_dim=24)
    im = write(collect(other, tokens=torch.randint(0, 1000, (1, 16)), progress=False), c.w / "other.imatrix.gguf")
    c.args += ["--gguf", "q4_k_m", "--imatrix", str(im)]
    return ["other.imatrix.gguf", "has 96 values, the tensor has 64 columns"]


def missing_adapter(c):
    c.args += ["--lora", str(c.w / "no-such-adapter")]
    return ["no-such-adapter"]


def adapter_weights_do_not_match(c):
    c.adapter()
    c.args += ["--weight", "1.0", "--weight", "0.5"]
    return ["--weight", "2", "1 adapters"]


def base_does_not_exist(c):
    c.args += ["--base", str(c.w / "nope")]
    return ["nope"]


CASES = [missing_shard, truncated_shard, corrupt_safetensors_header, wrong_dtype, nan_in_weights,
         inf_in_weights_under_an_adapter, adapter_for_another_base, adapter_shapes_do_not_fit, residual_with_mismatched_shapes,
         unknown_architecture, missing_config, missing_tokenizer, unknown_pre_tokenizer, config_typo,
         config_wrong_type, unknown_gguf_type, unwritable_output, output_inside_the_base, full_disk,
         output_in_use_by_another_run, calibration_text_too_short, calibration_on_the_eval_text,
         group_size_does_not_divide, imatrix_of_another_model, unknown_gpu_name, eval_text_too_short, missing_adapter,
         adapter_weights_do_not_match, base_does_not_exist]


FOUND_BY_A_STEP = {nan_in_weights, inf_in_weights_under_an_adapter}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(case, tiny_model, tmp_path, monkeypatch, tree_hash):
    m = tmp_path / "model"
    shutil.copytree(tiny_model, m)
    c = Case(m, tmp_path)
    fragments = case(c, monkeypatch) if case.__code__.co_argcount == 2 else case(c)
    args = list(c.args)
    if c.toml is not None:
        (tmp_path / "pipeline.toml").write_text(c.toml)
        args = [str(tmp_path / "pipeline.toml")] + args
    before = {p: tree_hash(p) for p in c.inputs if p.exists()}
    result = CliRunner().invoke(main, ["run", *args, "-q"])
    assert result.exit_code not in (0, None), result.output
    # the progress lines of a step that started ("[1/2] gguf: running ...") are not part of the error
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not re.match(r"\[\d+/\d+\] \w+: ", ln)]
    assert len(lines) == 1 and lines[0].startswith("quantkit: error: "), result.stderr
    # only NaN/Inf waits for a step to read the weights: everything else is refused before any step
    started = re.findall(r"^\[\d+/\d+\] (\w+): running", result.stderr, re.M)
    assert not started or case in FOUND_BY_A_STEP, f"caught only once step {started} ran: {lines[0]}"
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    written = [p for p in c.out.rglob("*") if p.name != ".pipeline.lock"] if c.out.is_dir() else []
    assert not written, written
    assert {p: tree_hash(p) for p in before} == before, "an input was modified"


def test_ignore_base_name_merges_an_adapter_named_for_another_base(tiny_model, tmp_path):
    """An adapter that fits the base's shapes but names another model: refused as `merge` refuses it,
    then merged with --ignore-base-name (or `ignore_base_name = true`), as `merge` does with the flag."""
    a = synthetic.write_lora_adapter(tiny_model, tmp_path / "adapter", r=4)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/Other-Model"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    args = ["run", "--base", str(tiny_model), "--lora", str(a), "--gguf", "q8_0", "--no-bench", "-q"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Other-Model" in result.stderr, result.output
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out"), "--ignore-base-name"])
    assert result.exit_code == 0, result.output
    (tmp_path / "p.toml").write_text(f'[input]\nbase = "{tiny_model}"\nlora = ["{a}"]\nignore_base_name = true\n'
                                     '[gguf]\ntypes = []\n[bench]\nenabled = false\n')
    result = CliRunner().invoke(main, ["run", str(tmp_path / "p.toml"), "-q", "-o", str(tmp_path / "out2")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["merge", str(tiny_model), "--lora", str(a), "--ignore-base-name", "-q",
                                       "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    for out in ("out", "out2"):
        assert (tmp_path / out / "merged" / "model.safetensors").read_bytes() == \
            (tmp_path / "merged" / "model.safetensors").read_bytes()
