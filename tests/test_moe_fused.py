"""MoE checkpoints with their experts fused in one tensor per layer (issue 23): transformers 5 holds
Qwen-MoE and Mixtral experts as mlp.experts.gate_up_proj [experts, 2 x ffn, hidden] and
mlp.experts.down_proj [experts, hidden, ffn], and writes them so with
save_pretrained(save_original_format=False) (its default writes one tensor per expert).

The fused checkpoints are made by transformers itself (synthetic.save_fused_experts), not from
quantkit's template. References: llama.cpp's converter (which reads the fused layout for Qwen2-MoE
and Qwen3-MoE) + llama_model_quantize for whole files, transformers' forward for the logits, peft
for a merge. Mixtral's fused layout is one the converter does not read: refused in one line.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantkit import families
from quantkit.bench import gguf_diff
from quantkit.cli import main
from quantkit.export import export_gguf
from quantkit.hfmodel import HFModel
from quantkit.plan import VARIANTS
from quantkit.testing import llamacpp_ref, synthetic

transformers = pytest.importorskip("transformers")
FIX = Path(__file__).parent / "fixtures" / "tokenizers"
# the families whose fused experts llama.cpp's converter reads
FUSED = sorted(name for name, f in families.FAMILIES.items()
               if f.fixture is not None and f.fused_experts(families.hparams_from_config(
                   synthetic.preset_config(next(p for p in f.presets if p.endswith("-tiny"))))))
QUANTIZED = ["q8_0", "q4_k_m"]


def tiny_preset(fam) -> str:
    return next(p for p in fam.presets if p.endswith("-tiny"))


def fused_checkpoint(name: str, root: Path) -> Path:
    """A two-layer tiny checkpoint of a family, saved by transformers with its experts fused, in
    root/fused/<preset> (the per-expert original in root/per-expert/<preset>). Tied embeddings: the
    151936-token vocabulary's matrices take most of the time."""
    fam = families.FAMILIES[name]
    cfg = synthetic.preset_config(tiny_preset(fam), num_hidden_layers=2, max_window_layers=2, tie_word_embeddings=True)
    per_expert = synthetic.write_checkpoint(root / "per-expert" / tiny_preset(fam), cfg, FIX / fam.fixture.tokenizer)
    return synthetic.save_fused_experts(per_expert, root / "fused" / tiny_preset(fam))


class CountingModel(HFModel):
    """An HFModel that records the size of every read (values)."""
    def __init__(self, path):
        super().__init__(path)
        self.reads: dict[str, list[int]] = {}

    def _read(self, ref, skip, shape):
        self.reads.setdefault(ref.name, []).append(int(np.prod(shape)))
        return super()._read(ref, skip, shape)


def run_cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


def test_the_fused_families_are_the_qwen_moes():
    assert FUSED == ["qwen2moe", "qwen3moe"]


def test_fused_template_is_what_transformers_holds():
    # with every layer fused, the template is transformers' in-memory state dict (what it saves fused)
    for name in FUSED:
        fam = families.FAMILIES[name]
        cfg = synthetic.preset_config(tiny_preset(fam), num_hidden_layers=2, vocab_size=512)
        hp = families.hparams_from_config(cfg)
        config = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert fam.tensor_shapes(hp, fused={0, 1}) == theirs, name


@pytest.fixture(scope="module", params=FUSED)
def exported(request, tmp_path_factory):
    """(family, fused checkpoint, our files and what we read, the converter's bf16 + llama_model_quantize's)."""
    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    root = tmp_path_factory.mktemp(request.param)
    model = fused_checkpoint(request.param, root)
    counting = CountingModel(model)
    # chunks of 2 experts' gate halves (256 x 256 each): a stack goes through in several chunks
    ours = export_gguf(counting, [VARIANTS[v] for v in variants(request.param)], root / "ours", progress=False,
                       chunk_values=1 << 17)
    ref = {"bf16": llamacpp_ref.convert_hf_to_gguf(model, root / "ref-bf16.gguf", "bf16")}
    for v in variants(request.param):
        if v != "bf16":
            ref[v] = llamacpp_ref.llama_quantize(ref["bf16"], root / f"ref-{v}.gguf", v)
    return request.param, model, ours, counting.reads, ref


