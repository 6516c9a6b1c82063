"""AutoGPTQ's own dequantization, transcribed: the reference the GPTQ tests read our AutoGPTQ
directories with (tests/test_gptq.py, tests/test_moe_gptq.py)."""
from __future__ import annotations

import torch


def autogptq_dequantize(qweight, qzeros, scales, g_idx, bits):
    """W [out, in] as AutoGPTQ v1 reads it (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, the
    torch path, act-order form: scales[g_idx] * (weight - zeros[g_idx]))."""
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, 32 // bits),
                                      wf.unsqueeze(0)).to(torch.int16 if bits == 8 else torch.int8)
    zeros = zeros + 1
    zeros = torch.bitwise_and(zeros, (2 ** bits) - 1)
    zeros = zeros.reshape(zeros.shape[0], zeros.shape[1] * zeros.shape[2])
    weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, 32 // bits, -1),
                                       wf.unsqueeze(-1)).to(torch.int16 if bits == 8 else torch.int8)
    weight = torch.bitwise_and(weight, (2 ** bits) - 1)
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    g = g_idx.long()
    return (scales[g].float() * (weight - zeros[g]).float()).T, weight.T, zeros
