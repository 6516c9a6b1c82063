"""The family registry: a family is one module, and everything that walks a model reads it.

A toy family (a Llama under another HF architecture name) is registered here as a new family module
would be, and gets the dry-run plan, the GGUF export, merging and GPTQ without touching anything else;
merging and GPTQ are checked on Qwen2 (q/k/v biases) too, whose files test_gguf_export.py checks.
Each is checked against a reference that is not ours: llama.cpp's converter and llama-quantize on the
same weights saved as a LlamaForCausalLM; peft's merge_and_unload; transformers loading the GPTQ
checkpoint through compressed-tensors. The README's support table is the registry's.
"""
from __future__ import annotations

import json
from types import SimpleNamespace
import re
from pathlib import Path

import gguf
import pytest
import torch
from click.testing import CliRunner

from quantkit import families
from quantkit.bench import gguf_diff
from quantkit.testing import llamacpp_ref, synthetic
from quantkit.cli import main
from quantkit.families.base import TINY
from quantkit.families.llama import LLAMA31_8B, Llama

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "tokenizers"


class ToyLlama(Llama):
    """What a new family module holds: names, GGUF arch, presets; the hooks are Llama's."""
    name = "toy"
    hf_names = ("ToyLlamaForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    presets = {"toy-tiny": {**LLAMA31_8B, **TINY, "architectures": ["ToyLlamaForCausalLM"], "num_hidden_layers": 2}}
    fixture = None


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A registered toy family, a tiny checkpoint of it with Llama 3's tokenizer, and the same weights
    saved as LlamaForCausalLM in a folder of the same name (llama.cpp's converter knows that one)."""
    families.register(ToyLlama)
    try:
        root = tmp_path_factory.mktemp("toy")
        cfg = synthetic.preset_config("toy-tiny")
        model = synthetic.write_checkpoint(root / "toy" / "toy-tiny", cfg, FIX / "llama3")
        as_llama = synthetic.write_checkpoint(root / "llama" / "toy-tiny", {**cfg, "architectures": ["LlamaForCausalLM"]},
                                              FIX / "llama3")
        yield model, as_llama, root
    finally:
        families.unregister("toy")


@pytest.fixture(scope="module", params=["toy", "qwen2", "mistral", "gemma2", "gemma3", "phi3", "qwen3moe", "mixtral", "qwen2moe"])
def tiny(request, toy, tmp_path_factory):
    """A 2-layer checkpoint of the toy family, and of the real families the toy does not stand for
    (Qwen2: q/k/v biases, no q/k permute; Mistral: a SentencePiece tokenizer; Gemma: shifted norms;
    Phi-3: fused qkv_proj and gate_up_proj, the LoRA targets of the merge; Qwen3-MoE: stacked experts)."""
    if request.param == "toy":
        return toy[0]
    fam = families.FAMILIES[request.param]
    preset = next(p for p in fam.presets if p.endswith("-tiny"))
    cfg = synthetic.preset_config(preset, num_hidden_layers=2, max_window_layers=2)
    return synthetic.write_checkpoint(tmp_path_factory.mktemp(request.param) / preset, cfg, FIX / fam.fixture.tokenizer)


def run_cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


def test_readme_support_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- families -->\n(.*?)\n<!-- /families -->", readme, re.S)
    assert block, "README.md has no <!-- families --> block"
    assert block.group(1).strip() == families.support_table().strip(), \
        "README's support table differs from `quantkit families`: paste its output between the markers"


def test_registry_refuses_a_name_registered_twice():
    class Again(Llama):
        name = "again"
    with pytest.raises(ValueError, match="LlamaForCausalLM is registered twice"):
        families.register(Again)
    assert "again" not in families.FAMILIES


def _saved_shapes(model, dest) -> dict:
    from safetensors import safe_open
    model.save_pretrained(dest)
    out = {}
    for f in sorted(dest.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out |= {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    return out


def test_every_family_template_is_what_transformers_builds(tmp_path):
    # the template each family gives is what transformers builds from the same config
    transformers = pytest.importorskip("transformers")
    for fam in families.FAMILIES.values():
        tiny = next(p for p in fam.presets if p.endswith("-tiny"))
        cfg, small = synthetic.preset_config(tiny), {"num_hidden_layers": 2, "vocab_size": 512, "pad_token_id": 0}
        if "text_config" in cfg:        # a multimodal checkpoint: its text model's config
            cfg["text_config"] = {**cfg["text_config"], **small}
        else:
            cfg.update(small)
        hp = families.hparams_from_config(cfg)
        config = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items()
                                                                          if k != "model_type"})
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()
                  if not (hp.tied and k == f"{fam.head}.weight")}
        if fam.stacked_tensors(hp):     # MoE: transformers 5 fuses the experts in memory, one tensor each on disk
            theirs = _saved_shapes(transformers.AutoModelForCausalLM.from_config(config), tmp_path / fam.name)
        skipped = fam.skipped_tensors(SimpleNamespace(tensors=theirs))      # a vision tower
        theirs = {k: v for k, v in theirs.items() if k not in skipped}
        assert fam.tensor_shapes(hp) == theirs, fam.name
        assert len(fam.layers(model)) == hp.n_layer and fam.module(model, fam.embeddings) is model.get_input_embeddings()


def test_toy_family_is_listed(toy):
    code, out = run_cli("families")
    assert code == 0 and "| toy | ToyLlamaForCausalLM | llama |" in out, out


def test_toy_family_dry_run_and_export_equal_llama_cpp(toy, tmp_path):
    model, as_llama, root = toy
    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    pytest.importorskip("llama_cpp")
    ref_bf16 = llamacpp_ref.convert_hf_to_gguf(as_llama, root / "ref-bf16.gguf", "bf16")
    refs = {v: llamacpp_ref.llama_quantize(ref_bf16, root / f"ref-{v}.gguf", v) for v in ("q8_0", "q4_k_m")}

    code, out = run_cli("export", model, "--gguf", "q8_0,q4_k_m", "--dry-run")
    assert code == 0, out
    for name, qtype, *_ in gguf_diff.tensors(refs["q4_k_m"]):   # every tensor llama-quantize wrote, typed as it did
        assert re.search(rf"^{re.escape(name)}\s+\S+\s+\S+\s+{qtype}\b", out, re.M), (name, qtype)

    code, out = run_cli("export", model, "--gguf", "q8_0,q4_k_m", "-q", "-o", tmp_path)
    assert code == 0, out
    for v, ref in refs.items():
        ours = next(tmp_path.glob(f"*-{v.upper()}.gguf"))
        assert gguf_diff.file_difference(ours, ref) is None, v


def test_merge_of_a_new_family_equals_peft(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = tiny
    adapter = synthetic.write_lora_adapter(model, tmp_path / "lora", r=8, alpha=16, dtype=torch.float32)
    code, out = run_cli("merge", model, "--lora", adapter, "-q", "-o", tmp_path / "merged")
    assert code == 0, out
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload()
    cfg = json.loads((model / "config.json").read_text())
    if families.family_for(cfg["architectures"][0]).stacked_tensors(families.hparams_from_config(cfg)):
        from safetensors.torch import load_file      # MoE: the experts as saved, one tensor each
        merged.save_pretrained(tmp_path / "peft-merged")
        ref = {k: v for f in (tmp_path / "peft-merged").glob("*.safetensors") for k, v in load_file(f).items()}
    else:
        ref = merged.state_dict()
    from safetensors.torch import load_file
    ours = {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        ours.update(load_file(f))
    if base.config.get_text_config().tie_word_embeddings:   # transformers lists the tied head, the files do not
        ref.pop("lm_head.weight")
    assert set(ours) == set(ref)
    for name, t in ours.items():
        # peft's float32 result rounded once to bf16, within one bf16 ulp
        a, b = (x.contiguous().view(torch.int16).to(torch.int32) for x in (t, ref[name].to(torch.bfloat16)))
        ulps = (torch.where(a < 0, -(a & 0x7FFF), a) - torch.where(b < 0, -(b & 0x7FFF), b)).abs()
        assert int(ulps.max()) <= 1, name


def test_gptq_of_a_new_family_loads_in_transformers(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    model = tiny
    cfg = json.loads((model / "config.json").read_text())
    if not families.family_for(cfg["architectures"][0]).gptq_groups:
        code, out = run_cli("export", model, "--gptq", "-q", "-o", tmp_path / "out")     # refused, not half done
        _one_line_error(code, out, ["GPTQ of", "not supported yet"], tmp_path / "out")
        return
    calib = tmp_path / "calib.txt"
    calib.write_text((ROOT / "docs" / "kernels.md").read_text())       # any English that is not WikiText
    # a MoE family's experts: round-to-nearest here (their GPTQ, on one layer, is in test_moe_gptq.py)
    moe = ["--gptq-method", "rtn"] if families.family_for(cfg["architectures"][0]).experts_layout else []
    code, out = run_cli("export", model, "--gptq", "--gptq-format", "compressed-tensors", "--group-size", 64,
                        "--calib", calib, "--calib-samples", 4, "--calib-seqlen", 64, *moe, "-q", "-o", tmp_path / "out")
    assert code == 0, out
    qdir = tmp_path / "out" / "gptq-ct"
    assert json.loads((qdir / "config.json").read_text())["architectures"] == cfg["architectures"]
    q = transformers.AutoModelForCausalLM.from_pretrained(qdir, device_map="cpu")
    with torch.no_grad():
        q(torch.tensor([[1, 791, 4062, 14198]]))      # runs, and compressed-tensors decompresses its weights
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    hp = families.hparams_from_config(cfg)
    names = families.family_for(cfg["architectures"][0]).linear_names(hp)
    assert len(names) == sum(len(g) for g in families.family_for(cfg["architectures"][0]).gptq_groups) * hp.n_layer
    for name in names:
        w, wq = base.get_submodule(name).weight, q.get_submodule(name).weight.float()
        err = ((wq - w).norm() / w.norm()).item()
        assert 0 < err < 0.2, (name, err)     # 4-bit g64: measured ~0.1


def test_run_of_a_new_family_merges_exports_and_reports(tiny, tmp_path):
    """`quantkit run` end to end on each family: the adapter merged, a GGUF with a Modelfile, NF4, the report
    (transformers' bf16 baseline vs llama.cpp's GGUF); and the GGUF of the merge made on the fly by
    `export --lora` has the same tensors as the merged folder's."""
    pytest.importorskip("transformers")
    pytest.importorskip("llama_cpp")
    model = tiny
    adapter = synthetic.write_lora_adapter(model, tmp_path / "lora", r=8, alpha=16, dtype=torch.float32)
    out = tmp_path / "out"
    code, text = run_cli("run", "--base", model, "--lora", adapter, "--gguf", "q8_0", "--ollama", "--nf4", "--bench",
                         "--limit-chunks", 2, "--ctx", 64, "-q", "-o", out)
    assert code == 0, text
    nf4 = json.loads((out / "nf4" / "config.json").read_text())
    assert nf4["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    report = json.loads((out / "report" / "report.json").read_text())
    assert [v["label"] for v in report["variants"]] == ["Q8_0", "NF4"] and report["baseline"]["label"] == "BF16"
    assert all(v["kld_mean"] >= 0 and v["same_top"] > 0 for v in report["variants"]) and report["scored_tokens"] > 0
    (gguf,) = (out / "gguf").glob("*-Q8_0.gguf")
    assert gguf.with_suffix(".Modelfile").read_text().startswith(f"FROM ./{gguf.name}")
    code, text = run_cli("export", model, "--lora", adapter, "--gguf", "q8_0", "-q", "-o", tmp_path / "fly")
    assert code == 0, text
    (fly,) = (tmp_path / "fly").glob("*-Q8_0.gguf")
    assert gguf_diff.compare(fly, gguf)["identical_tensors"]


# --- what one family brings: Phi-3's LongRoPE, Gemma's SentencePiece-only vocabulary -------------

def _longrope_phi3(dest):
    rope = {"type": "longrope", "long_factor": [1.0 + i / 8 for i in range(32)],
            "short_factor": [1.0 + i / 64 for i in range(32)]}
    cfg = synthetic.preset_config("phi3-tiny", num_hidden_layers=2, max_position_embeddings=131072, rope_scaling=rope)
    return synthetic.write_checkpoint(dest, cfg, FIX / "phi-3")


def test_phi3_longrope_equals_the_converter(tmp_path):
    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    model = _longrope_phi3(tmp_path / "phi3-128k")
    code, out = run_cli("export", model, "--gguf", "bf16", "-q", "-o", tmp_path / "ours")
    assert code == 0, out
    (ours,) = (tmp_path / "ours").glob("*.gguf")
    ref = llamacpp_ref.convert_hf_to_gguf(model, tmp_path / "ref.gguf", "bf16")
    assert not gguf_diff.metadata_differences(ours, ref)
    assert gguf_diff.compare(ours, ref, same_order=False)["identical_tensors"]
    names = [t[0] for t in gguf_diff.tensors(ours)]
    assert "rope_factors_long.weight" in names and "rope_factors_short.weight" in names
    assert "phi3.rope.scaling.attn_factor" in gguf_diff.metadata(ours)


def _one_line_error(code: int, out: str, fragments: list[str], out_dir) -> None:
    lines = list(dict.fromkeys(line for line in out.splitlines() if line.strip()))   # (stdout holds stderr too)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("quantkit: error: "), out
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    assert not out_dir.exists()


def test_longrope_factors_of_the_wrong_length_are_refused(tmp_path):
    model = _longrope_phi3(tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_scaling"]["long_factor"] += [1.0] * 16               # a head of 64 rotates 32 pairs
    (model / "config.json").write_text(json.dumps(cfg))
    code, out = run_cli("export", model, "--gguf", "q8_0", "-q", "-o", tmp_path / "out")
    _one_line_error(code, out, ["config.json", "long_factor", "list of 32 numbers"], tmp_path / "out")


def test_gemma_without_its_tokenizer_model_is_refused(tmp_path):
    cfg = synthetic.preset_config("gemma2-tiny", num_hidden_layers=1)
    model = synthetic.write_checkpoint(tmp_path / "m", cfg, FIX / "gemma-standin")
    (model / "tokenizer.model").unlink()
    code, out = run_cli("export", model, "--gguf", "q8_0", "-q", "-o", tmp_path / "out")
    _one_line_error(code, out, ["missing tokenizer.model", "copy tokenizer.model"], tmp_path / "out")


def test_gemma3_multimodal_text_tower_as_published_equals_the_converter(tmp_path):
    """A Gemma 3 multimodal checkpoint in the published layout (language_model.model.*, a vision tower):
    the text GGUF equals the converter's, and the vision tower is left out with a notice."""
    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    from safetensors.torch import load_file, save_file
    cfg = synthetic.preset_config("gemma3-multimodal-tiny")
    cfg["text_config"] = {**cfg["text_config"], "num_hidden_layers": 2}
    model = synthetic.write_checkpoint(tmp_path / "gemma3-4b", cfg, FIX / "gemma-standin")
    t = load_file(model / "model.safetensors")
    t = {("language_model.model." + k.removeprefix("model.language_model.")
          if k.startswith("model.language_model.") else k): v for k, v in t.items()}
    t["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(64, 3, 14, 14, dtype=torch.bfloat16)
    t["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(64, 256, dtype=torch.bfloat16)
    save_file(t, str(model / "model.safetensors"), metadata={"format": "pt"})
    r = CliRunner().invoke(main, ["export", str(model), "--gguf", "bf16", "-q", "-o", str(tmp_path / "ours")])
    assert r.exit_code == 0, r.output
    assert "2 tensors of Gemma3ForConditionalGeneration's vision tower and projector are left out" in r.stderr
    (ours,) = (tmp_path / "ours").glob("*.gguf")
    ref = llamacpp_ref.convert_hf_to_gguf(model, tmp_path / "ref.gguf", "bf16")
    assert not gguf_diff.metadata_differences(ours, ref)
    assert gguf_diff.compare(ours, ref, same_order=False)["identical_tensors"]


def test_a_multimodal_gemma3_without_a_text_config_is_refused(tmp_path):
    model = synthetic.write_checkpoint(tmp_path / "m", synthetic.preset_config("gemma3-multimodal-tiny"),
                                       FIX / "gemma-standin")
    cfg = json.loads((model / "config.json").read_text())
    del cfg["text_config"]
    (model / "config.json").write_text(json.dumps(cfg))
    code, out = run_cli("export", model, "--gguf", "q8_0", "-q", "-o", tmp_path / "out")
    _one_line_error(code, out, ["config.json", "without a text_config"], tmp_path / "out")


@pytest.mark.parametrize("damage, fragments", [
    ("missing expert", ["missing tensor 'model.layers.1.mlp.experts.3.up_proj.weight'"]),
    ("unequal expert", ["model.layers.0.mlp.experts.2.down_proj.weight", "has shape [256, 128]",
                        "config.json implies [256, 256]"]),
    ("too many used", ["config.json", "num_experts_per_tok 5 must be between 1 and num_experts 4"]),
])
def test_bad_moe_checkpoints_are_refused(tmp_path, damage, fragments):
    from safetensors.torch import load_file, save_file
    cfg = synthetic.preset_config("qwen3moe-tiny", num_hidden_layers=2)
    model = synthetic.write_checkpoint(tmp_path / "m", cfg, FIX / "qwen3")
    t = load_file(model / "model.safetensors")
    if damage == "missing expert":
        del t["model.layers.1.mlp.experts.3.up_proj.weight"]
    elif damage == "unequal expert":
        t["model.layers.0.mlp.experts.2.down_proj.weight"] = t["model.layers.0.mlp.experts.2.down_proj.weight"][:, :128].clone()
    else:
        (model / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 5}))
    save_file(t, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, out = run_cli("export", model, "--gguf", "q8_0", "-q", "-o", tmp_path / "out")
    _one_line_error(code, out, fragments, tmp_path / "out")
