"""Supported architectures as data: HF names → GGUF names, q/k permutation, hyper-parameters.

Tensor names come from gguf-py's TensorNameMap (the table convert_hf_to_gguf.py uses), so a name
llama.cpp expects is never spelled here by hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import gguf
import torch

from .errors import InputError, UnsupportedError
from .hfmodel import HFModel

# Tensors the HF checkpoints carry that GGUF drops.
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


@dataclass(frozen=True)
class Architecture:
    hf_name: str
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool            # llama.cpp's Llama graph wants q/k rows in its own RoPE order
    qk_norm: bool               # Qwen3: per-head RMSNorm on q and k
    writes_vocab_size: bool     # `{arch}.vocab_size` and `rope.dimension_count` (Llama converter only)
    writes_space_prefix: bool   # tokenizer.ggml.add_space_prefix from tokenizer_config's add_prefix_space

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES = {a.hf_name: a for a in (
    Architecture("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True, qk_norm=False, writes_vocab_size=True,
                 writes_space_prefix=True),
    Architecture("Qwen3ForCausalLM", gguf.MODEL_ARCH.QWEN3, permute_qk=False, qk_norm=True, writes_vocab_size=False,
                 writes_space_prefix=False),
)}


def architecture_of(model: HFModel) -> Architecture:
    name = model.architecture
    if name not in ARCHITECTURES:
        raise UnsupportedError(f"architecture {name!r} is not supported (supported: {', '.join(ARCHITECTURES)})",
                               model.path / "config.json")
    return ARCHITECTURES[name]


@dataclass(frozen=True)
class HParams:
    """The numbers of config.json that shape the tensors and the GGUF metadata."""
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope: dict            # rope scaling parameters ({} when none)
    tied: bool

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv


def hparams_of(model: HFModel) -> HParams:
    c = model.config
    path = model.path / "config.json"

    def typed(key: str, value: Any, kind: type) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int,) if kind is int else (int, float)) or not value > 0:
            raise InputError(f"{key!r} must be a positive {'integer' if kind is int else 'number'}, not {value!r}", path)
        return value

    def need(key: str, kind: type = int) -> Any:
        if key not in c:
            raise InputError(f"missing {key!r}", path)
        return typed(key, c[key], kind)

    def optional(key: str, kind: type = int) -> Any:
        return None if c.get(key) is None else typed(key, c[key], kind)

    # transformers ≥ 5 writes `rope_parameters` (with rope_theta inside); 4.x `rope_scaling` + `rope_theta`
    rope_key = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    rope = c.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise InputError(f"{rope_key!r} must be an object, not {rope!r}", path)
    rope = dict(rope)
    theta = rope.pop("rope_theta", None) or c.get("rope_theta", 10000.0)
    theta = typed("rope_theta", theta, float)
    if rope.get("rope_type", rope.get("type")) in (None, "default"):
        rope = {}
    n_head = need("num_attention_heads")
    return HParams(
        n_layer=need("num_hidden_layers"), n_embd=need("hidden_size"), n_ff=need("intermediate_size"),
        n_head=n_head, n_head_kv=optional("num_key_value_heads") or n_head,
        head_dim=optional("head_dim") or need("hidden_size") // n_head,
        n_vocab=need("vocab_size"), n_ctx=need("max_position_embeddings"),
        rms_eps=need("rms_norm_eps", float), rope_theta=float(theta), rope=rope,
        tied=bool(c.get("tie_word_embeddings", False)),
    )


def expected_shapes(arch: Architecture, hp: HParams) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the checkpoint must hold, with its shape."""
    h, f, v, hd = hp.n_embd, hp.n_ff, hp.n_vocab, hp.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not hp.tied:
        out["lm_head.weight"] = (v, h)
    for i in range(hp.n_layer):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (hp.n_head * hd, h),
            p + "self_attn.k_proj.weight": (hp.n_head_kv * hd, h),
            p + "self_attn.v_proj.weight": (hp.n_head_kv * hd, h),
            p + "self_attn.o_proj.weight": (h, hp.n_head * hd),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
        if arch.qk_norm:
            out |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    return out


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's RoPE wants each head's rows as (pairs interleaved) rather than HF's (halves)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@dataclass(frozen=True)
class SourceTensor:
    """One GGUF tensor and how to produce it from the HF checkpoint (one read, one transform)."""
    gguf_name: str
    hf_name: str | None                 # None for generated tensors (rope_freqs)
    shape: tuple[int, ...]              # HF/torch order (rows, cols)
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None   # applied to whole row chunks
    generate: Callable[[], torch.Tensor] | None = None
    row_granule: int = 1                # row chunks must be multiples of this (whole heads for q/k)

    @property
    def layer(self) -> int:
        parts = self.gguf_name.split(".")
        return int(parts[1]) if parts[0] == "blk" else -1


