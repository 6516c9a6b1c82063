"""Gemma 2 (Gemma2ForCausalLM) and Gemma 3 (Gemma3ForCausalLM): llama.cpp's `gemma2` and `gemma3`.

What they bring: every RMSNorm weight is stored as (gain - 1), so it is shifted by +1 on the way out
(in float32, as the converter adds it; Gemma 3's q/k norms too); each layer has
sandwich norms (after attention and after the MLP as well as before them); the head is tied; no q/k
permute (NEOX RoPE). Gemma 2 writes its attention and final logit soft-capping and sliding window,
Gemma 3 its local (sliding-window layers') RoPE base and window. The vocabulary is the SentencePiece
tokenizer.model only, with add_space_prefix = false written after it.

The converter reads transformers' config object, so the config classes' defaults are filled in here
(GEMMA2_DEFAULTS, GEMMA3_DEFAULTS), and Gemma 3's two RoPE settings are read from either form
config.json takes (transformers 4: rope_theta / rope_local_base_freq / rope_scaling; 5:
rope_parameters.full_attention / sliding_attention).
"""
from __future__ import annotations

import gguf

from ..errors import InputError
from .base import SPM, TINY, Family, HParams, TestFixture, register

# transformers' Gemma2Config / Gemma3TextConfig defaults for the keys the converter reads
GEMMA2_DEFAULTS = {
    "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "sliding_window": 4096, "query_pre_attn_scalar": 256, "tie_word_embeddings": True,
}
GEMMA3_DEFAULTS = {
    **GEMMA2_DEFAULTS, "vocab_size": 262208, "max_position_embeddings": 131072, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "attn_logit_softcapping": None, "final_logit_softcapping": None,
}

# config.json of google/gemma-2-9b-it, as published
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "num_attention_heads": 16,
    "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "sliding_window_size": 4096,
    "torch_dtype": "float32", "use_cache": True, "vocab_size": 256000,
}
# config.json of google/gemma-3-1b-it, as published
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4,
    "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 262144,
}
# shrunk for tests: a head_dim of 64 with llama.cpp's attention scale (1/sqrt(head_dim)), and the
# vocabulary of the stand-in tokenizer (Gemma's own cannot be had offline: tests/fixtures/README.md)
GEMMA_TINY = {**TINY, "head_dim": 64, "query_pre_attn_scalar": 64, "vocab_size": 32768, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 0}


