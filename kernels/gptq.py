"""GPTQ (Frantar et al., 2022) and round-to-nearest for one linear layer, pure torch.

    W [out, in] ≈ scale[g] * (q - zero[g])      q, zero in [0, 2^bits - 1], g = g_idx[column]

GPTQ quantizes the columns one at a time and spreads each column's rounding error over the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = 2 X Xᵀ over the
calibration tokens), in blocks of `block` columns with a lazy update of the rest:

    H += damp * mean(diag H) * I;   U = cholesky(H⁻¹)ᵀ (upper)
    for each column i:  q_i = quant(w_i);  e = (w_i - q_i) / U_ii;  w_{i+1..} -= e ⊗ U_{i, i+1..}

Grouping: every `group_size` columns share a scale and zero, computed when the first column of the
group is reached, from the weights as they are then (error feedback included). Symmetric groups
have zero = 2^(bits-1) and scale = max|w| / (2^(bits-1) - 1/2) over the group (AutoGPTQ's
quantizer: the range [-max, max] over 2^bits - 1 steps); asymmetric ones the group's [min, max]
(always containing 0), with the zero kept >= 1 because AutoGPTQ v1 stores zero - 1. Scales are
rounded to fp16, as they are stored, before any weight is quantized with them. Act-order (desc_act) quantizes columns by decreasing diag(H); groups then
follow that order, and g_idx maps each original column to its group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Quantized:
    """The integer form of one layer's weight, in original column order."""
    q: Tensor           # int32 [out, in], codes in [0, 2^bits - 1]
    scales: Tensor      # float32 [out, groups]
    zeros: Tensor       # int32 [out, groups]
    g_idx: Tensor       # int32 [in]: the group of each column
    bits: int
    group_size: int
    sym: bool
    act_order: bool
    static_groups: bool = False

    def dequantize(self) -> Tensor:
        g = self.g_idx.long()
        return self.scales[:, g] * (self.q - self.zeros[:, g]).float()


def group_params(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """(scale [rows], zero [rows]) of AutoGPTQ's Quantizer.find_params for the columns in w [rows, g]."""
    maxq = 2 ** bits - 1
    xmin = torch.clamp(w.min(1).values, max=0)
    xmax = torch.clamp(w.max(1).values, min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    # the scale is stored as fp16: quantize with exactly the value a loader will use
    scale = ((xmax - xmin) / maxq).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        # AutoGPTQ v1 stores zero - 1 in `bits` bits: a zero of 0 cannot be stored, start at 1
        zero = torch.clamp(torch.round(-xmin / scale), 1, maxq)
    return scale, zero


def quantize_column(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


def _check(W: Tensor, group_size: int) -> int:
    cols = W.shape[1]
    g = cols if group_size in (-1, 0) else group_size
    if cols % g:
        raise ValueError(f"group size {g} does not divide the input dimension {cols}")
    return g


def rtn(W: Tensor, bits: int = 4, group_size: int = 128, sym: bool = True) -> Quantized:
    """Round-to-nearest with the same groups, scales and zeros: the baseline GPTQ must beat."""
    W = W.float()
    g = _check(W, group_size)
    out, cols = W.shape
    Wg = W.reshape(out, cols // g, g).transpose(0, 1).reshape(-1, g)         # [groups * out, g]
    scale, zero = group_params(Wg, bits, sym)
    q = quantize_column(Wg, scale[:, None], zero[:, None], bits)
    q = q.reshape(cols // g, out, g).transpose(0, 1).reshape(out, cols)
    return Quantized(q.to(torch.int32), scale.reshape(cols // g, out).T.contiguous(),
                     zero.reshape(cols // g, out).T.contiguous().to(torch.int32),
                     (torch.arange(cols) // g).to(torch.int32), bits, g, sym, False)


def gptq(W: Tensor, H: Tensor, bits: int = 4, group_size: int = 128, sym: bool = True, act_order: bool = False,
         damp: float = 0.01, block: int = 128, static_groups: bool = False) -> Quantized:
    """GPTQ of W [out, in] given H [in, in] = 2 X Xᵀ of its inputs (float32 work on W's device).

    static_groups: every group's scale and zero come from the original weights, before any error
    feedback, and groups stay the consecutive columns of the original order even with act-order
    (g_idx = column // group_size, which every loader reads without reordering)."""
    W = W.clone().float()
    H = H.clone().float().to(W.device)
    g = _check(W, group_size)
    out, cols = W.shape
    maxq = 2 ** bits - 1

    dead = torch.diag(H) == 0                 # inputs that were always 0: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    scales = torch.zeros(out, cols // g, device=W.device)
    zeros = torch.zeros(out, cols // g, device=W.device)
    if static_groups:
        for j in range(0, cols, g):
            scales[:, j // g], zeros[:, j // g] = group_params(W[:, j:j + g], bits, sym)
        group_of = perm // g                 # the (original) group of each permuted column
    else:
        group_of = torch.arange(cols, device=W.device) // g
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError as e:     # torch raises _LinAlgError (a RuntimeError) for a non-positive-definite H
        raise ValueError(f"the Hessian is not positive definite even with damping {damp}: {e}") from None

    # groups start at multiples of g in the (permuted) column order; a block holds whole groups when
    # g divides it, so a group's parameters always come from weights with all earlier errors applied
    block = max(g, block // g * g) if g <= block else block
    Q = torch.zeros_like(W)
    group_of = group_of.tolist()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            gi = group_of[col]
            if col % g == 0 and not static_groups:
                grp = W1[:, i:i + g] if g <= block else torch.cat([W1[:, i:], W[:, i2:col + g]], dim=1)
                scales[:, gi], zeros[:, gi] = group_params(grp, bits, sym)
            s, z = scales[:, gi], zeros[:, gi]
            w = W1[:, i]
            q = quantize_column(w, s, z, bits)
            Q[:, col] = q
            err = (w - s * (q - z)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    g_idx = torch.tensor(group_of, device=W.device)[inv]      # group of each original column
    assert int(Q.max()) <= maxq
    return Quantized(Q[:, inv].to(torch.int32).cpu(), scales.cpu(), zeros.to(torch.int32).cpu(),
                     g_idx.to(torch.int32).cpu(), bits, g, sym, act_order, static_groups)
