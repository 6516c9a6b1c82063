"""Mistral 7B v0.1–v0.3, Nemo and Small 3 (MistralForCausalLM): llama.cpp's `llama` architecture.

convert_hf_to_gguf.py converts a Hugging Face Mistral checkpoint with its Llama class: the same q/k
permute, keys and tensors. 7B v0.x brings a SentencePiece tokenizer.model (v0.1: 32000 pieces; v0.3:
32768, with [INST], [/INST] and the tool-call control pieces); Nemo and Small 3 a Tekken byte-level
BPE tokenizer.json (131072 tokens, llama.cpp pre-tokenizer `tekken`) and a head_dim of their own.
Mistral's sliding window is not written (the converter writes none for llama).
"""
from __future__ import annotations

from .base import BPE, SPM, TINY, TestFixture, register
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
