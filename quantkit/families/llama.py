"""Llama 3.x and SmolLM2 (LlamaForCausalLM): llama.cpp's `llama` architecture.

On the way to GGUF the q and k rows of each head are permuted into llama.cpp's RoPE order, and a
llama3 rope scaling adds the `rope_freqs` tensor. The converter writes `llama.vocab_size` and
`rope.dimension_count`, and `tokenizer.ggml.add_space_prefix` from tokenizer_config.json. Llama 2 era
checkpoints (and Mistral, which the converter treats as Llama) bring a SentencePiece tokenizer.model.
"""
from __future__ import annotations

import math

import gguf
import torch

from .base import BPE, SPM, TINY, Family, HParams, SourceTensor, TestFixture, register

# config.json of meta-llama/Llama-3.1-8B-Instruct, as published
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "initializer_range": 0.02, "max_position_embeddings": 131072,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's RoPE wants each head's rows as (pairs interleaved) rather than HF's (halves):
    rows as (n_head, 2, head_dim/2), the last two axes swapped."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of permute_rows (a GGUF's q/k rows back in HF's order)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


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


@register
class Llama(Family):
    name = "llama"
    hf_names = ("LlamaForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    tokenizers = (BPE, SPM)     # Llama 3 and SmolLM; Llama 2 and TinyLlama
    pre_tokenizers = ("llama-bpe", "smollm")
    rope_types = ("", "linear", "yarn", "llama3")
    presets = {"llama3-8b": LLAMA31_8B, "llama3-tiny": {**LLAMA31_8B, **TINY}}
    fixture = TestFixture(tokenizer="llama3", vectors="ggml-vocab-llama-bpe.gguf", tied=False)

    def transform(self, hf_name, hp):
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            # each head's rows are permuted among themselves: a chunk of whole heads permutes alone
            hd = hp.head_dim
            return (lambda w: permute_rows(w, w.shape[0] // hd)), hd
        return None, 1

    def generated_tensors(self, hp):
        if hp.rope_type != "llama3":
            return []
        return [SourceTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None,
                             (hp.head_dim // 2,), generate=lambda: llama3_rope_factors(hp))]

    def hparam_kv(self, hp):
        K, a, T = gguf.Keys, self.gguf_name, gguf.GGUFValueType
        return super().hparam_kv(hp) + [(K.LLM.VOCAB_SIZE.format(arch=a), hp.n_vocab, T.UINT32),
                                        (K.Rope.DIMENSION_COUNT.format(arch=a), hp.head_dim, T.UINT32)]

    def tokenizer_kv(self, tokenizer_config):
        if tokenizer_config.get("add_prefix_space") is None:
            return []
        return [(gguf.Keys.Tokenizer.ADD_PREFIX, tokenizer_config["add_prefix_space"], gguf.GGUFValueType.BOOL)]
