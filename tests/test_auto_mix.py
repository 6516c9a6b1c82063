"""`--gguf auto:…`: a type per tensor measured on the model, under a size budget.

References: the knapsack against exhaustive search; the measured sensitivity of a tensor against a
whole-model transformers forward with that tensor replaced by ggml's own quantize/dequantize; the
file against llama_model_quantize given the same type for every tensor (--tensor-type), so that it
is an ordinary llama.cpp file; its size against the named type's file.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from quantkit import mix
from quantkit.bench import gguf_diff
from quantkit.cli import main
from quantkit.testing import llamacpp_ref, synthetic

FIX = Path(__file__).parent / "fixtures" / "tokenizers"


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_the_exhaustive_optimum(seed):
    rng = np.random.default_rng(seed)
    options = [[(int(b), float(c)) for b, c in zip(sorted(rng.integers(10, 400, size=k)),
                                                    sorted(rng.random(k) * 5, reverse=True))]
               for k in rng.integers(2, 5, size=5)]
    smallest, largest = sum(o[0][0] for o in options), sum(o[-1][0] for o in options)
    for budget in (smallest - 1, smallest, (smallest + largest) // 2, largest + 5):
        best, arg = float("inf"), None
        for combo in itertools.product(*[range(len(o)) for o in options]):
            size = sum(options[i][j][0] for i, j in enumerate(combo))
            cost = sum(options[i][j][1] for i, j in enumerate(combo))
            if size <= budget and cost < best:
                best, arg = cost, combo
        got = mix.solve(options, budget)
        if arg is None:
            assert got is None
            continue
        assert sum(options[i][j][0] for i, j in enumerate(got)) <= budget
        assert sum(options[i][j][1] for i, j in enumerate(got)) == pytest.approx(best)


def test_a_large_budget_is_solved_in_steps_that_never_overshoot():
    rng = np.random.default_rng(7)
    options = [[(int(b), float(c)) for b, c in zip(sorted(rng.integers(10**6, 10**8, size=4)),
                                                    sorted(rng.random(4), reverse=True))] for _ in range(40)]
    budget = sum(o[1][0] for o in options)
    got = mix.solve(options, budget)
    assert sum(options[i][j][0] for i, j in enumerate(got)) <= budget
    # at least as good as the feasible "second option everywhere"
    assert sum(options[i][j][1] for i, j in enumerate(got)) <= sum(o[1][1] for o in options) + 1e-12


@pytest.fixture(scope="module")
def auto_export(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    root = tmp_path_factory.mktemp("auto")
    # 256 wide (the K-quant and IQ4_XS ladders), a 32k SentencePiece vocabulary, untied output
    m = synthetic.write_checkpoint(root / "mistral-tiny", synthetic.preset_config("mistral-tiny"), FIX / "mistral-v3")
    calib = root / "calib.txt"         # calibration text: this project's own docs
    calib.write_text("\n\n".join(p.read_text() for p in sorted((Path(__file__).parents[1] / "docs").glob("*.md"))))
    out = root / "out"
    r = CliRunner().invoke(main, ["export", str(m), "--gguf", "q4_k_m,auto:q4_k_m", "--calib", str(calib),
                                  "--auto-samples", "2", "--auto-seqlen", "64", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    return m, calib, out, json.loads((out / "export.json").read_text())


def test_auto_file_is_llama_quantize_given_the_same_types_and_no_larger(auto_export, tmp_path):
    m, _, out, note = auto_export
    types = note["auto"]["files"]["auto-q4_k_m"]["types"]
    (ours,) = out.glob("*-AUTO-Q4_K_M.gguf")
    (q4,) = [p for p in out.glob("*-Q4_K_M.gguf") if "AUTO" not in p.name]
    bf16 = llamacpp_ref.convert_hf_to_gguf(m, tmp_path / "ref-bf16.gguf", "bf16")
    ref = llamacpp_ref.llama_quantize(bf16, tmp_path / "ref.gguf", "q4_k_m",
                                      tensor_types=[(f"^{re.escape(n)}$", t) for n, t in types.items()])
    assert gguf_diff.file_difference(ours, ref) is None
    assert ours.stat().st_size <= q4.stat().st_size
    plain = {name: qtype for name, qtype, _ in gguf_diff.tensors(q4)}
    assert any(plain[n] != t.upper() for n, t in types.items()), "the mix chose Q4_K_M's types everywhere"
    f = note["auto"]["files"]["auto-q4_k_m"]
    assert f["tensor_bytes"] <= f["budget_bytes"] and f["predicted_kld"] <= f["reference_predicted_kld"] * (1 + 1e-9)


def test_measured_sensitivity_is_a_whole_model_forward(auto_export):
    """A tensor's probe: its model's KL divergence from the float model, whole vocabulary, with that
    tensor alone quantized (here by ggml itself) and everything run by transformers end to end."""
    import gguf
    import transformers

    from quantkit import layerwise
    from quantkit.testing import ggml_ref

    if not ggml_ref.available():
        pytest.skip("ggml's reference quantizers (llama-cpp-python) not built")
    m, calib, _, note = auto_export
    tokens = layerwise.text_tokens(m, calib, 2, 64)
    model = transformers.AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()
    with torch.no_grad():
        base = torch.log_softmax(model(tokens).logits.double(), -1)
    for name, module in (("blk.3.ffn_down.weight", model.model.layers[3].mlp.down_proj),
                         ("blk.0.attn_v.weight", model.model.layers[0].self_attn.v_proj)):
        s = note["auto"]["sensitivity"][name]
        w = module.weight.data.clone()
        qtype = int(gguf.GGMLQuantizationType[s["probe"].upper()])
        q = ggml_ref.ggml_dequantize(ggml_ref.ggml_quantize(w.numpy(), qtype), qtype, *w.shape)
        module.weight.data = torch.from_numpy(np.asarray(q, dtype=np.float32).reshape(w.shape))
        with torch.no_grad():
            logq = torch.log_softmax(model(tokens).logits.double(), -1)
        module.weight.data = w
        kl = float((base.exp() * (base - logq)).sum(-1).mean())
        assert s["probe_kld"] == pytest.approx(kl, rel=2e-3, abs=1e-7), name


@pytest.mark.parametrize("spec, fragment", [
    ("auto:q9_k", "auto needs a size"), ("auto:1", "auto needs a size"), ("auto", "auto needs a size"),
])
def test_bad_auto_targets_are_one_line(tiny_model, tmp_path, spec, fragment):
    r = CliRunner().invoke(main, ["export", str(tiny_model), "--gguf", spec, "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and fragment in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_auto_on_a_merge_on_the_fly_is_refused_before_any_work(tiny_model, tmp_path):
    adapter = synthetic.write_lora_adapter(tiny_model, tmp_path / "adapter", r=4, alpha=8)
    r = CliRunner().invoke(main, ["export", str(tiny_model), "--lora", str(adapter), "--gguf", "auto:q8_0",
                                  "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "merge it first" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()


def test_auto_bits_per_weight_stays_within_its_budget(tiny_model, tmp_path):
    r = CliRunner().invoke(main, ["export", str(tiny_model), "--gguf", "auto:5.2", "--auto-samples", "1",
                                  "--auto-seqlen", "32", "-q", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (f,) = tmp_path.glob("*-AUTO-5.2BPW.gguf")
    values = sum(int(np.prod(shape)) for _, _, shape in gguf_diff.tensors(f))
    data = sum(t.n_bytes for t in gguf_diff.reader(f).tensors)
    assert data <= 5.2 * values / 8
    assert {qtype for _, qtype, _ in gguf_diff.tensors(f)} - {"F32"} <= {"Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
