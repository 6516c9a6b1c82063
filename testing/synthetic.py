"""Synthetic HF checkpoints of each family's real 8B shapes (or shrunk), random weights.

Used by the tests (tiny models with the real tokenizers of each family) and by the speed
benchmarks (full 8B shapes). Tensors are generated and written one shard at a time, so an 8B
checkpoint never sits in memory.

    python -m quantkit.testing.synthetic checkpoint llama3-8b /tmp/llama8b --tokenizer tests/fixtures/tokenizers/llama3
    python -m quantkit.testing.synthetic adapter /tmp/llama8b /tmp/llama8b-lora --r 64   # all projections
    python -m quantkit.testing.synthetic checkpoint qwen3-8b /tmp/q8b --shapes-only --tokenizer tests/fixtures/tokenizers/qwen3
        # headers only (sparse files, no disk): for `quantkit export /tmp/q8b --gguf q4_k_m --dry-run`
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.families import FAMILIES, family_for, hparams_from_config, presets

def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes, in the order HF writes them, from the config's family template."""
    return list(family_for(cfg["architectures"][0]).tensor_shapes(hparams_from_config(cfg)).items())


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype,
                  norm_shift: float = 0.0) -> torch.Tensor:
    if len(shape) == 1:  # norms: gains around 1, like trained RMSNorm gains (stored as gain - norm_shift)
        return (1.0 - norm_shift + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    # heavier tails than a Gaussian (a few outliers per row), as trained weights have
    t = torch.randn(shape, generator=gen) * 0.02
    t += 0.05 * torch.randn(shape, generator=gen).pow_(3).clamp_(-10, 10) * 0.02
    return t.to(dtype)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def preset_tokenizer(preset: str) -> str:
    """The tokenizer fixture of the family a preset belongs to (llama3-8b -> "llama3")."""
    return next(f.fixture.tokenizer for f in FAMILIES.values() if preset in f.presets and f.fixture)


def tokenizer_dir(family: str) -> Path:
    """The real tokenizer of a family ("llama3", "qwen3": preset_tokenizer) from tests/fixtures/tokenizers of the source
    checkout. An installed quantkit has no tests/: QUANTKIT_TOKENIZERS names the folder then (the GPU
    session sets it to the checkout's)."""
    root = Path(os.environ.get("QUANTKIT_TOKENIZERS")
                or Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizers")
    if not any((root / family / f).is_file() for f in ("tokenizer.json", "tokenizer.json.xz", "tokenizer.model")):
        raise SystemExit(f"{root / family}: no tokenizer.json or tokenizer.model for the synthetic {family} checkpoint; run from a "
                         "source checkout or set QUANTKIT_TOKENIZERS to tests/fixtures/tokenizers")
    return root / family


def write_checkpoint(dest: Path, cfg: dict, tokenizer_dir: Path | None = None, *, seed: int = 0,
                     dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 2 << 30,
                     shapes_only: bool = False) -> Path:
    """shapes_only: safetensors headers and sparse files of the right size, whose data reads as zeros
    (a plan or a dry run of an 8B model without 16 GB of disk)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(cfg)
    esize = torch.empty(0, dtype=dtype).element_size()
    # group tensors into shards of at most shard_bytes
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = esize * int(torch.Size(shape).numel())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        if shapes_only:
            total += _write_header_only(dest / fname, shard, dtype)
            weight_map.update({name: fname for name, _ in shard})
            continue
        shift = family_for(cfg["architectures"][0]).norm_shift
        tensors = {name: random_tensor(name, shape, gen, dtype, shift) for name, shape in shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(dest / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        del tensors
    if len(shards) > 1:
        (dest / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = dict(cfg, torch_dtype={torch.bfloat16: "bfloat16", torch.float16: "float16",
                                 torch.float32: "float32"}[dtype])
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).exists():
                shutil.copyfile(Path(tokenizer_dir) / f, dest / f)
            elif (Path(tokenizer_dir) / f"{f}.xz").exists():    # a large fixture, stored compressed
                with lzma.open(Path(tokenizer_dir) / f"{f}.xz") as src, open(dest / f, "wb") as out:
                    shutil.copyfileobj(src, out)
    text = cfg.get("text_config") or {}     # a multimodal config may keep its token ids there
    ids = {k: cfg.get(k, text.get(k)) for k in ("bos_token_id", "eos_token_id")}
    gen_cfg = {**{k: v for k, v in ids.items() if v is not None}, "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (dest / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    return dest


def save_fused_experts(src: Path, dest: Path) -> Path:
    """The MoE checkpoint in `src` saved again by transformers with its experts fused as it holds
    them (save_pretrained(save_original_format=False): mlp.experts.gate_up_proj [experts, 2 x ffn,
    hidden], mlp.experts.down_proj [experts, hidden, ffn]), the tokenizer and generation config
    copied: the layout is transformers', not quantkit's template."""
    import transformers

    dest = Path(dest)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    model.save_pretrained(dest, save_original_format=False)
    for f in (*TOKENIZER_FILES, "generation_config.json"):
        if (Path(src) / f).exists():
            shutil.copyfile(Path(src) / f, dest / f)
    return dest


def _write_header_only(path: Path, shard: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> int:
    """A safetensors file with the header of `shard` and a hole for its data; returns the data bytes."""
    esize = torch.empty(0, dtype=dtype).element_size()
    code = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shard:
        n = esize * int(torch.Size(shape).numel())
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + off)
    return off


def preset_config(preset: str, **overrides) -> dict:
    """A family's preset config (its published 8B config, llama3-8b, or shrunk, llama3-tiny)."""
    return {**presets()[preset], **overrides}


def lora_targets(cfg: dict) -> tuple[str, ...]:
    """Every decoder linear of the config's family, by module name (q_proj, ...; Phi-3's fused qkv_proj
    and gate_up_proj; a MoE's attention projections)."""
    fam = family_for(cfg["architectures"][0])
    groups = fam.gptq_groups or ((m for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj")),)     # MoE: the attention only
    return tuple(m.split(".")[-1] for g in groups for m in g)


def write_lora_adapter(base: Path, dest: Path, *, r: int = 64, alpha: int = 128, targets=None,
                       dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A PEFT LoRA adapter for the checkpoint in `base`, laid out as peft's save_pretrained writes it,
    with random A and B sized so that the update is a few percent of the weights (default targets:
    every decoder linear)."""
    import json as _json

    cfg = _json.loads((Path(base) / "config.json").read_text())
    targets = tuple(targets) if targets is not None else lora_targets(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_shapes(cfg):
        module = name.removesuffix(".weight")
        if not module.endswith(targets) or len(shape) != 2:
            continue
        out_f, in_f = shape
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(r, in_f, generator=gen) / in_f ** 0.5).to(dtype)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, r, generator=gen) * 1e-3).to(dtype)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dest / "adapter_config.json").write_text(_json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(base).resolve()),
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True}, indent=2))
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("checkpoint", help="a HF checkpoint of a preset's shapes, random weights")
    c.add_argument("preset", choices=sorted(presets()))
    c.add_argument("dest", type=Path)
    c.add_argument("--tokenizer", type=Path, help="HF tokenizer dir to copy in")
    c.add_argument("--layers", type=int, help="override num_hidden_layers")
    c.add_argument("--tied", action="store_true", help="tie_word_embeddings")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--shard-gb", type=float, default=2.0)
    c.add_argument("--shapes-only", action="store_true",
                   help="headers and sparse files only (the weights read as zeros): for plans and dry runs")
    ad = sub.add_parser("adapter", help="a PEFT LoRA adapter on all projections of a checkpoint")
    ad.add_argument("base", type=Path)
    ad.add_argument("dest", type=Path)
    ad.add_argument("--r", type=int, default=64)
    ad.add_argument("--alpha", type=int, default=128)
    ad.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.what == "adapter":
        write_lora_adapter(a.base, a.dest, r=a.r, alpha=a.alpha, seed=a.seed)
        print(a.dest)
        return
    over = {}
    if a.layers:
        over["num_hidden_layers"] = a.layers
        over["max_window_layers"] = a.layers
    if a.tied:
        over["tie_word_embeddings"] = True
    write_checkpoint(a.dest, preset_config(a.preset, **over), a.tokenizer, seed=a.seed,
                     shard_bytes=int(a.shard_gb * (1 << 30)), shapes_only=a.shapes_only)
    print(a.dest)


if __name__ == "__main__":
    main()
