"""Mistral 7B v0.1–v0.3, Nemo and Small 3 (MistralForCausalLM): llama.cpp's `llama` architecture.

convert_hf_to_gguf.py converts a Hugging Face Mistral checkpoint with its Llama class: the same q/k
permute, keys and tensors. 7B v0.x brings a SentencePiece tokenizer.model (v0.1: 32000 pieces; v0.3:
32768, with [INST], [/INST] and the tool-call control pieces); Nemo and Small 3 a Tekken byte-level
BPE tokenizer.json (131072 tokens, llama.cpp pre-tokenizer `tekken`) and a head_dim of their own.
Mistral's sliding window is not written (the converter writes none for llama).
"""
from __future__ import annotations

from ..errors import InputError, UnsupportedError
from .base import ATTENTION, BPE, SPM, TINY, Experts, TestFixture, register
from .llama import Llama

# config.json of mistralai/Mistral-7B-Instruct-v0.3, as published
MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32768,
}

# config.json of mistralai/Mistral-Nemo-Instruct-2407, as published
MISTRAL_NEMO_12B = {
    **MISTRAL_7B_V03, "head_dim": 128, "hidden_size": 5120, "max_position_embeddings": 1024000,
    "num_hidden_layers": 40, "vocab_size": 131072,
}


@register
class Mistral(Llama):
    name = "mistral"
    hf_names = ("MistralForCausalLM",)
    tokenizers = (SPM, BPE)
    pre_tokenizers = ("tekken",)
    rope_types = ("", "linear", "yarn")
    presets = {"mistral-7b": MISTRAL_7B_V03, "mistral-tiny": {**MISTRAL_7B_V03, **TINY},
               "mistral-nemo-12b": MISTRAL_NEMO_12B}
    # llama.cpp's SPM test vectors are Llama 2's vocabulary: tests/test_sentencepiece.py runs them
    fixture = TestFixture(tokenizer="mistral-v3", vectors=None, tied=False)


# config.json of mistralai/Mixtral-8x7B-Instruct-v0.1, as published
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 32000,
}
EXPERT_LINEARS = ("w1", "w2", "w3")      # gate, down, up


@register
class Mixtral(Llama):
    """Mixtral 8x7B / 8x22B (MixtralForCausalLM): llama.cpp's `llama` with experts. Each layer's eight
    experts (w1, w2, w3 per expert) are stacked into ffn_{gate,down,up}_exps and read expert by expert;
    the router (block_sparse_moe.gate) is ffn_gate_inp; llama-quant.cpp's 8-expert rules apply (plan)."""
    name = "mixtral"
    hf_names = ("MixtralForCausalLM",)
    tokenizers = (SPM,)
    pre_tokenizers = ()
    rope_types = ("", "linear", "yarn")
    presets = {"mixtral-8x7b": MIXTRAL_8X7B,
               "mixtral-tiny": {**MIXTRAL_8X7B, **TINY, "intermediate_size": 256}}
    gptq_groups = (ATTENTION[:3], ATTENTION[3:])
    # transformers 5 renames block_sparse_moe to mlp and fuses w1 and w3 (gate, up) into gate_up_proj
    experts_layout = Experts("mlp.experts", "block_sparse_moe.experts.{e}", ("w1", "w3", "w2"),
                             router=("mlp.gate", "block_sparse_moe.gate"))
    config_has_head_dim = False         # MixtralConfig leaves head_dim unset
    fixture = TestFixture(tokenizer="mistral-v1", vectors=None, tied=False)

    def complete_config(self, c, path=None):
        c = {"num_experts_per_tok": 2, **c}
        n = c.get("num_local_experts")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"'num_local_experts' must be a positive integer, not {n!r}", path)
        if not 0 < c["num_experts_per_tok"] <= n:
            raise InputError(f"num_experts_per_tok {c['num_experts_per_tok']} must be between 1 and "
                             f"num_local_experts {n}", path)
        return c

    def layer_tensors(self, hp):
        h, f = hp.n_embd, hp.n_ff
        t = {k: v for k, v in super().layer_tensors(hp).items() if not k.startswith("mlp.")}
        t["block_sparse_moe.gate.weight"] = (hp.n_expert, h)
        for e in range(hp.n_expert):
            for w in EXPERT_LINEARS:
                t[f"block_sparse_moe.experts.{e}.{w}.weight"] = (h, f) if w == "w2" else (f, h)
        return t

    def stacked_tensors(self, hp):
        # by the name the converter gives a stack (layers.N.feed_forward.experts.wK)
        return {f"layers.{i}.feed_forward.experts.{w}.weight":
                tuple(f"{self.layer_prefix(i)}block_sparse_moe.experts.{e}.{w}.weight" for e in range(hp.n_expert))
                for i in range(hp.n_layer) for w in EXPERT_LINEARS}

    def hparam_kv(self, hp):
        return self.with_expert_kv(hp, super().hparam_kv(hp))

    def checkpoint_names(self, model):
        # transformers 5's fused layout (save_pretrained(save_original_format=False): mlp.gate,
        # mlp.experts.gate_up_proj / down_proj) is not one llama.cpp's converter reads for Mixtral
        fused = next((n for n in model.tensors if ".mlp.experts.gate_up_proj" in n or ".mlp.experts.down_proj" in n), None)
        if fused is not None:
            raise UnsupportedError(f"tensor {fused!r}: Mixtral experts fused in one tensor are not supported (llama.cpp's "
                                   "converter reads block_sparse_moe.experts.N.w1/w2/w3); save the model with "
                                   "transformers' save_pretrained(save_original_format=True), its default",
                                   model.tensors[fused].shard)
        return super().checkpoint_names(model)
