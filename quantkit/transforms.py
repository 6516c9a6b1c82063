"""Merges as pure functions on a range of rows of one tensor: float32 in, float32 out.

The rows [start, stop) of a base tensor go through that tensor's ops in order; the caller rounds
the result once to the output dtype. `w0` is the unmerged base (after replacements), which DoRA's
weight norm is taken from, as peft takes it.

Two invariances make a merge written to disk and a merge done on the fly inside an export give the
same bits whatever the row chunks: the low-rank product is computed on blocks of DELTA_BLOCK rows
aligned to absolute row indices, then sliced; and DoRA's row norm accumulates in float64 (torch
may split a float32 reduction differently for different row counts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from .adapters import LoraTerm

DELTA_BLOCK = 1024


def lora_delta(term: LoraTerm, rows: slice) -> Tensor:
    """Rows of peft's get_delta_weight: transpose?(B @ A) * scaling, in float32."""
    blocks = []
    for b0 in range(rows.start // DELTA_BLOCK * DELTA_BLOCK, rows.stop, DELTA_BLOCK):
        b1 = b0 + DELTA_BLOCK
        block = (term.B @ term.A[:, b0:b1]).T if term.transposed else term.B[b0:b1] @ term.A
        blocks.append(block[max(rows.start, b0) - b0: min(rows.stop, b1) - b0])
    delta = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    return delta * term.scaling


class Op(Protocol):
    def __call__(self, x: Tensor, w0: Tensor, rows: slice) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class Replace:
    """modules_to_save / a saved embedding layer: the adapter's tensor replaces the base's."""
    tensor: Tensor

    def __call__(self, x: Tensor, w0: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        new = self.tensor[rows].to(device=x.device, dtype=torch.float32)
        return new, new


@dataclass(frozen=True)
class Lora:
    """W + scaling * (B @ A), or DoRA: m / ||W0 + delta||_row * (W + delta)."""
    term: LoraTerm

    def __call__(self, x: Tensor, w0: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        delta = lora_delta(self.term, rows)
        if self.term.magnitude is None:
            return x + delta, w0
        norm = torch.linalg.norm((w0 + delta).double(), dim=1).float()
        factor = self.term.magnitude[rows] / norm
        return factor.view(-1, 1) * (x + delta), w0


@dataclass(frozen=True)
class ExpertLora:
    """LoRA on experts fused in one [experts, rows, cols] tensor: each piece adds scaling * (B @ A)
    to rows [first, first + len(B)) of its expert's matrix (a ParamWrapper's whole matrix, or the
    gate or up half that one expert's gate_proj / up_proj holds)."""
    pieces: dict[int, list[tuple[int, LoraTerm]]]       # expert → (first row, update)

    def __call__(self, x: Tensor, w0: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        # x: whole experts [rows.start, rows.stop)
        return torch.stack([self.expert(x[i], e, slice(0, x.shape[1]))
                            for i, e in enumerate(range(rows.start, rows.stop))]), w0

    def expert(self, x: Tensor, e: int, rows: slice) -> Tensor:
        """Rows [rows.start, rows.stop) of expert e's matrix; the delta's blocks are aligned to the
        piece's own rows, so any split into row ranges gives the same bits."""
        pieces = [(first, t) for first, t in self.pieces.get(e, ()) if first < rows.stop and first + t.B.shape[0] > rows.start]
        if not pieces:
            return x
        x = x.clone()
        for first, term in pieces:
            lo, hi = max(rows.start, first), min(rows.stop, first + term.B.shape[0])
            x[lo - rows.start:hi - rows.start] += lora_delta(term, slice(lo - first, hi - first))
        return x


@dataclass(frozen=True)
class AddResidual:
    """W + scale * delta, delta read lazily from a residual checkpoint (rows as stored)."""
    read: Callable[[slice], Tensor]
    scale: float
    read_expert: Callable[[int, slice], Tensor] | None = None    # rows of one expert of a fused tensor

    def __call__(self, x: Tensor, w0: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        d = self.read(rows).to(device=x.device, dtype=torch.float32)
        x = x + d if self.scale == 1.0 else x + self.scale * d
        return x, x

    def expert(self, x: Tensor, e: int, rows: slice) -> Tensor:
        d = self.read_expert(e, rows).to(device=x.device, dtype=torch.float32)
        return x + d if self.scale == 1.0 else x + self.scale * d


def all_finite(x: Tensor) -> bool:
    """No NaN or Inf in x. A NaN or Inf makes its row's sum non-finite: one read of x instead of
    isfinite's two passes; the exact test runs only if a sum overflowed or something is wrong."""
    return bool(torch.isfinite(x.sum(dim=-1)).all()) or bool(torch.isfinite(x).all())


def finite_flag(x: Tensor) -> Tensor:
    """all_finite as a 0-dim bool tensor on x's device, without waiting for a GPU: on a CPU the
    one-pass test above (the exact one alone costs 40x more there); on a GPU the exact test, whose
    second pass is cheap there and needs no answer on the host to decide."""
    if x.device.type == "cpu":
        return torch.tensor(all_finite(x))
    return torch.isfinite(x).all()


def apply(ops: list[Op], x: Tensor, rows: slice) -> Tensor:
    w0 = x
    for op in ops:
        x, w0 = op(x, w0, rows)
    return x