class _Gemma(Family):
    tokenizers = (SPM,)
    norm_shift = 1.0
    rope_types = ("", "linear")
    config_defaults: dict = {}

    def complete_config(self, c, path=None):
        return {**self.config_defaults, **c}

    def layer_tensors(self, hp: HParams):
        h = hp.n_embd
        t = super().layer_tensors(hp)
        return {**t, "pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,)}

    def transform(self, hf_name, hp):
        # Gemma's RMSNorm multiplies by (1 + weight), llama.cpp's by the weight (added in float32, as
        # the converter adds it)
        return (lambda x: x + self.norm_shift, 1) if hf_name.endswith("norm.weight") else (None, 1)

    def vocab_kv(self, vocab_model):
        return [(gguf.Keys.Tokenizer.ADD_PREFIX, False, gguf.GGUFValueType.BOOL)] if vocab_model == "llama" else []


@register
class Gemma2(_Gemma):
    name = "gemma2"
    hf_names = ("Gemma2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    config_defaults = GEMMA2_DEFAULTS
    presets = {"gemma2-9b": GEMMA2_9B, "gemma2-tiny": {**GEMMA2_9B, **GEMMA_TINY}}
    fixture = TestFixture(tokenizer="gemma-standin", vectors=None, tied=True)

    def hparam_kv(self, hp):
        # Gemma2Model.set_gguf_parameters: its own keys and order, no RoPE keys
        K, a, T, c = gguf.Keys, self.gguf_name, gguf.GGUFValueType, hp.config
        return self.kv(hp, "context_length", "embedding_length", "block_count", "feed_forward_length", "head_count",
                       "head_count_kv", "rms_eps", "key_length", "value_length") + [
                (K.LLM.ATTN_LOGIT_SOFTCAPPING.format(arch=a), c["attn_logit_softcapping"], T.FLOAT32),
                (K.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=a), c["final_logit_softcapping"], T.FLOAT32),
                (K.Attention.SLIDING_WINDOW.format(arch=a), c["sliding_window"], T.UINT32)]


@register
class Gemma3(_Gemma):
    name = "gemma3"
    hf_names = ("Gemma3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    config_defaults = GEMMA3_DEFAULTS
    presets = {"gemma3-1b": GEMMA3_1B, "gemma3-tiny": {**GEMMA3_1B, **GEMMA_TINY, "sliding_window": 64}}
    fixture = TestFixture(tokenizer="gemma-standin", vectors=None, tied=True)

    def complete_config(self, c, path=None):
        c = super().complete_config(c, path)
        rp = c.get("rope_parameters")
        if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
            # transformers 5: one RoPE setting per layer type
            full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
            if not isinstance(full, dict) or not isinstance(local, dict):
                raise InputError("'rope_parameters' must hold objects for full_attention and sliding_attention",
                                 path)
            c = {**c, "rope_theta": full.get("rope_theta", c["rope_theta"]),
                 "rope_local_base_freq": local.get("rope_theta", c["rope_local_base_freq"]),
                 "rope_scaling": {k: v for k, v in full.items() if k != "rope_theta"}}
            del c["rope_parameters"]
        return c

    def layer_tensors(self, hp):
        t = super().layer_tensors(hp)
        out = {}
        for k, v in t.items():
            out[k] = v
            if k == "self_attn.o_proj.weight":      # HF's order: q_norm, k_norm after the projections
                out["self_attn.q_norm.weight"] = (hp.head_dim,)
                out["self_attn.k_norm.weight"] = (hp.head_dim,)
        return out

    def hparam_kv(self, hp):
        # TextModel's keys (rope_freq_base: the global layers'), the local layers' base after it, then
        # what Gemma3Model.set_gguf_parameters adds (a key set twice keeps its first place)
        K, a, T, c = gguf.Keys, self.gguf_name, gguf.GGUFValueType, hp.config
        kv = []
        for key, val, vtype in super().hparam_kv(hp):
            kv.append((key, val, vtype))
            if key == K.Rope.FREQ_BASE.format(arch=a):
                kv.append((K.Rope.FREQ_BASE_SWA.format(arch=a), float(c["rope_local_base_freq"]), T.FLOAT32))
        if c.get("final_logit_softcapping"):
            kv.append((K.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=a), c["final_logit_softcapping"], T.FLOAT32))
        if c.get("sliding_window_pattern") != 1:
            kv.append((K.Attention.SLIDING_WINDOW.format(arch=a), c["sliding_window"], T.UINT32))
        return kv


# config.json of google/gemma-3-4b-it, as published
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}
# the text tower shrunk like gemma3-tiny; a one-layer vision tower of 64 wide
GEMMA3_4B_TINY = {
    **GEMMA3_4B, "text_config": {**GEMMA3_4B["text_config"], **GEMMA_TINY, "sliding_window": 64, "rope_scaling": None},
    "vision_config": {"hidden_size": 64, "image_size": 28, "intermediate_size": 128, "model_type": "siglip_vision_model",
                      "num_attention_heads": 2, "num_hidden_layers": 1, "patch_size": 14, "vision_use_head": False},
    "mm_tokens_per_image": 4, "image_token_index": 32765, "boi_token_index": 32764, "eoi_token_index": 32763,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
VISION = ("vision_tower.", "multi_modal_projector.")


@register
class Gemma3Multimodal(Gemma3):
    """The text tower of Gemma 3's multimodal checkpoints (4B-27B): the same GGUF as Gemma3ForCausalLM.
    The checkpoint names it `language_model.model.*` (as published, transformers 4) or
    `model.language_model.*` (saved by transformers 5); the vision tower and projector are left out."""
    name = "gemma3-multimodal"
    hf_names = ("Gemma3ForConditionalGeneration",)
    decoder_layers = "model.language_model.layers"
    embeddings = "model.language_model.embed_tokens"
    rotary = "model.language_model.rotary_emb"
    final_norm = "model.language_model.norm"
    presets = {"gemma3-4b": GEMMA3_4B, "gemma3-multimodal-tiny": GEMMA3_4B_TINY}
    fixture = TestFixture(tokenizer="gemma-standin", vectors=None, tied=True)

    def complete_config(self, c, path=None):
        text = c.get("text_config")
        if not isinstance(text, dict):
            raise InputError("a multimodal Gemma 3 config.json without a text_config object: no text model to "
                             "export", path)
        return super().complete_config({**c, **text}, path)

    def checkpoint_names(self, model):
        # transformers 4's layout (language_model.model.X) under transformers 5's names (model.language_model.X)
        return {("model.language_model." + n[len("language_model.model."):]
                 if n.startswith("language_model.model.") else n): n for n in model.tensors}

    def skipped_tensors(self, model):
        return [n for n in model.tensors if n.removeprefix("model.").startswith(VISION)]

    def mapped_name(self, hf_name):
        return hf_name.replace("language_model.", "")    # as the converter strips it
