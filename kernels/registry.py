"""Quant types as data: one QuantType per GGML tensor type we can write.

A kernel module describes each of its types with a QuantType and calls register(); the
rest of quantkit looks types up with get() and converts whole tensors with
quantize_rows / dequantize_rows, which is where the block contract is checked.

Block contract:
    quantize(x: float32 [n_blocks, block_size]) -> uint8 [n_blocks, type_size]
    dequantize(b: uint8 [n_blocks, type_size]) -> float32 [n_blocks, block_size]
Both are pure torch and run on whatever device the input lives on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf
import torch
from torch import Tensor

from quantkit.errors import UnsupportedError

from . import _ops

# Values handed to a kernel at once. The K-quant searches keep a few dozen float32 copies of
# a chunk alive and issue ~2000 small ops per chunk: on CPU a chunk that stays in cache wins,
# on a GPU large chunks amortize the kernel launches.
CHUNK_VALUES = {"cpu": 1 << 18}
CHUNK_VALUES_DEFAULT = 1 << 24


def _chunk_blocks(qtype: QuantType, device: torch.device) -> int:
    return max(1, CHUNK_VALUES.get(device.type, CHUNK_VALUES_DEFAULT) // qtype.block_size)


@dataclass(frozen=True)
class QuantType:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    block_size: int  # values per block
    type_size: int  # bytes per block
    quantize: Callable[[Tensor], Tensor]
    dequantize: Callable[[Tensor], Tensor]
    # with an importance matrix: (x, qw [n_blocks, block_size], sigma2 [n_blocks] or None) -> bytes;
    # None: the type ignores importance, as ggml's quantize_q8_0 does
    quantize_weighted: Callable[[Tensor, Tensor, Tensor | None], Tensor] | None = None
    # whether quantize_weighted reads sigma2, sum(x^2) / n_per_row of each block's row (Q5_0/Q5_1
    # do; the K-quants take theirs per super-block). In C's order it is one add per column.
    weighted_uses_row_sigma2: bool = False


QUANT_TYPES: dict[str, QuantType] = {}
_BY_GGML_TYPE: dict[gguf.GGMLQuantizationType, QuantType] = {}


def register(qtype: QuantType) -> QuantType:
    assert qtype.name == qtype.name.lower(), qtype.name
    assert qtype.name not in QUANT_TYPES, f"{qtype.name} registered twice"
    # the sizes written out in the kernel module must agree with gguf-py's table
    expected = gguf.GGML_QUANT_SIZES[qtype.ggml_type]
    assert (qtype.block_size, qtype.type_size) == expected, (qtype.name, expected)
    QUANT_TYPES[qtype.name] = qtype
    _BY_GGML_TYPE[qtype.ggml_type] = qtype
    return qtype


def get(name_or_ggml_type: str | int | gguf.GGMLQuantizationType) -> QuantType:
    if isinstance(name_or_ggml_type, str):
        qtype = QUANT_TYPES.get(name_or_ggml_type.lower())
    else:
        try:
            qtype = _BY_GGML_TYPE.get(gguf.GGMLQuantizationType(int(name_or_ggml_type)))
        except ValueError:
            qtype = None
    if qtype is None:
        raise UnsupportedError(
            f"unsupported quant type {name_or_ggml_type!r}; known: {', '.join(sorted(QUANT_TYPES))}")
    return qtype


def row_nbytes(qtype: QuantType, cols: int) -> int:
    if cols % qtype.block_size:
        raise UnsupportedError(
            f"{qtype.name} needs rows of a multiple of {qtype.block_size} values, got {cols}")
    return cols // qtype.block_size * qtype.type_size


def quantize_rows(x: Tensor, qtype: QuantType, imatrix: Tensor | None = None) -> Tensor:
    """float32 [rows, cols] -> uint8 [rows, row_nbytes(qtype, cols)], ggml's row data.

    imatrix: float32 [cols], the importance of each column (ggml_quantize_chunk's `imatrix`);
    types that take no weights (Q8_0, F16 ...) ignore it, as ggml does."""
    assert x.dtype == torch.float32 and x.dim() == 2, (x.dtype, x.shape)
    rows, cols = x.shape
    nbytes = row_nbytes(qtype, cols)
    blocks = x.reshape(-1, qtype.block_size)
    qw = sigma2 = None
    if imatrix is not None and qtype.quantize_weighted is not None:
        assert imatrix.shape == (cols,), (imatrix.shape, cols)
        # the importance of each block of a row; each chunk gathers its own blocks' below (a copy
        # of the importance per row of the whole tensor would be as large as x)
        qw = imatrix.to(device=x.device, dtype=torch.float32).reshape(-1, qtype.block_size)
        if qtype.weighted_uses_row_sigma2:
            # float sum_x2 = 0; for (j < n_per_row) sum_x2 += x[j]*x[j]; sigma2 = sum_x2/n_per_row
            sigma2 = _ops.div(_ops.seq_sum((x * x).T), float(cols)).repeat_interleave(cols // qtype.block_size)
    out = torch.empty((blocks.shape[0], qtype.type_size), dtype=torch.uint8, device=x.device)
    step = _chunk_blocks(qtype, x.device)
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start:start + step]
        if qw is None:
            q = qtype.quantize(chunk)
        else:
            chunk_qw = qw[torch.arange(start, start + chunk.shape[0], device=x.device) % qw.shape[0]]
            q = qtype.quantize_weighted(chunk, chunk_qw, None if sigma2 is None else sigma2[start:start + step])
        assert q.dtype == torch.uint8 and q.shape == (chunk.shape[0], qtype.type_size), (qtype.name, q.dtype, q.shape)
        out[start:start + step] = q
    return out.reshape(rows, nbytes)


def dequantize_rows(data: Tensor, qtype: QuantType, cols: int) -> Tensor:
    """uint8 [rows, row_nbytes(qtype, cols)] -> float32 [rows, cols]."""
    nbytes = row_nbytes(qtype, cols)
    assert data.dtype == torch.uint8 and data.dim() == 2 and data.shape[1] == nbytes, (data.dtype, data.shape, nbytes)
    rows = data.shape[0]
    blocks = data.reshape(-1, qtype.type_size)
    out = torch.empty((blocks.shape[0], qtype.block_size), dtype=torch.float32, device=data.device)
    step = _chunk_blocks(qtype, data.device)
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start:start + step]
        y = qtype.dequantize(chunk)
        assert y.dtype == torch.float32 and y.shape == (chunk.shape[0], qtype.block_size), (qtype.name, y.dtype, y.shape)
        out[start:start + step] = y
    return out.reshape(rows, cols)
