"""Importance matrices of MoE models (issue 23): per-expert sums and counts, as llama-imatrix's
MUL_MAT_ID branch records them, on two-layer tiny checkpoints of every MoE family.

The reference is transformers' own whole-model forward: the router logits it returns
(output_router_logits) with the top-k routing recomputed from them here, the hidden states caught at
the MoE block's input, and each expert's gate/up/down recomputed in float64 from the checkpoint's
own per-expert tensors. The whole-file checks with an imatrix (every type, byte-identical to
llama_model_quantize) are in test_gguf_export.py.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from quantkit import families
from quantkit.cli import main
from quantkit.hfmodel import HFModel
from quantkit.imatrix import Imatrix, collect, linear_names, load, write
from quantkit.testing import synthetic

FIX = Path(__file__).parent / "fixtures" / "tokenizers"


def tiny_preset(fam) -> str:
    return next(p for p in fam.presets if p.endswith("-tiny"))


# every family whose tiny checkpoint has experts
MOE = sorted(name for name, f in families.FAMILIES.items()
             if f.fixture is not None and families.hparams_from_config(synthetic.preset_config(tiny_preset(f))).n_expert)


@pytest.fixture(scope="module", params=MOE)
def moe(request, tmp_path_factory):
    """(family, a two-layer tiny checkpoint of it, calibration tokens, the imatrix quantkit collects)."""
    fam = families.FAMILIES[request.param]
    model = synthetic.write_checkpoint(tmp_path_factory.mktemp(request.param) / f"{request.param}-tiny",
                                       synthetic.preset_config(tiny_preset(fam), num_hidden_layers=2),
                                       FIX / fam.fixture.tokenizer)
    tokens = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    return fam, model, tokens, collect(model, tokens=tokens, progress=False)


def silu(x):
    return x * torch.sigmoid(x)


def test_moe_family_list_is_not_empty():
    assert set(MOE) == {"mixtral", "qwen2moe", "qwen3moe"}


def test_expert_sums_and_counts_follow_the_routing_of_transformers_forward(moe):
    import safetensors.torch
    import transformers

    fam, model_dir, tokens, im = moe
    hf = HFModel(model_dir)
    hp = families.hparams_of(hf)
    stacks = {t.gguf_name: t.parts for t in fam.source_tensors(hf, hp) if t.parts}
    weights = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        weights |= {k: v.to(torch.float64) for k, v in safetensors.torch.load_file(f).items()}
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    ref_sums, ref_counts, block_in, linear_in = {}, {}, {}, {}

    def add(name, x, rows=1, row=0):
        ref_sums.setdefault(name, torch.zeros(rows, x.shape[-1], dtype=torch.float64))[row] += (x * x).sum(0)
        ref_counts.setdefault(name, np.zeros(rows, dtype=np.int64))[row] += x.shape[0]

    def catch(store, key):
        def pre(module, args):
            store.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        return pre

    names = linear_names(hf)            # the checkpoint's matrices (attention, shared expert), by module name
    for mname, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and f"{mname}.weight" in names:
            m.register_forward_pre_hook(catch(linear_in, names[f"{mname}.weight"]))
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(catch(block_in, i))     # the MoE block's input
    logits = {}
    with torch.no_grad():
        for sample in tokens:           # one sample at a time, as the layer-by-layer pass runs them
            out = model(input_ids=sample[None], use_cache=False, output_router_logits=True)
            for i, lg in enumerate(out.router_logits):
                logits.setdefault(i, []).append(lg.double())

    for name, xs in linear_in.items():
        for x in xs:
            add(name, x)
    k, n = hp.config["num_experts_per_tok"], hp.n_expert
    for i in range(hp.n_layer):
        x, lg = torch.cat(block_in[i]), torch.cat(logits[i])
        add(f"blk.{i}.ffn_gate_inp.weight", x)
        chosen = torch.topk(torch.softmax(lg, dim=-1), k, dim=-1).indices       # [tokens, k]
        gate, up, down = (stacks[f"blk.{i}.ffn_{m}_exps.weight"] for m in ("gate", "up", "down"))
        for e in range(n):
            rows = x[(chosen == e).any(-1)]
            h = silu(rows @ weights[gate[e]].T) * (rows @ weights[up[e]].T)
            add(f"blk.{i}.ffn_gate_exps.weight", rows, n, e)
            add(f"blk.{i}.ffn_up_exps.weight", rows, n, e)
            add(f"blk.{i}.ffn_down_exps.weight", h, n, e)
            assert weights[down[e]].shape[1] == h.shape[1]

    assert set(ref_sums) == set(im.sums)
    for name in ref_sums:
        assert np.array_equal(im.counts[name], ref_counts[name]), name
        np.testing.assert_allclose(im.sums[name], ref_sums[name].float().numpy(), rtol=2e-4, atol=1e-6,
                                   err_msg=name)
    # the routing matters: every token goes to k of n experts, not to all (a per-token count is not it)
    exps = [n_ for n_ in im.counts if "_exps" in n_]
    assert len(exps) == 3 * hp.n_layer and all(im.sums[n_].shape == (n, im.sums[n_].shape[1]) for n_ in exps)
    assert all(im.counts[n_].sum() == k * tokens.numel() for n_ in exps)
    assert any(len(set(im.counts[n_])) > 1 for n_ in exps)


def test_expert_entries_are_written_as_llama_imatrix_writes_them(moe, tmp_path):
    fam, _, tokens, im = moe
    path = write(im, tmp_path / "imatrix.gguf")
    r = gguf.GGUFReader(str(path))
    t = {x.name: x for x in r.tensors}
    n, cols = im.sums["blk.1.ffn_down_exps.weight"].shape
    s, c = t["blk.1.ffn_down_exps.weight.in_sum2"], t["blk.1.ffn_down_exps.weight.counts"]
    # ggml's ne order: in_sum2 [columns, experts], counts [1, experts]; both F32
    assert list(s.shape) == [cols, n] and list(c.shape) == [1, n] and n == families.hparams_of(HFModel(moe[1])).n_expert
    assert s.tensor_type == c.tensor_type == gguf.GGMLQuantizationType.F32
    assert list(t["blk.1.attn_q.weight.counts"].shape) == [1, 1]
    back = load(path)
    for name in im.sums:
        assert np.array_equal(back.sums[name], im.sums[name]) and np.array_equal(back.counts[name], im.counts[name])
    # an expert no token reached keeps count 0: llama-quantize gives it weights of 1
    w = back.weights()["blk.1.ffn_down_exps.weight"].reshape(n, cols)
    for e in range(n):
        expected = im.sums["blk.1.ffn_down_exps.weight"][e] / np.float32(im.counts["blk.1.ffn_down_exps.weight"][e]) \
            if im.counts["blk.1.ffn_down_exps.weight"][e] else np.ones(cols, np.float32)
        assert np.array_equal(w[e].numpy(), expected)


def test_an_imatrix_with_another_expert_count_is_refused(moe, tmp_path):
    fam, model_dir, _, im = moe
    n = families.hparams_of(HFModel(model_dir)).n_expert
    # the same model's imatrix with every expert twice: as if made for a model with 2n experts
    doubled = Imatrix({k: np.concatenate([s, s]) if "_exps" in k else s for k, s in im.sums.items()},
                      {k: np.concatenate([c, c]) if "_exps" in k else c for k, c in im.counts.items()},
                      im.datasets, im.chunk_count, im.chunk_size)
    path = write(doubled, tmp_path / "other.imatrix.gguf")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["export", str(model_dir), "--gguf", "q4_k_m", "--imatrix", str(path), "-q",
                                  "-o", str(out)])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert f"holds {2 * n} experts, the model has {n}" in lines[0] and str(path) in lines[0], lines[0]
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.gpu
def test_cuda_export_with_expert_imatrix_is_byte_identical_to_llama_quantize(moe, tmp_path):
    # test_gguf_export.py runs every type on the CPU (so did this test with device="cpu": 20 s a family)
    device = "cuda"
    from quantkit.bench import gguf_diff
    from quantkit.export import export_gguf
    from quantkit.plan import VARIANTS
    from quantkit.testing import llamacpp_ref

    pytest.importorskip("llama_cpp")
    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    _, model_dir, _, im = moe
    path = write(im, tmp_path / "imatrix.gguf")
    variants = ["q4_k_m", "q5_0"]       # K-quants and a legacy type, both weighted per expert
    ours = export_gguf(model_dir, [VARIANTS[v] for v in variants], tmp_path / "ours", progress=False, device=device,
                       imatrix=path)
    bf16 = llamacpp_ref.convert_hf_to_gguf(model_dir, tmp_path / "ref-bf16.gguf", "bf16")
    for v in variants:
        ref = llamacpp_ref.llama_quantize(bf16, tmp_path / f"ref-{v}.gguf", v, imatrix=llamacpp_ref.read_imatrix(path),
                                          kv_overrides=llamacpp_ref.imatrix_overrides(str(path)))
        diff = gguf_diff.file_difference(ours.files[v], ref)
        assert diff is None, f"{device} {v}: {diff}"
