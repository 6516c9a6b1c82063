"""Phi-3, Phi-3.5 and Phi-4 (Phi3ForCausalLM): llama.cpp's `phi3` architecture.

What they bring: q, k and v in one fused `qkv_proj` and the MLP's gate and up in one `gate_up_proj`,
kept fused in GGUF (`attn_qkv`, `ffn_up`; llama-quant.cpp gives `attn_qkv` attn_v's types,
quantkit.plan), no q/k permute (NEOX RoPE), and for the 128k variants LongRoPE: the long and
short factor tensors and the attention factor sqrt(1 + ln(ctx / original ctx) / ln(original ctx)),
which the converter writes while preparing the tensors (so it follows general.architecture). Phi-3's
converter types the added tokens of its SentencePiece vocabulary by its own rules (quantkit.tokenizer).
"""
from __future__ import annotations

import math

import gguf
import torch

from ..errors import InputError, UnsupportedError
from .base import BPE, SPM, TINY, Family, SourceTensor, TestFixture, register

# transformers' Phi3Config defaults for the keys the converter reads
PHI3_DEFAULTS = {
    "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": False,
}
# config.json of microsoft/Phi-3-mini-4k-instruct, as published
PHI3_MINI = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32064,
}
LONGROPE = ("longrope", "su")


def _rope(c: dict) -> tuple[dict, str, int]:
    """The RoPE scaling settings of a config (transformers 4's rope_scaling or 5's rope_parameters),
    their type, and how many dimensions of each head are rotated."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = str(rope.get("rope_type", rope.get("type", "")) or "").lower()
    partial = rope.get("partial_rotary_factor") or c.get("partial_rotary_factor") or 1.0
    return rope, kind, int(partial * c["hidden_size"]) // c["num_attention_heads"]


@register
class Phi3(Family):
    name = "phi3"
    hf_names = ("Phi3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.PHI3
    tokenizers = (SPM, BPE)
    rope_types = ("", "default") + LONGROPE
    added_token_rules = "phi3"
    gptq_groups = (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))
    presets = {"phi3-mini": PHI3_MINI, "phi3-tiny": {**PHI3_MINI, **TINY, "num_key_value_heads": 4}}
    fixture = TestFixture(tokenizer="phi-3", vectors="ggml-vocab-phi-3.gguf", tied=False)

    def complete_config(self, c, path=None):
        c = {**PHI3_DEFAULTS, **c}
        rope, kind, dims = _rope(c)
        if kind not in self.rope_types:
            raise UnsupportedError(f"rope scaling type {kind!r} is not supported for phi3 (supported: longrope)", path)
        if kind in LONGROPE:
            for key in ("long_factor", "short_factor"):
                f = rope.get(key)
                if not isinstance(f, list) or len(f) != dims // 2 or not all(isinstance(x, (int, float)) for x in f):
                    raise InputError(f"LongRoPE {key} must be a list of {dims // 2} numbers (half the rotated "
                                     f"head dimensions), not {f if not isinstance(f, list) else f'{len(f)} values'}",
                                     path)
        return c

    def layer_tensors(self, hp):
        h, f, hd = hp.n_embd, hp.n_ff, hp.head_dim
        return {"self_attn.o_proj.weight": (h, hp.n_head * hd),
                "self_attn.qkv_proj.weight": ((hp.n_head + 2 * hp.n_head_kv) * hd, h),
                "mlp.gate_up_proj.weight": (2 * f, h), "mlp.down_proj.weight": (h, f),
                "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}

    def _longrope(self, hp):
        rope, kind, _ = _rope(hp.config)
        return rope if kind in LONGROPE and rope.get("long_factor") else None

    def tensor_kv(self, hp):
        if self._longrope(hp) is None:
            return []
        orig = hp.config["original_max_position_embeddings"]
        scale = hp.n_ctx / orig
        factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        return [(gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch=self.gguf_name), factor, gguf.GGUFValueType.FLOAT32)]

    def generated_tensors(self, hp):
        rope = self._longrope(hp)
        if rope is None:
            return []
        out = []
        for tensor, key in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                            (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor")):
            values = rope[key]
            out.append(SourceTensor(gguf.TENSOR_NAMES[tensor] + ".weight", None, (len(values),),
                                    generate=lambda v=values: torch.tensor(v, dtype=torch.float32)))
        return out

    def hparam_kv(self, hp):
        # Phi3MiniModel.set_gguf_parameters: its own keys and order
        K, a, T, c = gguf.Keys, self.gguf_name, gguf.GGUFValueType, hp.config
        _, _, dims = _rope(c)
        return (self.kv(hp, "context_length")
                + [(K.Rope.SCALING_ORIG_CTX_LEN.format(arch=a), c["original_max_position_embeddings"], T.UINT32)]
                + self.kv(hp, "embedding_length", "feed_forward_length", "block_count", "head_count", "head_count_kv",
                          "rms_eps")
                + [(K.Rope.DIMENSION_COUNT.format(arch=a), dims, T.UINT32)]
                + self.kv(hp, "rope_freq_base")
                + [(K.Attention.SLIDING_WINDOW.format(arch=a), c.get("sliding_window") or 0, T.UINT32)])