def variants(family: str) -> list[str]:
    # Qwen2-MoE (the same experts, a shared one beside them) in Q8_0 only: the other types take
    # seconds each, and llama.cpp runs a qwen2moe only with an output matrix of its own (no logits)
    return QUANTIZED + ["bf16"] if family == "qwen3moe" else QUANTIZED[:1]


def test_the_checkpoint_holds_its_experts_fused(exported):
    _, model, *_ = exported
    shapes = {n: r.shape for n, r in HFModel(model).tensors.items()}
    assert shapes["model.layers.1.mlp.experts.gate_up_proj"] == (4, 512, 256)
    assert shapes["model.layers.1.mlp.experts.down_proj"] == (4, 256, 256)
    assert not any(".experts.0." in n for n in shapes)


@pytest.mark.parametrize("variant", QUANTIZED)
def test_fused_file_is_byte_identical_to_llama_quantize(exported, variant):
    family, _, ours, _, ref = exported
    if variant not in variants(family):
        pytest.skip(f"{family}: {variant} is left to qwen3moe")
    diff = gguf_diff.file_difference(ours.files[variant], ref[variant])
    assert diff is None, f"{family} {variant}: {diff}"


def test_fused_bf16_file_equals_the_converters(exported):
    # the converter writes checkpoint order, we write llama-quantize's: both files through
    # llama_model_quantize to BF16 (a lossless copy, in its order) must give the same bytes
    family, _, ours, _, ref = exported
    if "bf16" not in variants(family):
        pytest.skip(f"{family}: bf16 is left to qwen3moe")
    root = ours.files["bf16"].parent.parent
    a = llamacpp_ref.llama_quantize(ours.files["bf16"], root / "ours-requant-bf16.gguf", "bf16")
    b = llamacpp_ref.llama_quantize(ref["bf16"], root / "ref-requant-bf16.gguf", "bf16")
    assert gguf_diff.file_difference(a, b) is None, family


