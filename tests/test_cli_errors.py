"""Bad input: one line naming the file and the problem, a non-zero exit, no output file, input untouched."""
from __future__ import annotations

import json
import os
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


def config_value_of_the_wrong_type(m):
    cfg = json.loads((m / "config.json").read_text())
    cfg["hidden_size"] = str(cfg["hidden_size"])
    (m / "config.json").write_text(json.dumps(cfg))
    return ["config.json", "'hidden_size' must be a positive integer"]


def config_value_null(m):
    cfg = json.loads((m / "config.json").read_text())
    cfg["num_attention_heads"] = None
    cfg["rms_norm_eps"] = "1e-5"
    (m / "config.json").write_text(json.dumps(cfg))
    return ["config.json", "num_attention_heads", "None"]


def tokenizer_config_not_json(m):
    (m / "tokenizer_config.json").write_text('{"add_bos_token": ')
    return ["tokenizer_config.json", "not valid JSON"]


CASES = [missing_config, unsupported_architecture, config_not_json, config_missing_key, truncated_shard,
         corrupt_header, header_length_beyond_file, empty_shard, index_names_missing_shard, no_weights,
         shape_does_not_match_config, missing_tensor, integer_dtype, nan_in_a_late_tensor,
         missing_tokenizer, unknown_pre_tokenizer, sentencepiece_tokenizer, config_value_of_the_wrong_type,
         config_value_null, tokenizer_config_not_json]


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
    assert not out.exists(), "the output directory made for the export was left behind"
    assert tree_hash(m) == before, "the input directory was modified"


def test_model_path_that_does_not_exist(tmp_path):
    result = _run(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), "-q"])
    _assert_one_line_error(result, ["nope", "does not exist"], tmp_path / "out")


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


# --- mistakes caught before any work: flags, places to write, the GPTQ/bitsandbytes side of an export

