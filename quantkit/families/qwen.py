"""Qwen3 (Qwen3ForCausalLM): llama.cpp's `qwen3` architecture.

A Llama-shaped decoder with a per-head RMSNorm on q and k, no q/k permute (llama.cpp's qwen3 graph
uses NEOX RoPE, HF's order), tied or untied heads.
"""
from __future__ import annotations

import gguf

from .base import TINY, Family, TestFixture, register

# config.json of Qwen/Qwen3-8B, as published
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
    "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288,
    "initializer_range": 0.02, "max_position_embeddings": 40960, "max_window_layers": 36,
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "use_sliding_window": False,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 151936,
}


@register
class Qwen3(Family):
    name = "qwen3"
    hf_names = ("Qwen3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3
    pre_tokenizers = ("qwen2",)
    presets = {"qwen3-8b": QWEN3_8B, "qwen3-tiny": {**QWEN3_8B, **TINY, "head_dim": 64, "max_window_layers": 8}}
    fixture = TestFixture(tokenizer="qwen3", vectors="ggml-vocab-qwen2.gguf", tied=True)

    def layer_tensors(self, hp):
        t = super().layer_tensors(hp)
        # HF's order: the q/k norms come right after o_proj
        i = list(t).index("self_attn.o_proj.weight") + 1
        items = list(t.items())
        return dict(items[:i] + [("self_attn.q_norm.weight", (hp.head_dim,)),
                                 ("self_attn.k_norm.weight", (hp.head_dim,))] + items[i:])