def test_fused_experts_are_read_once_expert_by_expert(exported):
    # every value of a fused tensor is read once, in reads of one expert's gate, up or down rows
    _, model, _, reads, _ = exported
    for name, ref in HFModel(model).tensors.items():
        if ".mlp.experts." in name:
            e, rows, cols = ref.shape
            part = rows // 2 * cols if name.endswith("gate_up_proj") else rows * cols
            assert reads[name] == [part] * (e * rows * cols // part), name


def test_fused_logits_agree_with_transformers(exported):
    family, model, ours, _, _ = exported
    if "bf16" not in ours.files:
        pytest.skip(f"{family}: logits are left to qwen3moe")
    cos, cos_min, same = llamacpp_ref.logits_agreement(model, ours.files["bf16"])
    assert cos >= 0.999 and same >= 0.95, f"{family}: mean cosine {cos:.5f} (min {cos_min:.5f}), same argmax at {same:.0%}"


# --- other readers: merge, export --lora / --residual, imatrix --------------------------------------

@pytest.fixture(scope="module")
def qwen3moe(tmp_path_factory):
    return fused_checkpoint("qwen3moe", tmp_path_factory.mktemp("qwen3moe-readers"))


def test_merge_of_a_fused_checkpoint_equals_peft_and_exports_on_the_fly(qwen3moe, tmp_path):
    peft = pytest.importorskip("peft")
    adapter = synthetic.write_lora_adapter(qwen3moe, tmp_path / "lora", r=8, alpha=16, dtype=torch.float32)
    merged_dir = tmp_path / "merged" / qwen3moe.name         # the base's name: the same general.name
    code, out = run_cli("merge", qwen3moe, "--lora", adapter, "-q", "-o", merged_dir)
    assert code == 0, out
    base = transformers.AutoModelForCausalLM.from_pretrained(qwen3moe, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "peft-merged", save_original_format=False)
    ref = load_file(tmp_path / "peft-merged" / "model.safetensors")
    ours = load_file(merged_dir / "model.safetensors")
    assert set(ours) == set(ref) and "model.layers.0.mlp.experts.gate_up_proj" in ours
    for name, t in ours.items():
        a, b = (x.contiguous().view(torch.int16).to(torch.int32) for x in (t, ref[name].to(torch.bfloat16)))
        ulps = (torch.where(a < 0, -(a & 0x7FFF), a) - torch.where(b < 0, -(b & 0x7FFF), b)).abs()
        assert int(ulps.max()) <= 1, name
    # the merge made on the fly reads the fused experts as the merged folder holds them
    code, out = run_cli("export", qwen3moe, "--lora", adapter, "--gguf", "q8_0", "-q", "-o", tmp_path / "fly")
    assert code == 0, out
    code, out = run_cli("export", merged_dir, "--gguf", "q8_0", "-q", "-o", tmp_path / "from-merged")
    assert code == 0, out
    (fly,), (folder,) = (tmp_path / "fly").glob("*.gguf"), (tmp_path / "from-merged").glob("*.gguf")
    assert gguf_diff.file_difference(fly, folder) is None


def test_export_with_lora_on_fused_experts_equals_export_of_the_merge(qwen3moe, tmp_path):
    # the merge on the fly reads each GGUF stack's rows of one expert (gate_up_proj's gate half, its
    # up half): the LoRA on experts must give the bits the whole-tensor merge writes. Two adapters:
    # peft's target_parameters on the fused experts, and one module per expert (peft's merge of
    # each: test_merge_moe.py)
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(qwen3moe, dtype=torch.float32),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "fused-lora")
    per_expert = synthetic.write_lora_adapter(qwen3moe.parent.parent / "per-expert" / qwen3moe.name, tmp_path / "lora",
                                              r=4, alpha=8, targets=("gate_proj", "up_proj", "down_proj"), seed=1)
    loras = ["--lora", tmp_path / "fused-lora", "--lora", per_expert, "--weight", 1, "--weight", 0.5]
    merged_dir = tmp_path / "merged" / qwen3moe.name
    code, out = run_cli("merge", qwen3moe, *loras, "-q", "-o", merged_dir)
    assert code == 0, out
    base, merged = load_file(qwen3moe / "model.safetensors"), load_file(merged_dir / "model.safetensors")
    assert not torch.equal(base["model.layers.1.mlp.experts.gate_up_proj"], merged["model.layers.1.mlp.experts.gate_up_proj"])
    code, out = run_cli("export", qwen3moe, *loras, "--gguf", "q8_0", "-q", "-o", tmp_path / "fly")
    assert code == 0, out
    code, out = run_cli("export", merged_dir, "--gguf", "q8_0", "-q", "-o", tmp_path / "from-merged")
    assert code == 0, out
    (fly,), (folder,) = (tmp_path / "fly").glob("*.gguf"), (tmp_path / "from-merged").glob("*.gguf")
    assert gguf_diff.file_difference(fly, folder) is None