def _no_traceback(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    return result.output


def test_a_device_this_machine_lacks(tiny_model, tmp_path):
    out = tmp_path / "out"
    for device, words in [("foo", ["--device", "unknown device 'foo'"]), ("mps", ["unsupported device 'mps'"])] + \
            ([] if torch.cuda.is_available() else [("cuda", ["'cuda' asked for", "no CUDA device"])]):
        for cmd in (["export", str(tiny_model), "--gguf", "q8_0", "-o", str(out)], ["imatrix", str(tiny_model), "-o",
                    str(out / "im.gguf")], ["run", "--base", str(tiny_model), "--no-bench", "-o", str(out)]):
            result = _run([*cmd, "--device", device, "-q"])
            _assert_one_line_error(result, words if cmd[0] != "run" else words[-1:], out)
            assert not out.exists(), cmd
    # a dry run may plan a GPU job on a machine without one
    for cmd in (["export", str(tiny_model), "--gguf", "q8_0", "--dry-run"], ["run", "--base", str(tiny_model),
                "--gguf", "q8_0", "--no-bench", "-o", str(out), "--dry-run"]):
        assert _run([*cmd, "--device", "cuda"]).exit_code == 0, cmd


def test_gptq_and_bnb_inputs_are_checked_before_the_gguf_pass(tiny_model, tmp_path):
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    gguf = ["export", str(tiny_model), "--gguf", "q8_0", "-o", str(out), "-q"]
    cases = [(["--gptq", "--group-size", "32", "--calib", str(short), "--calib-seqlen", "32"],
              ["short.txt", "fewer than one sample"]),
             (["--gptq", "--group-size", "48"], ["not a multiple of --group-size 48"])]
    for extra, words in cases:
        _assert_one_line_error(_run([*gguf, *extra]), words, out)
        assert not out.exists(), extra
    # an output that exists is refused before the GGUF pass, not after the GPTQ one
    for d in ("gptq-ct", "int8"):
        (out / d).mkdir(parents=True)
        (out / d / "mine").write_text("keep")
        flags = ["--gptq", "--group-size", "32"] if d == "gptq-ct" else ["--int8"]
        _assert_one_line_error(_run([*gguf, *flags]), [str(out / d), "exists", "--force"], out)
        assert {p.name for p in out.iterdir()} <= {"gptq-ct", "int8"} and (out / d / "mine").read_text() == "keep"


def test_gptq_and_bnb_output_places_are_checked_before_the_work(tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out, words in [(blocker / "out", ["a-file is not a directory"]), (tiny_model, ["would write into the input"])]:
        for flags in (["--gptq", "--group-size", "32"], ["--int8"]):
            result = _run(["export", str(tiny_model), *flags, "-o", str(out), "-q"])
            _assert_one_line_error(result, words, tmp_path)
            assert "%" not in result.output        # no progress: refused before the work
    assert not (tiny_model / "gptq").exists() and not (tiny_model / "int8").exists()


def test_a_missing_optional_library_names_the_extra(tiny_model, tmp_path, monkeypatch):
    import quantkit.imatrix  # noqa: F401  (imported already; what it imports inside runs now)
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = _run(["imatrix", str(tiny_model), "-o", str(tmp_path / "im.gguf"), "-q"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "quantkit: error: this needs transformers, which is not installed: pip install 'quantkit[quant]'"]


@pytest.mark.parametrize("flag, value", [("--group-size", "0"), ("--group-size", "-5"), ("--damp", "0"),
                                         ("--damp", "nan"), ("--damp", "inf"),
                                         ("--damp", "-1"), ("--calib-samples", "0"), ("--calib-seqlen", "0"),
                                         ("--gptq-format", ""), ("--gptq-format", "none")])
def test_gptq_option_values_out_of_range(tiny_model, tmp_path, flag, value):
    result = _run(["export", str(tiny_model), "--gptq", flag, value, "-o", str(tmp_path / "out"), "-q"])
    assert flag in _no_traceback(result) and not (tmp_path / "out").exists()


def test_outputs_inside_an_input_are_refused(tiny_model, tmp_path, tree_hash):
    m = tmp_path / "model"
    shutil.copytree(tiny_model, m)
    before = tree_hash(m)
    for cmd in (["export", str(m), "--gguf", "q8_0", "-o", str(m)], ["export", str(m), "--gguf", "q8_0", "-o",
                str(m / "gguf")], ["imatrix", str(m), "-o", str(m / "imatrix.gguf")],
                ["bench", "--baseline", str(m), str(m), "-o", str(m / "report")]):
        _assert_one_line_error(_run([*cmd, "-q"]), ["would write into the input", str(m)], m)
    assert tree_hash(m) == before


def test_output_places_are_checked_before_the_work(tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "a-dir").mkdir()
    out = tmp_path / "out"
    for cmd, words in [
            (["imatrix", str(tiny_model), "-o", str(tmp_path / "a-dir")], ["a-dir", "is a directory"]),
            (["imatrix", str(tiny_model), "-o", str(blocker / "im.gguf")], ["a-file is not a directory"]),
            (["export", str(tiny_model), "--gguf", "q8_0", "-o", str(out), "--stats", str(blocker / "s.json")],
             ["a-file is not a directory"]),
            (["export", str(tiny_model), "--gguf", "q8_0", "-o", str(blocker)], ["a-file", "is a file"]),
            (["bench", "--baseline", str(tiny_model), str(tiny_model), "-o", str(blocker)], ["a-file", "is a file"])]:
        _assert_one_line_error(_run([*cmd, "-q"]), words, out)
        assert not out.exists(), cmd


def test_flags_that_would_be_ignored_are_refused(tiny_model, tmp_path):
    out = tmp_path / "out"
    for cmd, words in [
            (["export", str(tiny_model), "--weight", "2", "--gguf", "q8_0"], ["--weight", "1 values for 0 adapters"]),
            (["export", str(tiny_model), "--scale", "2", "--gguf", "q8_0"], ["--scale", "residual_scale 2", "no residual"]),
            (["merge", str(tiny_model), "--lora", str(tiny_model), "--scale", "0.5"], ["--scale 0.5"])]:
        _assert_one_line_error(_run([*cmd, "-o", str(out), "-q"]), words, out)
        assert not out.exists(), cmd
    assert "--gguf is empty" in _no_traceback(_run(["export", str(tiny_model), "--gguf", " ", "-o", str(out)]))


def test_merge_refuses_a_tiny_shard_size_and_files_without_a_tokenizer(tiny_model, tmp_path):
    from quantkit.testing import synthetic
    ad = synthetic.write_lora_adapter(tiny_model, tmp_path / "adapter", r=4)
    out = tmp_path / "out"
    merge = ["merge", str(tiny_model), "--lora", str(ad), "-o", str(out), "-q"]
    _assert_one_line_error(_run([*merge, "--shard-size", "10"]), ["'10' is 10 bytes", "at least 1MB"], out)
    _assert_one_line_error(_run([*merge, "--files-from", str(ad)]), ["adapter", "--files-from", "no tokenizer.json or tokenizer.model"],
                           out)
    assert not out.exists()


@pytest.mark.parametrize("change, words", [({"r": "4"}, ["r must be a positive integer", "'4'"]),
                                           ({"lora_alpha": None}, ["lora_alpha must be a number", "None"]),
                                           ({"alpha_pattern": {"q_proj": "8"}}, ["alpha_pattern['q_proj']"]),
                                           ({"use_rslora": "false"}, ["use_rslora must be true or false"]),
                                           ([], ["expected a JSON object, not list"])])
def test_adapter_config_values_of_the_wrong_type(tiny_model, tmp_path, change, words):
    from quantkit.testing import synthetic
    ad = synthetic.write_lora_adapter(tiny_model, tmp_path / "adapter", r=4)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, **change} if isinstance(change, dict) else change))
    out = tmp_path / "out"
    result = _run(["export", str(tiny_model), "--lora", str(ad), "--gguf", "q8_0", "-o", str(out), "-q"])
    _assert_one_line_error(result, ["adapter_config.json", *words], out)


