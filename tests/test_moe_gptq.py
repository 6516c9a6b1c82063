"""GPTQ of MoE models (issue 23) on one-layer tiny checkpoints of every MoE family, through the CLI.

References that are not ours: transformers 5 loads the compressed-tensors directory (compressed-tensors
decompresses each expert and transformers fuses them into its experts module) and runs the float and
the quantized models; the AutoGPTQ directory is read with AutoGPTQ's own dequantization
(quantkit.testing.gptq_ref); the routing that decides which experts had too few tokens is the one
transformers' forward returns (output_router_logits).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from quantkit import families
from quantkit.cli import main
from quantkit.testing import synthetic
from quantkit.testing.gptq_ref import autogptq_dequantize

FIX = Path(__file__).parent / "fixtures" / "tokenizers"
CALIB = Path(__file__).parent.parent / "docs" / "kernels.md"        # any English that is not WikiText
SAMPLES, SEQLEN = 8, 128


def tiny_preset(fam) -> str:
    return next(p for p in fam.presets if p.endswith("-tiny"))


MOE = sorted(name for name, f in families.FAMILIES.items()
             if f.fixture is not None and families.hparams_from_config(synthetic.preset_config(tiny_preset(f))).n_expert)


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module", params=MOE)
def moe(request, tmp_path_factory):
    """(family, the float checkpoint, GPTQ's directories, RTN's compressed-tensors one, GPTQ's stderr,
    the calibration tokens), GPTQ and RTN 4-bit g64 through `quantkit export`."""
    pytest.importorskip("compressed_tensors")
    fam = families.FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = synthetic.write_checkpoint(root / f"{request.param}-tiny",
                                       synthetic.preset_config(tiny_preset(fam), num_hidden_layers=1),
                                       FIX / fam.fixture.tokenizer)
    # on the CPU (float32) wherever the tests run: the routing checks compare with a float32 forward
    common = ["--group-size", 64, "--calib", CALIB, "--calib-samples", SAMPLES, "--calib-seqlen", SEQLEN,
              "--device", "cpu"]
    r = run_cli("export", model, "--gptq", *common, "-o", root / "gptq")
    assert r.exit_code == 0, r.output
    rtn = run_cli("export", model, "--gptq", "--gptq-method", "rtn", "--gptq-format", "compressed-tensors", *common,
                  "-q", "-o", root / "rtn")
    assert rtn.exit_code == 0, rtn.output
    from quantkit.layerwise import text_tokens
    tokens = text_tokens(model, CALIB, SAMPLES, SEQLEN)
    return fam, model, root / "gptq", root / "rtn" / "gptq-ct", r.stderr, tokens


def test_moe_family_list_is_not_empty():
    assert set(MOE) == {"mixtral", "qwen2moe", "qwen3moe"}


def _load(d):
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(d, device_map="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        m(torch.tensor([[1]]))      # compressed-tensors decompresses on the first forward of the whole model
    return m


def test_gptq_beats_round_to_nearest_on_the_calibration_tokens(moe):
    _, model_dir, gptq_dir, rtn_dir, _, tokens = moe
    _assert_gptq_beats_rtn(model_dir, gptq_dir / "gptq-ct", rtn_dir, tokens)


@pytest.mark.gpu
def test_cuda_gptq_beats_round_to_nearest_on_the_calibration_tokens(moe, tmp_path):
    """The same export on CUDA (bf16 compute, the model's routing in bf16), read back on the CPU."""
    _, model_dir, _, rtn_dir, _, tokens = moe
    r = run_cli("export", model_dir, "--gptq", "--gptq-format", "compressed-tensors", "--group-size", 64,
                "--calib", CALIB, "--calib-samples", SAMPLES, "--calib-seqlen", SEQLEN, "--device", "cuda", "-q",
                "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    _assert_gptq_beats_rtn(model_dir, tmp_path / "out" / "gptq-ct", rtn_dir, tokens)


def _assert_gptq_beats_rtn(model_dir, gptq_ct, rtn_ct, tokens):
    """Through transformers: the whole model's KL to the float model on two calibration samples, and the
    MoE block's output error on the float model's own block inputs (same routing: the router stays fp16)."""
    ref, gptq, rtn = _load(model_dir), _load(gptq_ct), _load(rtn_ct)
    block_in = []
    h = ref.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: block_in.append(a[0].detach()))
    kl, block = {}, {}
    with torch.no_grad():
        ref.model(tokens)                   # the MoE block's inputs, every calibration token
        h.remove()
        want = ref(tokens[:2]).logits.log_softmax(-1)       # KL on two samples (150k-word vocabularies)
        x = block_in[0]
        y = ref.model.layers[0].mlp(x)
        for name, m in (("gptq", gptq), ("rtn", rtn)):
            got = m(tokens[:2]).logits.log_softmax(-1)
            kl[name] = torch.nn.functional.kl_div(got, want, log_target=True, reduction="none").sum(-1).mean().item()
            block[name] = (m.model.layers[0].mlp(x) - y).pow(2).sum().item()
    print(f"{model_dir.name}: KL {kl['gptq']:.3g} vs RTN {kl['rtn']:.3g}; "
          f"MoE block error {block['gptq']:.4g} vs RTN {block['rtn']:.4g}")
    assert 0 < kl["gptq"] < 0.8 * kl["rtn"], kl
    assert 0 < block["gptq"] < 0.95 * block["rtn"], block


def test_experts_are_written_one_module_each_and_read_back_alike_by_both_loaders(moe):
    """OUT/gptq holds every expert's projections as AutoGPTQ modules under the checkpoint's own names
    (what vLLM's MoE loaders read); AutoGPTQ's dequantization of them equals the fused experts
    transformers builds from OUT/gptq-ct, bit for bit; the router stays fp16."""
    fam, model_dir, gptq_dir, _, _, _ = moe
    spec = fam.experts_layout
    cfg = json.loads((gptq_dir / "gptq" / "config.json").read_text())
    n = families.hparams_from_config(cfg).n_expert
    t = load_file(gptq_dir / "gptq" / "model.safetensors")
    pre = "model.layers.0."
    assert not [k for k in t if "gate_up_proj" in k or k.endswith(("_proj.weight", ".w1.weight", ".w2.weight",
                                                                     ".w3.weight"))]
    assert t[f"{pre}{spec.router[1]}.weight"].dtype == torch.float16            # the router, unquantized
    ct = _load(gptq_dir / "gptq-ct")
    experts = ct.get_submodule(f"{pre}{spec.module}")
    f = experts.down_proj.shape[2]
    for e in range(n):
        deq = {}
        for m in spec.linears:
            p = f"{pre}{spec.expert.format(e=e)}.{m}"
            assert t[f"{p}.qweight"].dtype == torch.int32 and t[f"{p}.scales"].dtype == torch.float16
            deq[m], _, _ = autogptq_dequantize(t[f"{p}.qweight"], t[f"{p}.qzeros"], t[f"{p}.scales"], t[f"{p}.g_idx"],
                                               cfg["quantization_config"]["bits"])
        gate, up, down = (deq[m].half().float() for m in spec.linears)
        assert torch.equal(experts.gate_up_proj[e][:f], gate) and torch.equal(experts.gate_up_proj[e][f:], up), e
        assert torch.equal(experts.down_proj[e], down), e
    for m in spec.shared:           # Qwen2-MoE's shared expert: a dense MLP, quantized; its gate is not
        assert f"{pre}{m}.qweight" in t
    if spec.shared:
        assert t[f"{pre}mlp.shared_expert_gate.weight"].dtype == torch.float16


def test_experts_with_too_few_routed_tokens_are_rounded_to_nearest_and_counted(moe):
    """An expert projection is GPTQ'd only from as many routed tokens as it has input columns. Which
    had fewer comes from transformers' own routing of the calibration tokens in the quantized model
    (its router sees what ours saw: the quantized attention before it)."""
    fam, model_dir, gptq_dir, rtn_dir, stderr, tokens = moe
    spec = fam.experts_layout
    q = _load(gptq_dir / "gptq-ct")
    cfg = q.config
    k, n = cfg.num_experts_per_tok, families.hparams_from_config(cfg.to_dict()).n_expert
    with torch.no_grad():
        logits = q.model(tokens, output_router_logits=True).router_logits[0]         # [tokens, experts]
    counts = torch.bincount(torch.topk(logits, k, dim=-1).indices.reshape(-1), minlength=n)
    experts = q.get_submodule(f"model.layers.0.{spec.module}")
    h, f = experts.gate_up_proj.shape[2], experts.down_proj.shape[2]
    expected = sum(2 * int(c < h) + int(c < f) for c in counts.tolist())
    note = json.loads((gptq_dir / "gptq-ct" / "quantkit_gptq.json").read_text())
    print(f"{model_dir.name}: {expected} of {3 * n} expert projections rounded to nearest; routed tokens {counts.tolist()}")
    assert (note["experts"], note["experts_rtn"]) == (3 * n, expected), (counts, note)
    msg = re.search(r"GPTQ: (\d+) of (\d+) expert projections saw fewer routed calibration tokens", stderr)
    assert msg and (int(msg[1]), int(msg[2])) == (expected, 3 * n), stderr
    assert 0 < expected < 3 * n or fam.name == "qwen3moe", counts     # mixtral, qwen2moe: both kinds here
    # those experts hold round-to-nearest's codes: the same weights as in the RTN export
    rtn = _load(rtn_dir).get_submodule(f"model.layers.0.{spec.module}")
    for e, c in enumerate(counts.tolist()):
        same = torch.equal(experts.down_proj[e], rtn.down_proj[e])
        assert same == (c < f), (e, c)


def test_a_group_size_that_does_not_divide_the_experts_is_refused(tmp_path):
    fam = families.FAMILIES["qwen3moe"]
    model = synthetic.write_checkpoint(tmp_path / "m", synthetic.preset_config(
        tiny_preset(fam), num_hidden_layers=1, moe_intermediate_size=192), FIX / fam.fixture.tokenizer)
    r = run_cli("export", model, "--gptq", "--group-size", 128, "--gptq-method", "rtn", "-o", tmp_path / "out")
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "layer model.layers.0.mlp.experts.*.down_proj.weight: input dimension 192 is not a multiple of " \
           "--group-size 128" in lines[0] and str(model) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