def test_a_residual_on_fused_experts_is_added_as_torch_adds_it(qwen3moe, tmp_path):
    base = load_file(qwen3moe / "model.safetensors")
    gen = torch.Generator().manual_seed(3)
    delta = {k: (torch.randn(v.shape, generator=gen) * 1e-3).to(torch.bfloat16) for k, v in base.items()}
    (tmp_path / "delta").mkdir()
    save_file(delta, str(tmp_path / "delta" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(qwen3moe / "config.json", tmp_path / "delta" / "config.json")
    summed = shutil.copytree(qwen3moe, tmp_path / "summed" / qwen3moe.name)
    save_file({k: (v.float() + 0.5 * delta[k].float()).to(torch.bfloat16) for k, v in base.items()},
              str(summed / "model.safetensors"), metadata={"format": "pt"})
    code, out = run_cli("export", qwen3moe, "--residual", tmp_path / "delta", "--scale", 0.5, "--gguf", "q8_0", "-q",
                        "-o", tmp_path / "fly")
    assert code == 0, out
    code, out = run_cli("export", summed, "--gguf", "q8_0", "-q", "-o", tmp_path / "ref")
    assert code == 0, out
    (fly,), (ref,) = (tmp_path / "fly").glob("*.gguf"), (tmp_path / "ref").glob("*.gguf")
    assert gguf_diff.file_difference(fly, ref) is None


def test_imatrix_of_a_fused_checkpoint_is_the_per_expert_ones(qwen3moe):
    # transformers builds the same model from both layouts; the per-expert collection is checked
    # against transformers' routing in test_moe_imatrix.py
    from quantkit.imatrix import collect
    tokens = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    fused = collect(qwen3moe, tokens=tokens, progress=False)
    per_expert = collect(qwen3moe.parent.parent / "per-expert" / qwen3moe.name, tokens=tokens, progress=False)
    assert fused.sums.keys() == per_expert.sums.keys() and any(k.endswith("_exps.weight") for k in fused.sums)
    for k in fused.sums:
        assert np.array_equal(fused.sums[k], per_expert.sums[k]) and np.array_equal(fused.counts[k], per_expert.counts[k]), k


# --- bad input: one line naming the file, exit 2, nothing written -----------------------------------

def _one_line_error(code: int, out: str, fragments: list[str], out_dir) -> None:
    lines = list(dict.fromkeys(line for line in out.splitlines() if line.strip()))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("quantkit: error: "), out
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    assert not out_dir.exists()


@pytest.mark.parametrize("damage, fragments", [
    ("wrong expert count", ["model.safetensors", "'model.layers.1.mlp.experts.gate_up_proj' has shape [3, 512, 256]",
                            "config.json implies [4, 512, 256]"]),
    ("transposed", ["model.safetensors", "'model.layers.0.mlp.experts.gate_up_proj' has shape [4, 256, 512]"]),
    ("half fused", ["missing tensor 'model.layers.0.mlp.experts.down_proj'"]),
    ("dora on experts", ["adapter_model.safetensors", "'model.layers.0.mlp.experts.0.gate_proj'",
                         "DoRA", "not supported there"]),
])
def test_bad_fused_checkpoints_are_refused(qwen3moe, tmp_path, damage, fragments):
    model = shutil.copytree(qwen3moe, tmp_path / "m")
    t = load_file(model / "model.safetensors")
    args = []
    if damage == "wrong expert count":
        t["model.layers.1.mlp.experts.gate_up_proj"] = t["model.layers.1.mlp.experts.gate_up_proj"][:3].clone()
    elif damage == "transposed":
        t["model.layers.0.mlp.experts.gate_up_proj"] = t["model.layers.0.mlp.experts.gate_up_proj"].transpose(1, 2).contiguous()
    elif damage == "half fused":        # down_proj one tensor per expert beside a fused gate_up_proj
        down = t.pop("model.layers.0.mlp.experts.down_proj")
        t |= {f"model.layers.0.mlp.experts.{e}.down_proj.weight": down[e].clone() for e in range(len(down))}
    else:
        adapter = tmp_path / "lora"
        adapter.mkdir()
        key = "base_model.model.model.layers.0.mlp.experts.0.gate_proj"
        save_file({f"{key}.lora_A.weight": torch.zeros(8, 256), f"{key}.lora_B.weight": torch.zeros(256, 8),
                   f"{key}.lora_magnitude_vector": torch.ones(256)}, str(adapter / "adapter_model.safetensors"))
        (adapter / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["gate_proj"], "bias": "none",
            "use_dora": True}))
        args = ["--lora", adapter]
    save_file(t, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, out = run_cli("export", model, *args, "--gguf", "q8_0", "-q", "-o", tmp_path / "out")
    _one_line_error(code, out, fragments, tmp_path / "out")


def test_fused_mixtral_is_refused_in_one_line(tmp_path):
    # transformers fuses Mixtral's experts too (and renames block_sparse_moe to mlp); the converter
    # reads only block_sparse_moe.experts.N.w1/w2/w3
    cfg = synthetic.preset_config("mixtral-tiny", num_hidden_layers=1)
    per_expert = synthetic.write_checkpoint(tmp_path / "per-expert" / "mixtral-tiny", cfg, FIX / "mistral-v1")
    model = synthetic.save_fused_experts(per_expert, tmp_path / "fused" / "mixtral-tiny")
    code, out = run_cli("export", model, "--gguf", "q8_0", "-q", "-o", tmp_path / "out")
    _one_line_error(code, out, ["model.safetensors", "Mixtral experts fused in one tensor are not supported",
                                "save_original_format=True"], tmp_path / "out")
