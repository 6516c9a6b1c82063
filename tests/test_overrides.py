"""llama-quantize's per-tensor overrides: --tensor-type REGEX=TYPE, --output-tensor-type,
--token-embedding-type and --pure. Whole files byte-identical to llama_model_quantize given the same
parameters (its params.tt_overrides, output_tensor_type, token_embedding_type and pure), and bad
overrides refused before any work."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.bench import gguf_diff
from quantkit.cli import main
from quantkit.testing import llamacpp_ref, synthetic

pytest.importorskip("llama_cpp")
FIX = Path(__file__).parent / "fixtures" / "tokenizers"

# name: (llama_model_quantize's parameters, our flags)
CASES = {
    "tensor-types": (dict(tensor_types=[("attn_v", "q8_0"), (r"blk\.[0-2]\.ffn_down", "q5_k")]),
                     ["--tensor-type", "attn_v=q8_0", "--tensor-type", r"blk\.[0-2]\.ffn_down=q5_k"]),
    # one attn_v decided by hand: the mixture's layer count for the others skips it, as llama.cpp's does
    "one-attn-v": (dict(tensor_types=[(r"blk\.0\.attn_v", "q4_0")]), ["--tensor-type", r"blk\.0\.attn_v=q4_0"]),
    "named-tensors": (dict(output_tensor_type="q8_0", token_embedding_type="q4_k", tensor_types=[("output", "q4_0")]),
                      ["--output-tensor-type", "q8_0", "--token-embedding-type", "q4_k", "--tensor-type", "output=q4_0"]),
    "iq4-tensor-types": (dict(tensor_types=[("ffn_up", "iq4_xs"), ("attn_q", "iq4_nl")]),
                         ["--tensor-type", "ffn_up=iq4_xs", "--tensor-type", "attn_q=iq4_nl"]),
    "pure": (dict(pure=True), ["--pure"]),
    "pure-and-types": (dict(pure=True, tensor_types=[("ffn_up", "q4_0")]), ["--pure", "--tensor-type", "ffn_up=q4_0"]),
}
VARIANTS = ["q4_k_m", "q5_k_s"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    root = tmp_path_factory.mktemp("overrides")
    m = synthetic.write_checkpoint(root / "llama3-tiny", synthetic.preset_config("llama3-tiny"), FIX / "llama3")
    return m, llamacpp_ref.convert_hf_to_gguf(m, root / "ref-bf16.gguf", "bf16")


@pytest.mark.parametrize("case", sorted(CASES))
def test_overrides_are_byte_identical_to_llama_quantize(model, case, tmp_path):
    m, bf16 = model
    params, flags = CASES[case]
    r = CliRunner().invoke(main, ["export", str(m), "--gguf", ",".join(VARIANTS), *flags, "-q", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for v in VARIANTS:
        ref = llamacpp_ref.llama_quantize(bf16, tmp_path / f"ref-{v}.gguf", v, **params)
        (ours,) = tmp_path.glob(f"*-{v.upper()}.gguf")
        assert gguf_diff.file_difference(ours, ref) is None, f"{case} {v}"
    # and the overrides did something: the types differ from the plain mixture's
    plain = llamacpp_ref.llama_quantize(bf16, tmp_path / "plain.gguf", "q4_k_m")
    assert gguf_diff.tensors(plain) != gguf_diff.tensors(next(tmp_path.glob("*-Q4_K_M.gguf")))


def test_dry_run_names_the_override(model):
    m, _ = model
    r = CliRunner().invoke(main, ["export", str(m), "--gguf", "q4_k_m", "--tensor-type", "attn_v=q8_0", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert any(line.startswith("blk.0.attn_v.weight") and "Q8_0" in line and "override: --tensor-type attn_v" in line
               for line in r.output.splitlines()), r.output


@pytest.mark.parametrize("flags, fragments", [
    (["--tensor-type", "attn_v=q9_9"], ["--tensor-type 'attn_v=q9_9'", "unknown type 'q9_9'"]),
    (["--tensor-type", "attn_v"], ["expected REGEX=TYPE"]),
    (["--tensor-type", "attn_v(=q8_0"], ["not a regular expression"]),
    (["--tensor-type", "attn_vv=q8_0"], ["'attn_vv' matches no weight matrix"]),
    (["--output-tensor-type", "q7"], ["--output-tensor-type", "unknown type 'q7'"]),
    (["--tensor-type", "attn_v=q4_k"], ["attn_v", "q4_k needs rows divisible by 256", "64 columns"]),
    (["--tensor-type", "attn_v=iq4_xs"], ["attn_v", "iq4_xs needs rows divisible by 256", "64 columns"]),
    (["--token-embedding-type", "iq4_xs"], ["--token-embedding-type", "iq4_xs needs rows divisible by 256"]),
])
def test_bad_overrides_are_refused_before_any_work(tiny_model, tmp_path, flags, fragments):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["export", str(tiny_model), "--gguf", "q8_0", *flags, "-q", "-o", str(out)])
    lines = list(dict.fromkeys(line for line in r.output.splitlines() if line.strip()))
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("quantkit: error: "), r.output
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    assert not out.exists()
