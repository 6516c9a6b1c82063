"""Decode speed (bench/decode.py): the bytes a decoded token reads, against transformers' and
llama.cpp's own counts, the active parameters of a mixture of experts, and the estimates'
calibration on measured GPUs."""
from __future__ import annotations

import json

import pytest
import torch

from quantkit.bench import decode, vram
from quantkit.export import export_gguf
from quantkit.plan import parse_variants
from quantkit.testing import synthetic

transformers = pytest.importorskip("transformers")


def test_a_dense_models_token_reads_every_weight(tiny_model, tmp_path):
    """Tied: the output reads the whole embedding; so every parameter, as transformers counts them;
    and the GGUF's every tensor, as llama.cpp sizes the model."""
    llama_cpp = pytest.importorskip("llama_cpp")
    m = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    assert m.config.tie_word_embeddings
    assert decode.active_weight_bytes(tiny_model, "hf") == 2 * m.num_parameters()
    res = export_gguf(tiny_model, parse_variants("q8_0"), tmp_path, progress=False)
    path = next(iter(res.files.values()))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=False)
    try:
        size = llama_cpp.llama_model_size(llm.model)
    finally:
        llm.close()
    assert decode.active_weight_bytes(path, "gguf") == size


def test_a_mixture_of_experts_reads_its_active_experts(tmp_path):
    """Qwen3-MoE: the shared tensors plus num_experts_per_tok / num_experts of the experts', counted
    from transformers' parameters (names and sizes of its own)."""
    cfg = synthetic.preset_config("qwen3moe-tiny", num_hidden_layers=2, tie_word_embeddings=False)
    d = synthetic.write_checkpoint(tmp_path / "moe", cfg)
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    k, e = m.config.num_experts_per_tok, m.config.num_experts
    expert = sum(p.numel() for n, p in m.named_parameters() if ".experts." in n)
    embed = m.get_input_embeddings().weight.numel()
    want = 2 * (m.num_parameters() - expert - embed) + 2 * expert * k / e
    arch = vram.Arch.from_config(json.loads((d / "config.json").read_text()))
    assert (arch.experts, arch.experts_used) == (e, k) and k < e
    assert decode.active_weight_bytes(d, "hf", arch.experts, arch.experts_used) == pytest.approx(want, abs=2)


def test_estimates_scale_with_bandwidth_from_the_measured_gpu():
    rows = {"base": 2_000_000, "q4": 600_000}
    measured = [{"row": "q4", "gpu_type": "A100", "total_mib": 81920, "device": "cuda:0", "node": "n1", "host": "h",
                 "decode": {"tokens_per_s": 1000.0}}]
    d = decode.summarize(rows, measured, dict(vram.GPU_CATALOG))
    assert d["calibrated_on"] == ["A100 80GB"]
    assert d["per_gpu"]["A100 80GB"]["q4"]["source"] == "measured"
    bw = decode.BANDWIDTH_GBS
    assert d["per_gpu"]["H100 80GB"]["q4"]["tokens_per_s"] == pytest.approx(1000 * bw["H100 80GB"] / bw["A100 80GB"],
                                                                              rel=1e-3)
    # bytes per token: the baseline reads 2_000_000 / 600_000 times more
    assert d["per_gpu"]["A100 80GB"]["base"]["tokens_per_s"] == pytest.approx(1000 * 0.3, rel=1e-3)
    # a measurement on a node's CPU is shown as such and calibrates nothing
    cpu = [dict(measured[0], device="cpu")]
    d = decode.summarize(rows, cpu, dict(vram.GPU_CATALOG))
    assert d["calibrated_on"] == [] and d["efficiency"] == decode.DEFAULT_EFFICIENCY
    assert d["per_gpu"]["A100"]["q4"]["source"].startswith("measured on the node's CPU")


@pytest.mark.parametrize("name,mib,want", [("A100", 40960, "A100 40GB"), ("NVIDIA A100-SXM4-80GB", 81559, "A100 80GB"),
                                           ("A10", None, "A10 24GB"), ("NVIDIA GeForce RTX 4090", 24564,
                                                                       "RTX 4090 24GB"), ("TPU-V4", None, None),
                                           ("NVIDIA H100 80GB HBM3", 81559, "H100 80GB"), ("NVIDIA L40S", 46068, None),
                                           ("NVIDIA GeForce RTX 3060 Ti", 8192, None), ("NVIDIA H100 PCIe", 81559, None)])
def test_a_measured_gpu_is_named_as_the_catalog_names_it(name, mib, want):
    assert decode.catalog_name(name, mib, dict(vram.GPU_CATALOG)) == want


def test_decode_is_measured_on_both_backends(tiny_model, tmp_path):
    pytest.importorskip("llama_cpp")
    res = export_gguf(tiny_model, parse_variants("q8_0"), tmp_path, progress=False)
    for path, kind in ((tiny_model, "hf"), (next(iter(res.files.values())), "gguf")):
        m = decode.measure(path, kind, "cpu")
        assert m["tokens_per_s"] > 0 and m["new"] == decode.NEW
