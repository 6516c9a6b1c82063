"""Bad input: one line naming the file and the problem, a non-zero exit, no output file, input untouched."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantkit.cli import main


# --- ways to break a model directory: each takes a fresh copy and returns the expected fragments

def missing_config(m):
    (m / "config.json").unlink()
    return ["config.json", "not found"]


def unsupported_architecture(m):
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (m / "config.json").write_text(json.dumps(cfg))
    return ["config.json", "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM"]


def config_not_json(m):
    (m / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    return ["config.json", "not valid JSON"]


def config_missing_key(m):
    cfg = json.loads((m / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (m / "config.json").write_text(json.dumps(cfg))
    return ["config.json", "num_hidden_layers"]


def truncated_shard(m):
    p = m / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    return ["model.safetensors", "truncated"]


def corrupt_header(m):
    p = m / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[8:16] = b"\xff\xfe garb"
    p.write_bytes(bytes(b))
    return ["model.safetensors", "corrupt safetensors header"]


def header_length_beyond_file(m):
    p = m / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[:8] = struct.pack("<Q", len(b) * 2)
    p.write_bytes(bytes(b))
    return ["model.safetensors", "corrupt safetensors header"]


def empty_shard(m):
    (m / "model.safetensors").write_bytes(b"")
    return ["model.safetensors", "truncated"]


def index_names_missing_shard(m):
    names = load_file(m / "model.safetensors").keys()
    wm = {n: "model-00001-of-00002.safetensors" for n in names}
    (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors")
    wm["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "does not exist"]


def no_weights(m):
    (m / "model.safetensors").unlink()
    return ["no *.safetensors"]


def shape_does_not_match_config(m):
    cfg = json.loads((m / "config.json").read_text())
    cfg["intermediate_size"] += 32
    (m / "config.json").write_text(json.dumps(cfg))
    return ["model.safetensors", "mlp.", "shape", "config.json implies"]


def missing_tensor(m):
    t = load_file(m / "model.safetensors")
    del t["model.layers.1.mlp.down_proj.weight"]
    save_file(t, m / "model.safetensors")
    return ["model.layers.1.mlp.down_proj.weight", "missing"]


def integer_dtype(m):
    t = load_file(m / "model.safetensors")
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"].to(torch.int8)
    save_file(t, m / "model.safetensors")
    return ["model.safetensors", "k_proj", "I8", "BF16, F16 or F32"]


def nan_in_a_late_tensor(m):
    t = load_file(m / "model.safetensors")
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(t, m / "model.safetensors")
    return ["model.safetensors", "model.layers.1.mlp.up_proj.weight", "NaN"]


def missing_tokenizer(m):
    (m / "tokenizer.json").unlink()
    return ["tokenizer.json"]


def unknown_pre_tokenizer(m):
    spec = json.loads((m / "tokenizer.json").read_text())
    # punctuation split off on its own changes the ids of the check text ("......" is one token in SmolLM2)
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Punctuation", "behavior": "Isolated"},
                                                                   spec["pre_tokenizer"]]}
    (m / "tokenizer.json").write_text(json.dumps(spec))
    return ["tokenizer.json", "unknown pre-tokenizer"]


def sentencepiece_tokenizer(m):
    spec = json.loads((m / "tokenizer.json").read_text())
    spec["model"]["type"] = "Unigram"
    (m / "tokenizer.json").write_text(json.dumps(spec))
    return ["tokenizer.json", "Unigram", "not supported"]


CASES = [missing_config, unsupported_architecture, config_not_json, config_missing_key, truncated_shard,
         corrupt_header, header_length_beyond_file, empty_shard, index_names_missing_shard, no_weights,
         shape_does_not_match_config, missing_tensor, integer_dtype, nan_in_a_late_tensor,
         missing_tokenizer, unknown_pre_tokenizer, sentencepiece_tokenizer]


def _run(args: list[str]):
    return CliRunner().invoke(main, args)


def _assert_one_line_error(result, fragments, out: Path):
    assert result.exit_code not in (0, None), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("quantkit: error: ")
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    leftovers = [p.name for p in out.rglob("*") if p.suffix in (".gguf", ".partial", ".Modelfile")
                 or ".partial" in p.name] if out.exists() else []
    assert not leftovers, leftovers


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_gives_one_line_error_and_no_output(case, tiny_model, tmp_path, tree_hash):
    m = tmp_path / "model"
    shutil.copytree(tiny_model, m)
    fragments = case(m)
    before = tree_hash(m)
    out = tmp_path / "out"
    result = _run(["export", str(m), "--gguf", "q8_0,q4_k_m", "-o", str(out), "-q", "--ollama"])
    _assert_one_line_error(result, fragments, out)
    assert tree_hash(m) == before, "the input directory was modified"


def test_model_path_that_does_not_exist(tmp_path):
    result = _run(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), "-q"])
    _assert_one_line_error(result, ["nope", "not a directory"], tmp_path / "out")


def test_unknown_gguf_type_names_the_choices(tiny_model, tmp_path):
    result = _run(["export", str(tiny_model), "--gguf", "q4_k_m,q3_k_s", "-o", str(tmp_path / "out"), "-q"])
    _assert_one_line_error(result, ["q3_k_s", "q8_0", "q4_k_m"], tmp_path / "out")


def test_output_path_not_writable(tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = _run(["export", str(tiny_model), "--gguf", "q8_0", "-o", str(blocker / "out"), "-q"])
    _assert_one_line_error(result, [str(blocker / "out"), "not writable"], tmp_path)


def test_existing_output_is_replaced_only_when_complete(tiny_model, tmp_path):
    out = tmp_path / "out"
    assert _run(["export", str(tiny_model), "--gguf", "q8_0", "-o", str(out), "-q"]).exit_code == 0
    (gguf_file,) = out.glob("*.gguf")
    first = gguf_file.read_bytes()
    # a failing export into the same directory leaves the earlier, complete file as it was
    m = tmp_path / "model"
    shutil.copytree(tiny_model, m)
    nan_in_a_late_tensor(m)
    result = _run(["export", str(m), "--gguf", "q8_0", "-o", str(out), "-q"])
    assert result.exit_code != 0
    assert gguf_file.read_bytes() == first
    assert not [p for p in out.iterdir() if "partial" in p.name]


def test_console_script_exits_non_zero_with_one_line(tmp_path):
    exe = Path(sys.executable).with_name("quantkit")
    r = subprocess.run([str(exe), "export", str(tmp_path), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"quantkit: error: {tmp_path / 'config.json'}: file not found"]
