"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM, also DeepSeek-R1-Distill-Qwen) and Qwen3 (Qwen3ForCausalLM):
llama.cpp's `qwen2` and `qwen3` architectures, one converter class and its subclass.

Llama-shaped decoders with no q/k permute (llama.cpp's qwen graphs use NEOX RoPE, HF's order) and
tied or untied heads. Qwen2 adds biases to q, k and v (written F32, as every 1-D tensor); Qwen3 drops
them for a per-head RMSNorm on q and k.
"""
from __future__ import annotations

import gguf

from ..errors import InputError, UnsupportedError
from .base import ATTENTION, TINY, Experts, Family, TestFixture, register

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


# config.json of Qwen/Qwen3-30B-A3B, as published
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
# config.json of Qwen/Qwen1.5-MoE-A2.7B, as published
QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
    "max_window_layers": 21, "moe_intermediate_size": 1408, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
MOE_TINY = {**TINY, "max_window_layers": 8, "moe_intermediate_size": 256, "num_experts": 4, "num_experts_per_tok": 2}
EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")


class _Experts(Family):
    """Qwen's MoE layers: the dense MLP replaced by a router (mlp.gate) and experts stacked into
    llama.cpp's ffn_{gate,up,down}_exps, read expert by expert. Two layouts on disk, layer by layer:
    one tensor per expert (as published, and as transformers 5's save_pretrained writes by default),
    or fused as transformers 5 holds them (save_pretrained(save_original_format=False)): gate_up_proj
    [n_expert, 2 x ffn, hidden] (each expert's gate rows, then its up rows) and down_proj [n_expert,
    hidden, ffn], with or without a `.weight` suffix, as the converter reads them."""
    gptq_groups = (ATTENTION[:3], ATTENTION[3:])
    experts_layout = Experts("mlp.experts", "mlp.experts.{e}", EXPERT_LINEARS)

    def complete_config(self, c, path=None):
        c = {"decoder_sparse_step": 1, "mlp_only_layers": [], "num_experts_per_tok": 8, **c}
        if c.get("num_local_experts") is not None:
            # transformers 5 saves Qwen3-MoE's num_experts under this name; the converter reads it first
            c["num_experts"] = c["num_local_experts"]
        if c["decoder_sparse_step"] != 1 or c["mlp_only_layers"]:
            raise UnsupportedError("dense MLP layers among the expert layers (decoder_sparse_step / mlp_only_layers) "
                                   "are not supported", path)
        for key in ("num_experts", "moe_intermediate_size"):
            if not isinstance(c.get(key), int) or isinstance(c.get(key), bool) or c[key] < 1:
                raise InputError(f"{key!r} must be a positive integer, not {c.get(key)!r}", path)
        if not 0 < c["num_experts_per_tok"] <= c["num_experts"]:
            raise InputError(f"num_experts_per_tok {c['num_experts_per_tok']} must be between 1 and num_experts "
                             f"{c['num_experts']}", path)
        return c

    def layer_tensors(self, hp):
        t = super().layer_tensors(hp)
        h, f, n = hp.n_embd, hp.config["moe_intermediate_size"], hp.n_expert
        i = list(t).index("mlp.gate_proj.weight")
        items = [kv for kv in t.items() if not kv[0].startswith("mlp.")]
        experts = [(f"mlp.experts.{e}.{m}.weight", (h, f) if m == "down_proj" else (f, h))
                   for e in range(n) for m in EXPERT_LINEARS]
        return dict(items[:i] + [("mlp.gate.weight", (n, h))] + experts + self.shared_expert(hp) + items[i:])

    def shared_expert(self, hp) -> list:
        return []

    def fused_experts(self, hp):
        h, f, n = hp.n_embd, hp.config["moe_intermediate_size"], hp.n_expert
        return {"mlp.experts.gate_up_proj": ((n, 2 * f, h), {"mlp.experts.gate_proj.weight": (0, f),
                                                               "mlp.experts.up_proj.weight": (f, 2 * f)}),
                "mlp.experts.down_proj": ((n, h, f), {"mlp.experts.down_proj.weight": (0, h)})}

    def checkpoint_names(self, model):
        # the converter reads the fused tensors with a `.weight` suffix too
        fused = tuple(f".{n}.weight" for n in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
        return {n.removesuffix(".weight") if n.endswith(fused) else n: n for n in model.tensors}

    def stacked_tensors(self, hp):
        return {f"{self.layer_prefix(i)}mlp.experts.{m}.weight":
                tuple(f"{self.layer_prefix(i)}mlp.experts.{e}.{m}.weight" for e in range(hp.n_expert))
                for i in range(hp.n_layer) for m in EXPERT_LINEARS}

    def hparam_kv(self, hp):
        # TextModel's keys with the expert counts; then Qwen2MoeModel's
        K, a, T, c = gguf.Keys, self.gguf_name, gguf.GGUFValueType, hp.config
        kv = self.with_expert_kv(hp, super().hparam_kv(hp))
        kv.append((K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=a), c["moe_intermediate_size"], T.UINT32))
        if c.get("shared_expert_intermediate_size") is not None:
            kv.append((K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=a), c["shared_expert_intermediate_size"],
                       T.UINT32))
        return kv


@register
class Qwen3Moe(_Experts, Qwen3):
    """Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): llama.cpp's `qwen3moe`."""
    name = "qwen3moe"
    hf_names = ("Qwen3MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    presets = {"qwen3-30b-a3b": QWEN3_30B_A3B, "qwen3moe-tiny": {**QWEN3_30B_A3B, **MOE_TINY, "head_dim": 64}}
    fixture = TestFixture(tokenizer="qwen3", vectors="ggml-vocab-qwen2.gguf", tied=False)


@register
class Qwen2Moe(_Experts, Qwen2):
    """Qwen1.5-MoE / Qwen2-MoE (Qwen2MoeForCausalLM): llama.cpp's `qwen2moe`, with a shared expert beside
    the routed ones (ffn_{gate,up,down}_shexp and its gate ffn_gate_inp_shexp)."""
    name = "qwen2moe"
    hf_names = ("Qwen2MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2MOE
    pre_tokenizers = ("qwen2",)
    presets = {"qwen1.5-moe-a2.7b": QWEN15_MOE_A27B,
               "qwen2moe-tiny": {**QWEN15_MOE_A27B, **MOE_TINY, "shared_expert_intermediate_size": 512}}
    fixture = TestFixture(tokenizer="qwen3", vectors="ggml-vocab-qwen2.gguf", tied=False)
    bnb_keep = ("shared_expert_gate",)      # one output row: bitsandbytes' 4-bit CPU kernel refuses it
    experts_layout = Experts("mlp.experts", "mlp.experts.{e}", EXPERT_LINEARS, keep=("gate", "shared_expert_gate"),
                             shared=tuple(f"mlp.shared_expert.{m}" for m in EXPERT_LINEARS))

    def shared_expert(self, hp):
        h, f = hp.n_embd, hp.config["shared_expert_intermediate_size"]
        return [("mlp.shared_expert.gate_proj.weight", (f, h)), ("mlp.shared_expert.up_proj.weight", (f, h)),
                ("mlp.shared_expert.down_proj.weight", (h, f)), ("mlp.shared_expert_gate.weight", (1, h))]