def llama3_rope_factors(hp: HParams) -> torch.Tensor:
    # The same float32 arithmetic as convert_hf_to_gguf.py, so the F32 bytes match.
    r = hp.rope
    dim = hp.head_dim
    freqs = 1.0 / (hp.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = r.get("factor", 8.0)
    lo, hi = r.get("low_freq_factor", 1.0), r.get("high_freq_factor", 4.0)
    old_ctx = r.get("original_max_position_embeddings", 8192)
    lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < hi_wavelen:
            out.append(1)
        elif wavelen > lo_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def source_tensors(model: HFModel, arch: Architecture, hp: HParams) -> list[SourceTensor]:
    """The GGUF tensor list, in llama-quantize's order (non-layer tensors, then by layer; by name)."""
    refs = model.tensors
    expected = expected_shapes(arch, hp)
    for name, shape in expected.items():
        if name not in refs:
            raise InputError(f"missing tensor {name!r}", model.path)
        if refs[name].shape != shape:
            raise InputError(f"tensor {name!r} has shape {list(refs[name].shape)}, config.json implies {list(shape)}",
                             refs[name].shard)
        if refs[name].dtype not in ("BF16", "F16", "F32"):
            raise InputError(f"tensor {name!r} has dtype {refs[name].dtype}; expected BF16, F16 or F32",
                             refs[name].shard)
    extra = [n for n in refs if n not in expected and not n.endswith(SKIPPED_SUFFIXES)
             and not (hp.tied and n == "lm_head.weight")]
    if extra:
        raise UnsupportedError(f"{len(extra)} tensors that {arch.hf_name} does not have, e.g. {extra[0]!r}", model.path)

    names = gguf.get_tensor_name_map(arch.gguf_arch, hp.n_layer)
    out: list[SourceTensor] = []
    for hf_name in expected:
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UnsupportedError(f"no GGUF name for tensor {hf_name!r}", model.path)
        transform, granule = None, 1
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            # each head's rows are permuted among themselves: a chunk of whole heads permutes alone
            hd = hp.head_dim
            transform, granule = (lambda w: permute_rows(w, w.shape[0] // hd)), hd  # noqa: E731
        out.append(SourceTensor(gname, hf_name, expected[hf_name], transform, row_granule=granule))
    if hp.rope.get("rope_type", hp.rope.get("type", "")).lower() == "llama3":
        out.append(SourceTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None,
                                (hp.head_dim // 2,), generate=lambda: llama3_rope_factors(hp)))
    return sorted(out, key=lambda t: (t.layer, t.gguf_name))


def hparam_kv(arch: Architecture, hp: HParams) -> list[tuple[str, Any, gguf.GGUFValueType]]:
    """Architecture keys, as convert_hf_to_gguf.py writes them for these two families."""
    K, a, T = gguf.Keys, arch.name, gguf.GGUFValueType
    kv: list[tuple[str, Any, gguf.GGUFValueType]] = [
        (K.LLM.BLOCK_COUNT.format(arch=a), hp.n_layer, T.UINT32),
        (K.LLM.CONTEXT_LENGTH.format(arch=a), hp.n_ctx, T.UINT32),
        (K.LLM.EMBEDDING_LENGTH.format(arch=a), hp.n_embd, T.UINT32),
        (K.LLM.FEED_FORWARD_LENGTH.format(arch=a), hp.n_ff, T.UINT32),
        (K.Attention.HEAD_COUNT.format(arch=a), hp.n_head, T.UINT32),
        (K.Attention.HEAD_COUNT_KV.format(arch=a), hp.n_head_kv, T.UINT32),
    ]
    rtype = hp.rope.get("rope_type", hp.rope.get("type", "")).lower()
    if rtype == "linear" and hp.rope.get("factor") is not None:
        kv += [(K.Rope.SCALING_TYPE.format(arch=a), gguf.RopeScalingType.LINEAR.value, T.STRING),
               (K.Rope.SCALING_FACTOR.format(arch=a), hp.rope["factor"], T.FLOAT32)]
    elif rtype == "yarn" and hp.rope.get("factor") is not None:
        kv += [(K.Rope.SCALING_TYPE.format(arch=a), gguf.RopeScalingType.YARN.value, T.STRING),
               (K.Rope.SCALING_FACTOR.format(arch=a), hp.rope["factor"], T.FLOAT32),
               (K.Rope.SCALING_ORIG_CTX_LEN.format(arch=a), hp.rope["original_max_position_embeddings"], T.UINT32)]
    elif rtype not in ("", "llama3"):
        raise UnsupportedError(f"rope scaling type {rtype!r} is not supported (supported: llama3, linear, yarn)")
    kv += [
        (K.Rope.FREQ_BASE.format(arch=a), hp.rope_theta, T.FLOAT32),
        (K.Attention.LAYERNORM_RMS_EPS.format(arch=a), hp.rms_eps, T.FLOAT32),
        (K.Attention.KEY_LENGTH.format(arch=a), hp.head_dim, T.UINT32),
        (K.Attention.VALUE_LENGTH.format(arch=a), hp.head_dim, T.UINT32),
    ]
    if arch.writes_vocab_size:
        kv += [(K.LLM.VOCAB_SIZE.format(arch=a), hp.n_vocab, T.UINT32),
               (K.Rope.DIMENSION_COUNT.format(arch=a), hp.head_dim, T.UINT32)]
    return kv
