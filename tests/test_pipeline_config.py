"""pipeline.toml parsing (issue 7, first part): the example `quantkit init` will write parses back to
tomllib's reading of it; every mistake names the key and its line."""
from __future__ import annotations

import tomllib

import pytest

from quantkit.errors import InputError
from quantkit.pipeline_config import SCHEMA, example, key_lines, parse


def test_the_example_parses_back_to_what_tomllib_reads(tmp_path):
    p = tmp_path / "pipeline.toml"
    p.write_text(example())
    raw = tomllib.loads(example())
    cfg = parse(p)
    assert set(raw) == set(SCHEMA)
    for section, keys in raw.items():
        assert set(keys) == set(SCHEMA[section]), section
        for key, value in keys.items():
            if key in ("base", "residual", "dir", "calib", "text") and value:
                assert cfg[section][key] == str((tmp_path / value).resolve())
            elif key == "lora":
                assert cfg[section][key] == [str((tmp_path / v).resolve()) for v in value]
            else:
                assert cfg[section][key] == value, (section, key)


def test_defaults_fill_what_is_left_out(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[input]\nbase = "m"\n')
    cfg = parse(p)
    assert cfg["gguf"]["types"] == ["q4_k_m", "q5_k_m", "q8_0"] and cfg["gptq"]["enabled"] is False
    assert cfg["output"]["dir"] == str((tmp_path / "out").resolve()) and cfg["input"]["lora"] == []


def test_key_lines_by_hand():
    text = '# c\n[input]\nbase = "x"\nlora = [\n  "a",\n  "b = c",\n]\n\n[gguf]\n"types" = []\n'
    assert key_lines(text) == {("input", ""): 2, ("input", "base"): 3, ("input", "lora"): 4,
                               ("gguf", ""): 9, ("gguf", "types"): 10}


@pytest.mark.parametrize("text,fragments", [
    ('[input]\nbase = "m"\n[gptq]\nbits = 4\ngroup_sise = 64\n', ["line 5", "group_sise", "[gptq]", "group_size"]),
    ('[input]\nbase = "m"\n\n[gguf]\ntypes = "q4_k_m"\n', ["line 5", "[gguf] types", "a list", "'q4_k_m'"]),
    ('[input]\nbase = "m"\n[gptq]\nenabled = "yes"\n', ["line 4", "enabled", "true or false"]),
    ('[input]\nbase = "m"\n[bench]\nctx = true\n', ["line 4", "ctx", "an integer"]),
    ('[input]\nbase = "m"\n[benchmark]\nctx = 1\n', ["line 3", "unknown section [benchmark]"]),
    ('[input]\nbase = "m"\n[gguf]\ntypes = ["q4_k_m", 8]\n', ["line 4", "types", "a string items", "8"]),
    ('[input]\nbase = "m"\nlora = ["a", "b"]\nlora_weights = [1.0]\n', ["line 4", "1 values for 2 adapters"]),
    ('[input]\nbase = "m"\n[gptq]\nbits = 3\n', ["line 4", "bits must be 2, 4 or 8"]),
    ('[input]\nbase = "m"\n[gptq]\ncalib_seqlen = -1\n', ["line 4", "calib_seqlen must be 0 (by device) or positive"]),
    ('[output]\ndir = "o"\n', ["[input] base is required"]),
    ('[input]\nbase = "m"\n[gguf\n', ["not valid TOML", "line 3"]),
    ('input = 3\n', ["line 1", "'input' must be a [section]"]),
])
def test_mistakes_name_the_key_and_the_line(tmp_path, text, fragments):
    p = tmp_path / "pipeline.toml"
    p.write_text(text)
    with pytest.raises(InputError) as e:
        parse(p)
    msg = str(e.value)
    assert "\n" not in msg and "pipeline.toml" in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_unreadable_file(tmp_path):
    with pytest.raises(InputError, match="cannot read the pipeline file"):
        parse(tmp_path / "missing.toml")
