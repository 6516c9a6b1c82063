"""LoRA / DoRA / residual merges against peft's merge_and_unload and the residual cards' recipe.

Adapters are made with peft itself on the SmolLM2 checkpoint, with random non-zero A and B (and
perturbed DoRA magnitudes, modules_to_save copies and saved embedding layers), saved with
save_pretrained. The reference is peft merging them into the float32-loaded base (the precision
quantkit merges in), rounded to bf16; our files must match it to within one bf16 ulp.
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

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "lora": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "rslora": dict(r=8, lora_alpha=4, target_modules=ALL_LINEAR, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, use_dora=True),
    "rank_alpha_patterns": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR,
                                rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 4},
                                alpha_pattern={"v_proj": 3, "layers.1.mlp.up_proj": 40}),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
}


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 ulps (ordered bit patterns)."""
    def ordered(x):
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (ordered(a) - ordered(b)).abs()


def _load_fp32(d: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def make_adapter(base: Path, dest: Path, seed: int = 0, dtype=torch.float32, **cfg) -> Path:
    torch.manual_seed(seed)
    model = peft.get_peft_model(_load_fp32(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name or "lora_embedding" in name:
                p.mul_(0.5)                       # deltas of the order of the weights
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))
            elif "modules_to_save" in name:
                p.add_(0.01 * torch.randn_like(p))
    if dtype != torch.float32:
        model = model.to(dtype)
    model.save_pretrained(dest)
    return dest


def peft_merged(base: Path, adapters: list[Path], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    model = peft.PeftModel.from_pretrained(_load_fp32(base), adapters[0], adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(a, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    for name, w in zip(names, weights or [1.0] * len(names)):
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer) and name in module.scaling:
                module.scaling[name] *= w
    merged = model.merge_and_unload(adapter_names=names) if len(names) > 1 else model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, merged


def run_cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


def ours_merged(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_close_to_peft(ours: dict, ref: dict, max_ulp: int = 1) -> None:
    tied_ref = set(ref) - set(ours)
    assert tied_ref <= {"lm_head.weight"}, tied_ref
    for name, t in ours.items():
        u = _ulps(t, ref[name].to(torch.bfloat16))
        assert int(u.max()) <= max_ulp, (name, int(u.max()), int((u > 0).sum()))


@pytest.fixture(scope="module")
def adapters(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(smollm2_dir, root / name, seed=i, **cfg) for i, (name, cfg) in enumerate(CASES.items())}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_matches_peft_merge_and_unload(case, adapters, smollm2_dir, tmp_path):
    out = tmp_path / "merged"
    code, text = run_cli("merge", smollm2_dir, "--lora", adapters[case], "-o", out, "-q")
    assert code == 0, text
    ref, _ = peft_merged(smollm2_dir, [adapters[case]])
    ours = ours_merged(out)
    assert_close_to_peft(ours, ref)
    # the adapter did change something: a broken merge that copies the base would fail here
    base = ours_merged(smollm2_dir)
    changed = [n for n in ours if n in base and not torch.equal(ours[n], base[n])]
    assert len(changed) >= 2, changed
    note = json.loads((out / "merge.json").read_text())
    assert note["adapters"][0]["path"] == str(adapters[case]) and len(note["adapters"][0]["sha256"]) == 64


def test_untied_lm_head_and_logits_match_peft(adapters, smollm2_dir, tmp_path):
    # modules_to_save=["lm_head"] on a model with tied embeddings: the merged model has its own lm_head
    out = tmp_path / "merged"
    assert run_cli("merge", smollm2_dir, "--lora", adapters["modules_to_save"], "-o", out, "-q")[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16"
    assert "lm_head.weight" in ours_merged(out)
    _, peft_model = peft_merged(smollm2_dir, [adapters["modules_to_save"]])
    mine = _load_fp32(out).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 8423, 30, 378, 2636, 28]])
    with torch.no_grad():
        a, b = mine(ids).logits, peft_model.eval()(ids).logits
    # same weights up to the one bf16 rounding of ours
    assert (a - b).abs().max() / b.abs().max() < 0.02
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_two_stacked_adapters_with_weights(adapters, smollm2_dir, tmp_path):
    out = tmp_path / "merged"
    code, text = run_cli("merge", smollm2_dir, "--lora", adapters["lora"], "--lora", adapters["dora"],
                         "--weight", "1.0", "--weight", "0.5", "-o", out, "-q")
    assert code == 0, text
    ref, _ = peft_merged(smollm2_dir, [adapters["lora"], adapters["dora"]], [1.0, 0.5])
    assert_close_to_peft(ours_merged(out), ref)


def test_bf16_adapter_against_peft_in_bf16(smollm2_dir, tmp_path):
    """The way peft is usually run: base and adapter in bf16. peft 0.21 casts the adapter to float32
    (autocast_adapter_dtype) and adds the float32 delta into the bf16 weight, rounding once, as we
    do: measured identical. Older peft rounded the delta to bf16 first; allow that one ulp."""
    ad = make_adapter(smollm2_dir, tmp_path / "ad", seed=7, dtype=torch.bfloat16, r=8, lora_alpha=16,
                      target_modules=ALL_LINEAR)
    out = tmp_path / "merged"
    assert run_cli("merge", smollm2_dir, "--lora", ad, "-o", out, "-q")[0] == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    ref = peft.PeftModel.from_pretrained(base, ad).merge_and_unload().state_dict()
    ours = ours_merged(out)
    total = differ = 0
    for name, t in ours.items():
        u = _ulps(t, ref[name])
        assert int(u.max()) <= 1, name
        total += u.numel()
        differ += int((u > 0).sum())
    assert differ / total < 1e-4, (differ, total)
    # and exactly what peft's float32 merge gives
    assert_close_to_peft(ours, peft_merged(smollm2_dir, [ad])[0])


def test_export_with_lora_equals_export_of_the_merged_model(adapters, smollm2_dir, tmp_path):
    merged = tmp_path / "merged"
    assert run_cli("merge", smollm2_dir, "--lora", adapters["dora"], "-o", merged, "-q")[0] == 0
    assert run_cli("export", merged, "--gguf", "q8_0,q4_k_m", "-o", tmp_path / "a", "-q")[0] == 0
    code, text = run_cli("export", smollm2_dir, "--lora", adapters["dora"], "--gguf", "q8_0,q4_k_m",
                         "-o", tmp_path / "b", "-q")
    assert code == 0, text
    from quantkit.bench import gguf_diff
    for t in ("Q8_0", "Q4_K_M"):      # file names follow the directory names: pair them by type
        (a,), (b,) = (tmp_path / "a").glob(f"*-{t}.gguf"), (tmp_path / "b").glob(f"*-{t}.gguf")
        result = gguf_diff.compare(a, b)
        assert result["identical_tensors"], (t, result)
    note = json.loads((tmp_path / "b" / "export.json").read_text())["merge"]
    assert note["adapters"][0]["use_dora"] is True


def test_sharded_output_loads_in_transformers(adapters, smollm2_dir, tmp_path):
    out = tmp_path / "merged"
    assert run_cli("merge", smollm2_dir, "--lora", adapters["lora"], "--shard-size", "60MB", "-o", out, "-q")[0] == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 4
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    ours = ours_merged(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    sd = model.state_dict()
    assert all(torch.equal(sd[n], t) for n, t in ours.items())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (smollm2_dir / f).read_bytes()


# --- residuals --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def instruct(adapters, smollm2_dir, tmp_path_factory):
    """An 'instruct' model: the base with an adapter merged in."""
    out = tmp_path_factory.mktemp("instruct") / "instruct"
    assert run_cli("merge", smollm2_dir, "--lora", adapters["rslora"], "-o", out, "-q")[0] == 0
    return out


def _bf16_ulp_at(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (x float32)."""
    _, e = torch.frexp(x.abs())
    return torch.ldexp(torch.ones_like(x), e - 8)


def test_residual_extract_then_add_gives_back_the_instruct_weights(instruct, smollm2_dir, tmp_path):
    inst, base = ours_merged(instruct), ours_merged(smollm2_dir)
    # fp32 delta: exact. fp16 delta (what residual cards publish): its rounding is at most 1/8 of a
    # bf16 ulp at the scale of the operands, so the result is within one bf16 ulp of
    # max(|instruct|, |base|); where instruct and base nearly cancel, that is many ulps of the
    # (tiny) result itself, e.g. 0.00928 - 0.00928: -3.1e-6 becomes 0. Below fp16's normal range
    # (|delta| < 6.1e-5) its spacing is a fixed 2^-24: that is the bound for tiny weights.
    for dtype in ("fp32", "fp16"):
        delta, out = tmp_path / f"delta-{dtype}", tmp_path / f"merged-{dtype}"
        assert run_cli("residual", "extract", "--instruct", instruct, "--base", smollm2_dir, "--dtype", dtype,
                       "-o", delta, "-q")[0] == 0
        assert run_cli("merge", smollm2_dir, "--residual", delta, "-o", out, "-q")[0] == 0
        back = ours_merged(out)
        for n in inst:
            if dtype == "fp32":
                assert torch.equal(back[n], inst[n]), n
            else:
                err = (back[n].float() - inst[n].float()).abs()
                scale = _bf16_ulp_at(torch.maximum(inst[n].float().abs(), base[n].float().abs()))
                scale = torch.clamp(scale, min=2.0 ** -24)
                assert bool((err <= scale).all()), (n, float((err / scale).max()))
        assert json.loads((delta / "residual.json").read_text())["dtype"] == {"fp32": "float32", "fp16": "float16"}[dtype]


def test_residual_merge_equals_the_model_cards_recipe(instruct, smollm2_dir, tmp_path):
    delta = tmp_path / "delta"
    assert run_cli("residual", "extract", "--instruct", instruct, "--base", smollm2_dir, "-o", delta, "-q")[0] == 0
    out = tmp_path / "merged"
    assert run_cli("merge", smollm2_dir, "--residual", delta, "-o", out, "-q")[0] == 0
    ours = ours_merged(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    d = ours_merged(delta)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data += d[name]                 # the recipe: bf16 weights += fp16 delta
    sd = model.state_dict()
    assert all(torch.equal(ours[n], sd[n]) for n in ours)
    assert (delta / "residual.json").exists() and (delta / "tokenizer.json").exists()


def test_residual_scale(instruct, smollm2_dir, tmp_path):
    delta = tmp_path / "delta"
    assert run_cli("residual", "extract", "--instruct", instruct, "--base", smollm2_dir, "--dtype", "fp32",
                   "-o", delta, "-q")[0] == 0
    out = tmp_path / "half"
    assert run_cli("merge", smollm2_dir, "--residual", delta, "--scale", "0.5", "-o", out, "-q")[0] == 0
    base, inst, half = ours_merged(smollm2_dir), ours_merged(instruct), ours_merged(out)
    name = "model.layers.3.mlp.down_proj.weight"
    expected = (base[name].float() + 0.5 * (inst[name].float() - base[name].float())).to(torch.bfloat16)
    assert torch.equal(half[name], expected)


# --- bad input: one line, non-zero exit, nothing written ----------------------------------------

def _break(adapter: Path, dest: Path, fn) -> Path:
    shutil.copytree(adapter, dest)
    fn(dest)
    return dest


def _edit_weights(fn):
    def edit(d: Path):
        t = load_file(d / "adapter_model.safetensors")
        fn(t)
        save_file(t, d / "adapter_model.safetensors")
    return edit


def _edit_config(fn):
    def edit(d: Path):
        c = json.loads((d / "adapter_config.json").read_text())
        fn(c)
        (d / "adapter_config.json").write_text(json.dumps(c))
    return edit


K = "base_model.model.model.layers.0.self_attn.q_proj"
BAD_ADAPTERS = {
    "other_base_name": (_edit_config(lambda c: c.update(base_model_name_or_path="meta-llama/Llama-3.1-8B")),
                        ["Llama-3.1-8B", "--ignore-base-name"]),
    "tensor_for_no_base_tensor": (_edit_weights(lambda t: t.update({
        "base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight": t[K + ".lora_A.weight"].clone(),
        "base_model.model.model.layers.99.self_attn.q_proj.lora_B.weight": t[K + ".lora_B.weight"].clone()})),
        ["model.layers.99.self_attn.q_proj", "matches no tensor"]),
    "wrong_shape": (_edit_weights(lambda t: t.update({K + ".lora_A.weight": torch.zeros(8, 100)})),
                    ["model.layers.0.self_attn.q_proj", "[8, 100]"]),
    "missing_lora_b": (_edit_weights(lambda t: t.pop(K + ".lora_B.weight")), ["lora_B missing"]),
    "rank_not_in_config": (_edit_config(lambda c: c.update(r=16)), ["rank 8", "says 16"]),
    "unknown_key": (_edit_weights(lambda t: t.update({"base_model.model.something.odd_thing": torch.zeros(2)})),
                    ["something.odd_thing"]),
    "not_lora": (_edit_config(lambda c: c.update(peft_type="IA3")), ["IA3", "only LORA"]),
    "no_weights": (lambda d: (d / "adapter_model.safetensors").unlink(), ["no adapter_model.safetensors"]),
    "whole_weight_not_in_modules_to_save": (_edit_weights(lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.weight": torch.zeros(576, 576)})),
        ["model.layers.0.self_attn.q_proj", "neither in modules_to_save"]),
    "activated_lora": (_edit_config(lambda c: c.update(alora_invocation_tokens=[1, 2])), ["alora_invocation_tokens"]),
    "pissa_init": (_edit_config(lambda c: c.update(init_lora_weights="pissa_niter_4")), ["pissa", "convert"]),
    "pickle_with_code": (lambda d: ((d / "adapter_model.safetensors").unlink(),
                                    torch.save({"x": torch.zeros(1), "f": print}, d / "adapter_model.bin")),
                         ["adapter_model.bin", "refusing"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_is_refused_before_anything_is_written(case, adapters, smollm2_dir, tmp_path):
    fn, fragments = BAD_ADAPTERS[case]
    bad = _break(adapters["lora"], tmp_path / "bad", fn)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["merge", str(smollm2_dir), "--lora", str(bad), "-o", str(out), "-q"])
    assert r.exit_code not in (0, None)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantkit: error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_adapter_for_another_base_is_refused_by_shape(smollm2_dir, tiny_model, tmp_path):
    ad = make_adapter(tiny_model, tmp_path / "tiny-ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["merge", str(smollm2_dir), "--lora", str(ad), "--ignore-base-name", "-o", str(out)])
    assert r.exit_code != 0 and "q_proj" in r.stderr and "has [576, 576]" in r.stderr
    assert not out.exists()


def test_residual_with_mismatched_tensors_is_refused(instruct, smollm2_dir, tiny_model, tmp_path):
    delta = tmp_path / "delta"
    assert run_cli("residual", "extract", "--instruct", instruct, "--base", smollm2_dir, "-o", delta, "-q")[0] == 0
    t = load_file(delta / "model.safetensors")
    t["model.layers.2.mlp.renamed.weight"] = t.pop("model.layers.2.mlp.up_proj.weight")
    save_file(t, delta / "model.safetensors")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["merge", str(smollm2_dir), "--residual", str(delta), "-o", str(out)])
    assert r.exit_code != 0 and "model.layers.2.mlp.up_proj.weight" in r.stderr
    assert not out.exists()
    # and extract refuses two models of different shapes
    r = CliRunner().invoke(main, ["residual", "extract", "--instruct", str(smollm2_dir), "--base",
                                  str(tiny_model), "-o", str(tmp_path / "d2")])
    assert r.exit_code != 0 and "model.embed_tokens.weight" in r.stderr and "shape" in r.stderr
    assert not (tmp_path / "d2").exists()


def test_existing_output_needs_force_and_weights_must_match_adapters(adapters, smollm2_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = CliRunner().invoke(main, ["merge", str(smollm2_dir), "--lora", str(adapters["lora"]), "-o", str(out)])
    assert r.exit_code != 0 and "--force" in r.stderr and (out / "keep.txt").exists()
    r = CliRunner().invoke(main, ["merge", str(smollm2_dir), "--lora", str(adapters["lora"]), "--weight", "1",
                                  "--weight", "2", "-o", str(tmp_path / "o2")])
    assert r.exit_code != 0 and "2 --weight values for 1 --lora" in r.stderr
    r = CliRunner().invoke(main, ["merge", str(smollm2_dir), "-o", str(tmp_path / "o3")])
    assert r.exit_code != 0 and "nothing to merge" in r.output + r.stderr


def test_pickled_adapter_of_plain_tensors_merges_like_its_safetensors(adapters, smollm2_dir, tmp_path):
    ad = tmp_path / "bin-adapter"
    shutil.copytree(adapters["dora"], ad)
    torch.save(load_file(ad / "adapter_model.safetensors"), ad / "adapter_model.bin")
    (ad / "adapter_model.safetensors").unlink()
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("merge", smollm2_dir, "--lora", adapters["dora"], "-o", a, "-q")[0] == 0
    assert run_cli("merge", smollm2_dir, "--lora", ad, "-o", b, "-q")[0] == 0
    assert (a / "model.safetensors").read_bytes() != b"" and ours_merged(a).keys() == ours_merged(b).keys()
    assert all(torch.equal(x, ours_merged(b)[n]) for n, x in ours_merged(a).items())


@pytest.mark.gpu
def test_cuda_merge_agrees_with_cpu_merge(adapters, smollm2_dir, tmp_path):
    for dev in ("cpu", "cuda"):
        assert run_cli("merge", smollm2_dir, "--lora", adapters["dora"], "--lora", adapters["lora"],
                       "--device", dev, "-o", tmp_path / dev, "-q")[0] == 0
    cpu, cuda = ours_merged(tmp_path / "cpu"), ours_merged(tmp_path / "cuda")
    # cuBLAS and MKL sum the rank dimension in different orders: at most one bf16 ulp apart
    assert max(int(_ulps(cpu[n], cuda[n]).max()) for n in cpu) <= 1


def test_config_quirks_merge_as_peft_loads_them(adapters, smollm2_dir, tmp_path):
    # fan_in_fan_out on nn.Linear: peft forces it off. No lora_alpha: peft's default 8 (scaling 8/8).
    # Magnitudes saved as `.lora_magnitude_vector.weight` (older peft): the same DoRA.
    quirky = _break(adapters["lora"], tmp_path / "quirky", _edit_config(lambda c: (c.update(fan_in_fan_out=True),
                                                                                     c.pop("lora_alpha"))))
    out = tmp_path / "out"
    assert run_cli("merge", smollm2_dir, "--lora", quirky, "-o", out, "-q")[0] == 0
    plain = _break(adapters["lora"], tmp_path / "plain", _edit_config(lambda c: c.update(lora_alpha=8)))
    assert_close_to_peft(ours_merged(out), peft_merged(smollm2_dir, [plain])[0])

    def rename_magnitudes(t):
        for k in [k for k in t if k.endswith("lora_magnitude_vector")]:
            t[k + ".weight"] = t.pop(k)
    old_dora = _break(adapters["dora"], tmp_path / "old-dora", _edit_weights(rename_magnitudes))
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("merge", smollm2_dir, "--lora", adapters["dora"], "-o", a, "-q")[0] == 0
    assert run_cli("merge", smollm2_dir, "--lora", old_dora, "-o", b, "-q")[0] == 0
    assert all(torch.equal(x, ours_merged(b)[n]) for n, x in ours_merged(a).items())


def test_force_never_replaces_an_input(adapters, smollm2_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(smollm2_dir, base)
    for out in (base, tmp_path):
        r = CliRunner().invoke(main, ["merge", str(base), "--lora", str(adapters["lora"]), "--ignore-base-name",
                                      "--force", "-o", str(out)])
        assert r.exit_code != 0 and "would replace the input" in r.stderr
    assert (base / "model.safetensors").exists()


def test_base_name_check_allows_format_suffixes_but_not_other_models(tmp_path):
    from quantkit.adapters import check_base_name
    from quantkit.errors import InputError

    class Base:
        def __init__(self, name, config=None):
            self.path = tmp_path / name
            self.path.mkdir(exist_ok=True)
            self.config = config or {}

    check_base_name({"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                    Base("smollm2-135m-instruct-bf16"), tmp_path)
    check_base_name({"base_model_name_or_path": "Qwen/Qwen3-8B"}, Base("qwen3_8b"), tmp_path)
    check_base_name({"base_model_name_or_path": "Qwen/Qwen3-8B"}, Base("x", {"_name_or_path": "Qwen/Qwen3-8B"}), tmp_path)
    for adapter_base, dir_name in (("Qwen/Qwen3-8B-Base", "Qwen3-8B"), ("meta-llama/Llama-3.1-8B", "Qwen3-8B"),
                                   ("Qwen/Qwen3-8B", "Qwen3-8B-Base")):
        with pytest.raises(InputError, match="--ignore-base-name"):
            check_base_name({"base_model_name_or_path": adapter_base}, Base(dir_name), tmp_path)