def test_calibration_holding_part_of_the_evaluation_text_is_refused(tiny_model, tmp_path):
    from quantkit import calibration
    part = tmp_path / "calib.txt"
    part.write_text(calibration._EVAL_TEXT.read_text(encoding="utf-8")[200_000:260_000])
    result = _run(["imatrix", str(tiny_model), "--calib", str(part), "-o", str(tmp_path / "im.gguf"), "-q"])
    _assert_one_line_error(result, ["calib.txt", "lines of the WikiText-2 test split"], tmp_path)
    # a few shared lines (a quotation) are not a copy
    own = tmp_path / "own.txt"
    lines = calibration._EVAL_TEXT.read_text(encoding="utf-8").splitlines()
    quoted = [ln for ln in lines if len(ln.strip()) >= 80][:calibration.EVAL_LINES_REFUSED - 1]
    own.write_text("\n".join(quoted + [f"my own line number {i}, " * 8 for i in range(200)]))
    assert calibration._eval_lines_in(own.read_text()) == (calibration.EVAL_LINES_REFUSED - 1, 209)


def test_bench_gpu_mistakes_are_one_line(tiny_model, tmp_path):
    bad = tmp_path / "catalog.json"
    out = tmp_path / "report"
    bench = ["bench", "--baseline", str(tiny_model), str(tiny_model), "-o", str(out), "-q"]
    for extra, words in [(["--gpus", "rtx9090"], ["--gpus: unknown GPU 'rtx9090'"]),
                         (["--gpu", "Mine=-3"], ["--gpu 'Mine=-3'", "positive size"]),
                         (["--gpu-catalog", str(bad)], ["catalog.json", "not valid JSON"])]:
        bad.write_text("{bad")
        _assert_one_line_error(_run([*bench, *extra]), words, out)
    bad.write_text('{"Mine": "big"}')
    _assert_one_line_error(_run([*bench, "--gpu-catalog", str(bad)]), ["catalog.json", "'Mine'", "positive"], out)
    assert not out.exists()


def test_init_makes_the_directory_and_run_checks_its_values(tmp_path, tiny_model):
    p = tmp_path / "new" / "pipeline.toml"
    assert _run(["init", str(p)]).exit_code == 0 and p.exists()
    for section, words in [('[output]\ndir = ""', ["line 4", "[output] dir must name a directory"]),
                           ("[gptq]\ngroup_size = 0", ["line 4", "group_size must be -1", "not 0"]),
                           ("[gptq]\ndamp = -1.0", ["line 4", "damp must be positive"]),
                           ("residual_scale = 0.5", ["line 3", "residual_scale 0.5", "no residual"])]:
        p.write_text(f'[input]\nbase = "{tiny_model}"\n{section}\n')
        _assert_one_line_error(_run(["run", str(p), "--dry-run"]), words, tmp_path / "new")


