"""LoRA on MoE experts (issue 23) merged as peft merges it, on both layouts of the base.

Two forms of adapter: peft's target_parameters on transformers 5's fused experts (made here by
get_peft_model on the model transformers builds, random non-zero A and B), and the one-module-per-
expert form adapters trained before transformers 5 name (experts.N.gate_proj, Mixtral's w1/w2/w3),
laid out as peft wrote them, which peft 0.21 converts when it loads them into a transformers 5
model. Two layouts of the base: one tensor per expert (as published) and fused
(save_pretrained(save_original_format=False)). The reference is peft's merge_and_unload into the
float32-loaded base, saved by transformers in the base's layout (its own name mapping, not ours);
every tensor must be within one bf16 ulp of it. Tiny one-layer models with a 512-token vocabulary:
seconds.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantkit.cli import main
from quantkit.testing import synthetic

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# each preset's expert linears and router as the original (per-expert) checkpoints name them
EXPERT_LINEARS = {"qwen3moe-tiny": ["gate_proj", "up_proj", "down_proj", "mlp.gate"],
                  "qwen2moe-tiny": ["gate_proj", "up_proj", "down_proj", "mlp.gate"],
                  "mixtral-tiny": ["w1", "w2", "w3", "block_sparse_moe.gate"]}


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    def ordered(x):
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (ordered(a) - ordered(b)).abs()


def run_cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


def tensors_of(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{(preset, layout): checkpoint}: one tensor per expert, and fused by transformers. The same
    folder name in both, so an adapter's base_model_name_or_path fits either."""
    root = tmp_path_factory.mktemp("moe-bases")
    out = {}
    for preset in EXPERT_LINEARS:
        cfg = synthetic.preset_config(preset, num_hidden_layers=1, vocab_size=512, max_window_layers=1,
                                      bos_token_id=1, eos_token_id=2)
        per_expert = synthetic.write_checkpoint(root / "per-expert" / preset, cfg, seed=len(out))
        out[preset, "per-expert"] = per_expert
        out[preset, "fused"] = synthetic.save_fused_experts(per_expert, root / "fused" / preset)
    return out


def _fp32(base: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def target_parameters_adapter(base: Path, dest: Path, seed: int = 0, **cfg) -> Path:
    """peft's own adapter on the fused experts (and on the attention), random non-zero A and B."""
    torch.manual_seed(seed)
    config = dict(r=4, lora_alpha=8, target_modules=ATTENTION, init_lora_weights=False,
                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]) | cfg
    model = peft.get_peft_model(_fp32(base), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.02)
    model.save_pretrained(dest)
    return dest


def per_expert_adapter(base: Path, preset: str, dest: Path) -> Path:
    """An adapter on one module per expert, as peft saved those before transformers 5 fused them."""
    ad = synthetic.write_lora_adapter(base, dest, r=4, alpha=8, targets=ATTENTION + EXPERT_LINEARS[preset],
                                      dtype=torch.float32, seed=5)
    t = load_file(ad / "adapter_model.safetensors")
    assert any(".experts.3." in k for k in t)
    save_file({k: v * 30 if "lora_B" in k else v for k, v in t.items()}, str(ad / "adapter_model.safetensors"))
    return ad


def peft_reference(base: Path, adapter: Path, dest: Path, residual: dict | None = None) -> dict[str, torch.Tensor]:
    """peft's merge into the float32 base, saved by transformers in the base's own layout."""
    model = _fp32(base)
    if residual is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p += 0.5 * residual[name].float()
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    fused = any(k.endswith("experts.gate_up_proj") for k in tensors_of(base))
    merged.save_pretrained(dest, save_original_format=not fused)
    return tensors_of(dest)


def assert_within_one_ulp(ours: dict, ref: dict, base: dict) -> None:
    assert set(ours) == set(ref)
    for name, t in ours.items():
        u = _ulps(t, ref[name].to(torch.bfloat16))
        assert int(u.max()) <= 1, (name, int(u.max()), int((u > 0).sum()))
    # the experts and the router did change, in every expert: a merge that skipped them would fail here
    experts = [n for n in ours if ".experts." in n or n.endswith(".gate.weight")]
    assert experts and all(not torch.equal(ours[n], base[n]) for n in experts), experts
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


