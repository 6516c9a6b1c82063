"""GPTQ checkpoints on disk: the AutoGPTQ v1 layout and the compressed-tensors pack-quantized one.

AutoGPTQ v1 ("gptq" checkpoint_format), per linear layer `L` with weight [out, in]:

    L.qweight  int32 [in * bits / 32, out]   32/bits codes per word along the input dimension;
                                              code of input j at bits (j % 8) * 4 of word j // 8 (4-bit)
    L.qzeros   int32 [groups, out * bits / 32] zero - 1 (v1 stores it off by one), packed along out
    L.scales   fp16  [groups, out]
    L.g_idx    int32 [in]                     group of each input column (act-order permutes it)
    dequantized:  W[o, j] = scales[g, o] * (code[j, o] - (qzeros[g, o] + 1)),  g = g_idx[j]

compressed-tensors "pack-quantized" (what transformers loads on the CPU), per layer:

    L.weight_packed  int32 [out, in * bits / 32]   codes - 2^(bits-1) (signed), stored + 2^(bits-1),
                                                   element j at bits (j % 8) * 4 of word j // 8
    L.weight_scale   [out, groups] (the model's dtype),  L.weight_shape int64 [2]
    L.weight_zero_point int32 [out * bits / 32, groups]  (asymmetric only; zero - 2^(bits-1), packed along out)
    L.weight_g_idx   int32 [in]                          (act-order with dynamic groups only)

The symmetric codes are the same numbers in both: a GPTQ code q with zero 2^(bits-1) is the
compressed-tensors value q - 2^(bits-1) stored with its offset added back.
"""
from __future__ import annotations

import torch
from torch import Tensor

from quantkit.kernels.gptq import Quantized

# the layouts written: AutoGPTQ v1 (OUT/gptq) and compressed-tensors pack-quantized (OUT/gptq-ct)
FORMATS = ("gptq", "compressed-tensors")


def pack_along_rows(codes: Tensor, bits: int) -> Tensor:
    """uint codes [n, m] -> int32 [n * bits / 32, m]: 32/bits consecutive rows per word, low bits first."""
    per = 32 // bits
    n, m = codes.shape
    assert n % per == 0, (n, per)
    c = codes.to(torch.int64).reshape(n // per, per, m)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    words = (c << shifts).sum(1)                   # < 2^32: no carries between codes
    return (words - ((words >> 31) << 32)).to(torch.int32)     # two's complement int32


def autogptq_tensors(prefix: str, qz: Quantized) -> dict[str, Tensor]:
    out, cols = qz.q.shape
    if (out * qz.bits) % 32 or (cols * qz.bits) % 32:
        raise ValueError(f"{prefix}: [{out}, {cols}] cannot be packed {32 // qz.bits} codes to an int32")
    return {
        f"{prefix}.qweight": pack_along_rows(qz.q.T, qz.bits),
        f"{prefix}.qzeros": pack_along_rows(qz.zeros - 1, qz.bits).T.contiguous(),
        f"{prefix}.scales": qz.scales.T.contiguous().to(torch.float16),
        f"{prefix}.g_idx": qz.g_idx.to(torch.int32),
    }


def compressed_tensors_tensors(prefix: str, qz: Quantized, dtype: torch.dtype) -> dict[str, Tensor]:
    out, cols = qz.q.shape
    t = {
        f"{prefix}.weight_packed": pack_along_rows(qz.q.T, qz.bits).T.contiguous(),   # codes are value + offset
        f"{prefix}.weight_scale": qz.scales.to(dtype).contiguous(),
        f"{prefix}.weight_shape": torch.tensor([out, cols], dtype=torch.int64),
    }
    if not qz.sym:
        t[f"{prefix}.weight_zero_point"] = pack_along_rows(qz.zeros, qz.bits)   # (zero - half) + half, along out
    if qz.act_order and not qz.static_groups:      # "group" act-order: groups follow the permuted order
        t[f"{prefix}.weight_g_idx"] = qz.g_idx.to(torch.int32)
    return t


def autogptq_config(bits: int, group_size: int, sym: bool, desc_act: bool, static_groups: bool, damp: float) -> dict:
    """quantize_config.json, and (with quant_method) the quantization_config of config.json."""
    return {"bits": bits, "group_size": group_size, "damp_percent": damp, "desc_act": desc_act,
            "static_groups": static_groups, "sym": sym, "true_sequential": True, "model_name_or_path": None,
            "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq"}


def compressed_tensors_config(bits: int, group_size: int, sym: bool, act_order: bool, static_groups: bool,
                              ignore: list[str]) -> dict:
    # act-order with static groups changes only the calibration, not the format: "weight";
    # with dynamic groups the columns of a group are scattered and g_idx is stored: "group"
    actorder = ("weight" if static_groups else "group") if act_order else None
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "input_activations": None, "output_activations": None,
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group",
                        "group_size": group_size, "actorder": actorder,
                        "dynamic": False, "observer": "minmax", "observer_kwargs": {}, "block_structure": None},
        }},
        "ignore": ignore, "kv_cache_scheme": None,
    }