def test_an_unexpected_error_is_one_line(tiny_model, tmp_path, monkeypatch):
    import quantkit.export
    def boom(*a, **kw):
        raise RuntimeError("something\nbroke")
    monkeypatch.setattr(quantkit.export, "export_gguf", boom)
    result = _run(["export", str(tiny_model), "--gguf", "q8_0", "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "quantkit: error: RuntimeError: something broke (unexpected: QUANTKIT_DEBUG=1 shows where; please report it)"]
    monkeypatch.setenv("QUANTKIT_DEBUG", "1")
    result = _run(["export", str(tiny_model), "--gguf", "q8_0", "-o", str(tmp_path / "out"), "-q"])
    assert isinstance(result.exception, RuntimeError)


@pytest.mark.parametrize("command", ["merge", "export"])
def test_sigterm_leaves_no_partial_output(command, smollm2_dir, tmp_path):
    """kill (SIGTERM, as timeout, Slurm and docker stop send) cleans up as Ctrl-C does: exit 143, one
    line, and nothing half-written under any name."""
    import signal
    import time

    from quantkit.testing import synthetic
    ad = synthetic.write_lora_adapter(smollm2_dir, tmp_path / "adapter", r=8)
    out = tmp_path / "out"
    args = {"merge": ["merge", str(smollm2_dir), "--lora", str(ad), "-o", str(out)],
            "export": ["export", str(smollm2_dir), "--lora", str(ad), "--gguf", "q8_0,q4_k_m", "-o", str(out)]}[command]
    exe = Path(sys.executable).with_name("quantkit")
    proc = subprocess.Popen([str(exe), *args, "-q"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    # the moment the output is being written: a staging directory (merge) or .partial files (export)
    while not any("partial" in p.name for d in (tmp_path, out) if d.is_dir() for p in d.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "finished before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "quantkit: terminated (SIGTERM); no partial output was kept", err
    left = [p.name for p in tmp_path.rglob("*") if "partial" in p.name]
    assert not left and not out.exists(), (left, out.exists())


def test_bench_refuses_a_broken_gguf_before_scoring(tiny_model, tmp_path):
    out = tmp_path / "report"
    for name, data in [("empty.gguf", b""), ("cut.gguf", b"GGUF\x03\x00\x00\x00" + b"\x05" * 40)]:
        (tmp_path / name).write_bytes(data)
        result = _run(["bench", "--baseline", str(tiny_model), str(tmp_path / name), "-o", str(out), "-q"])
        _assert_one_line_error(result, [name, "not a readable GGUF file"], out)
        assert "ppl" not in result.output and not out.exists()


def test_what_a_killed_run_left_is_swept_by_the_next(tiny_model, tmp_path):
    """SIGKILL leaves half-written names behind; the next export into the same directory, or the next
    merge beside it, removes those whose writer runs no more and that have not changed for a while,
    and leaves alone a running writer's, a recent one's (its writer may run in another container),
    and a previous output caught mid-swap."""
    import time

    from quantkit import outputs
    from quantkit.testing import synthetic
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    left = [out / f".Tiny-Q8_0.gguf.{dead.pid}.partial", tmp_path / f".merged.partial-{dead.pid}-x1y2"]
    kept = [out / f".Tiny-Q4_K_M.gguf.{os.getppid()}.partial", tmp_path / f".merged.partial-{os.getppid()}-z3",
            tmp_path / f".merged.old-{dead.pid}-q9", out / f".Tiny-BF16.gguf.{dead.pid}.partial"]
    for p in left + kept:
        p.mkdir() if "merged" in p.name else p.write_bytes(b"half")
        (p / "shard").write_bytes(b"half") if p.is_dir() else None
    then = time.time() - outputs.STALE_AFTER_S - 60
    for p in left + kept[:3]:                   # the last one is recent
        for q in [p, *p.rglob("*")] if p.is_dir() else [p]:
            os.utime(q, (then, then))
    assert _run(["export", str(tiny_model), "--gguf", "q8_0", "-o", str(out), "-q"]).exit_code == 0
    assert not left[0].exists() and left[1].exists() and all(p.exists() for p in kept)
    ad = synthetic.write_lora_adapter(tiny_model, tmp_path / "adapter", r=4)
    assert _run(["merge", str(tiny_model), "--lora", str(ad), "-o", str(tmp_path / "merged"), "-q"]).exit_code == 0
    assert not left[1].exists() and all(p.exists() for p in kept)


def test_exporting_dot_names_the_model_after_its_folder(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_model)
    assert _run(["export", ".", "--gguf", "q8_0", "-o", str(tmp_path / "out"), "-q"]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    assert _run(["export", str(tiny_model), "--gguf", "q8_0", "-o", str(tmp_path / "ref"), "-q"]).exit_code == 0
    (dot,), (ref,) = (tmp_path / "out").glob("*.gguf"), (tmp_path / "ref").glob("*.gguf")
    assert dot.name == ref.name and dot.read_bytes() == ref.read_bytes()


def test_an_adapter_that_overflows_a_finite_base_is_named(tiny_model, tmp_path):
    # the base is finite; the merged sum is not: the message names what was merged in, not the base
    from safetensors.torch import load_file, save_file

    from quantkit.testing import synthetic
    ad = synthetic.write_lora_adapter(tiny_model, tmp_path / "adapter", r=4)
    f = ad / "adapter_model.safetensors"
    t = load_file(f)
    t = {k: (v.float() * 0 + 1e38).to(v.dtype) if "layers.1.self_attn.v_proj" in k else v for k, v in t.items()}
    save_file(t, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    result = _run(["merge", str(tiny_model), "--lora", str(ad), "-o", str(out), "-q"])
    _assert_one_line_error(result, [f"merging {ad} into it gives NaN or Inf", "v_proj"], out)
    assert not out.exists()
