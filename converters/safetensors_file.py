"""Streaming writer of sharded safetensors checkpoints (HF layout), planned up front.

Like the GGUF writer: every tensor's name, dtype and shape is declared before any byte is
produced, so each shard's header is written first and tensors are then appended in row chunks
as they are computed. Peak memory is one chunk, not one shard. The layout is the safetensors
format (8-byte little-endian header length, JSON header padded with spaces to a multiple of 8,
then the raw little-endian tensor data) and, for more than one shard, HF's
`model.safetensors.index.json`. It never chooses dtypes: it writes what it is given.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


def plan_shards(tensors: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors, at most shard_bytes per shard (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class SafetensorsWriter:
    """Writes `tensors` (in this order) into `out_dir` as HF-style shards; `write` takes row chunks."""

    def __init__(self, out_dir: Path, tensors: list[TensorSpec], *, shard_bytes: int = 5 << 30,
                 metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(tensors, shard_bytes)
        self.names = shard_names(len(self.shards))
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._written = 0
        self._file = None
        self._file_index = -1

    def _header(self, shard: list[TensorSpec]) -> bytes:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for t in shard:
            header[t.name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append rows of tensor `name`: the next tensor of the plan, or more of the current one."""
        if self._next >= len(self._order):
            raise RuntimeError(f"{self.out_dir}: got tensor {name}, but every tensor was written")
        index, spec = self._order[self._next]
        data = data.contiguous()
        nbytes = data.numel() * data.element_size()
        if name != spec.name or data.dtype != spec.dtype or nbytes > spec.nbytes - self._written:
            raise RuntimeError(f"{self.out_dir}: expected {spec.nbytes - self._written} more bytes of {spec.name} "
                               f"({spec.dtype}), got {nbytes} bytes of {name} ({data.dtype})")
        if index != self._file_index:
            self._close_file()
            self._file = open(self.out_dir / self.names[index], "wb")
            self._file_index = index
            self._file.write(self._header(self.shards[index]))
        self._file.write(data.reshape(-1).view(torch.uint8).numpy())   # little-endian bytes, no copy
        self._written += nbytes
        if self._written == spec.nbytes:
            self._next += 1
            self._written = 0

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def commit(self) -> list[Path]:
        """Close the last shard and write the index; returns the shard paths."""
        if self._next != len(self._order):
            raise RuntimeError(f"{self.out_dir}: {len(self._order) - self._next} tensors were never written")
        self._close_file()
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for _, t in self._order)},
                     "weight_map": {t.name: self.names[i] for i, t in self._order}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [self.out_dir / n for n in self.names]

    def abort(self) -> None:
        self._close_file()


def write_tensors(out_dir: Path, tensors: dict[str, torch.Tensor], *, shard_bytes: int = 5 << 30,
                  metadata: dict[str, str] | None = None) -> list[Path]:
    """A dict of in-memory tensors, in its order, as HF-style shards."""
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = SafetensorsWriter(Path(out_dir), specs, shard_bytes=shard_bytes, metadata=metadata)
    try:
        for name, t in tensors.items():
            writer.write(name, t.detach().cpu())
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
