"""Streaming GGUF file writer: header → key/values → tensor infos → tensor data, one tensor at a time.

Built on gguf-py's GGUFWriter state machine. Tensor infos (names, types, sizes) are declared up
front from the plan, so the header can be written before any weight is quantized; each tensor's
bytes are then appended as they are produced. The file is written under a temporary name and
renamed only when every tensor is in: a killed export never leaves a complete-looking file.
It never chooses types: it writes what it is given.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    byte_shape: tuple[int, ...]    # torch shape with the last dim in bytes: gguf-py derives the element shape

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.byte_shape:
            n *= d
        return n


class GGUFFile:
    def __init__(self, path: Path, arch: str, kv: dict[str, gguf.GGUFValue], tensors: list[TensorInfo]):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self.tensors = tensors
        self._next = 0
        self._w = gguf.GGUFWriter(self.tmp, arch)
        self._w.kv_data[0] = dict(kv)
        for t in tensors:
            self._w.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.ggml_type)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def open(self) -> None:
        self._w.write_header_to_file()
        self._w.write_kv_data_to_file()
        self._w.write_ti_data_to_file()

    def write(self, name: str, data: np.ndarray) -> None:
        expected = self.tensors[self._next]
        if name != expected.name or data.nbytes != expected.nbytes:
            raise RuntimeError(f"{self.path}: expected tensor {expected.name} ({expected.nbytes} bytes), "
                               f"got {name} ({data.nbytes} bytes)")
        self._w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8))
        self._next += 1

    def commit(self) -> Path:
        if self._next != len(self.tensors):
            raise RuntimeError(f"{self.path}: {len(self.tensors) - self._next} tensors were never written")
        self._w.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._w.close()
        self.tmp.unlink(missing_ok=True)
