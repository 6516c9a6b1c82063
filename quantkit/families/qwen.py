"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM, also DeepSeek-R1-Distill-Qwen) and Qwen3 (Qwen3ForCausalLM):
llama.cpp's `qwen2` and `qwen3` architectures, one converter class and its subclass.

Llama-shaped decoders with no q/k permute (llama.cpp's qwen graphs use NEOX RoPE, HF's order) and
tied or untied heads. Qwen2 adds biases to q, k and v (written F32, as every 1-D tensor); Qwen3 drops
them for a per-head RMSNorm on q and k.
"""
from __future__ import annotations

import gguf

from .base import TINY, Family, TestFixture, register

# config.json of Qwen/Qwen2.5-7B-Instruct, as published
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
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
class Qwen2(Family):
    name = "qwen2"
    hf_names = ("Qwen2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    pre_tokenizers = ("qwen2", "deepseek-r1-qwen")
    config_has_head_dim = False         # Qwen2Config has no head_dim
    presets = {"qwen2.5-7b": QWEN25_7B, "qwen2.5-tiny": {**QWEN25_7B, **TINY, "max_window_layers": 8}}
    # Qwen3's tokenizer is Qwen2's (the same pre-tokenizer hash)
    fixture = TestFixture(tokenizer="qwen3", vectors="ggml-vocab-qwen2.gguf", tied=False)

    def layer_tensors(self, hp):
        out = {}
        for name, shape in super().layer_tensors(hp).items():
            out[name] = shape
            if name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
                out[name.removesuffix(".weight") + ".bias"] = (shape[0],)     # right after its weight
        return out


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