CASES = [(p, layout, form) for p in EXPERT_LINEARS for layout in ("per-expert", "fused")
         for form in ("target_parameters", "per_expert")
         # peft 0.21 converts per-expert adapters for the model types in transformers' conversion
         # patterns: qwen2_moe is not one, and its expert LoRAs are dropped on load (no reference)
         if not (p == "qwen2moe-tiny" and form == "per_expert")]


@pytest.mark.parametrize("preset, layout, form", CASES)
def test_lora_on_experts_equals_peft_merge(bases, preset, layout, form, tmp_path):
    base = bases[preset, layout]
    if form == "target_parameters":     # made on either layout: transformers builds the same model
        # peft resolves the patterns on parameter names (mlp.gate.weight: the router, which
        # transformers 5 renames for Mixtral)
        adapter = target_parameters_adapter(base, tmp_path / "adapter", alpha_pattern={"down_proj": 3, "gate.weight": 5})
        keys = load_file(adapter / "adapter_model.safetensors")
        assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    else:
        adapter = per_expert_adapter(bases[preset, "per-expert"], preset, tmp_path / "adapter")
    code, out = run_cli("merge", base, "--lora", adapter, "-q", "-o", tmp_path / "ours")
    assert code == 0, out
    ref = peft_reference(base, adapter, tmp_path / "ref")
    assert_within_one_ulp(tensors_of(tmp_path / "ours"), ref, tensors_of(base))


def test_per_expert_adapter_on_fused_qwen2moe_equals_its_merge_per_expert(bases, tmp_path):
    # no peft reference (see CASES): the fused merge must hold the per-expert merge's rows, by
    # transformers' own fusing of the per-expert result
    adapter = per_expert_adapter(bases["qwen2moe-tiny", "per-expert"], "qwen2moe-tiny", tmp_path / "adapter")
    for layout in ("per-expert", "fused"):
        assert run_cli("merge", bases["qwen2moe-tiny", layout], "--lora", adapter, "-q", "-o", tmp_path / layout)[0] == 0
    refused = synthetic.save_fused_experts(tmp_path / "per-expert", tmp_path / "refused")
    ours, ref = tensors_of(tmp_path / "fused"), tensors_of(refused)
    assert set(ours) == set(ref) and all(torch.equal(ours[n], ref[n]) for n in ours)


def test_residual_and_lora_on_fused_experts(bases, tmp_path):
    base = bases["qwen3moe-tiny", "fused"]
    gen = torch.Generator().manual_seed(9)
    delta = {k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.bfloat16) for k, v in tensors_of(base).items()}
    (tmp_path / "delta").mkdir()
    save_file(delta, str(tmp_path / "delta" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(base / "config.json", tmp_path / "delta" / "config.json")
    adapter = target_parameters_adapter(base, tmp_path / "adapter", seed=3)
    code, out = run_cli("merge", base, "--residual", tmp_path / "delta", "--scale", 0.5, "--lora", adapter, "-q",
                        "-o", tmp_path / "ours")
    assert code == 0, out
    ref = peft_reference(base, adapter, tmp_path / "ref", residual=delta)
    assert_within_one_ulp(tensors_of(tmp_path / "ours"), ref, tensors_of(base))
    note = json.loads((tmp_path / "ours" / "merge.json").read_text())
    assert note["adapters"][0]["lora_tensors"] == 4 + 1 + 2 and note["residual"]["scale"] == 0.5


def test_lora_on_experts_that_fits_nothing_is_refused(bases, tmp_path):
    base = bases["qwen3moe-tiny", "fused"]
    adapter = target_parameters_adapter(base, tmp_path / "adapter")
    t = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
    t[key] = t[key][:, :100].contiguous()
    save_file(t, str(adapter / "adapter_model.safetensors"))
    r = CliRunner().invoke(main, ["merge", str(base), "--lora", str(adapter), "-o", str(tmp_path / "out")])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert "'model.layers.0.mlp.experts'" in lines[0] and "fits none of the experts' parameters" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_cuda_merge_of_lora_on_experts_agrees_with_cpu(bases, tmp_path):
    base = bases["qwen3moe-tiny", "fused"]
    adapter = target_parameters_adapter(base, tmp_path / "adapter")
    for dev in ("cpu", "cuda"):
        assert run_cli("merge", base, "--lora", adapter, "--device", dev, "-q", "-o", tmp_path / dev)[0] == 0
    cpu, cuda = tensors_of(tmp_path / "cpu"), tensors_of(tmp_path / "cuda")
    assert max(int(_ulps(cpu[n], cuda[n]).max()) for n in cpu) <= 1
