"""Streaming GGUF file writer: header → key/values → tensor infos → tensor data, one tensor at a time.

Built on gguf-py's GGUFWriter state machine. Tensor infos (names, types, sizes) are declared up
front from the plan, so the header can be written before any weight is quantized; each tensor's
bytes are then appended as they are produced, in as many row chunks as the caller likes (the
alignment padding gguf-py's write_tensor_data puts around a tensor is written here once per tensor). The file is written under a temporary name and
renamed only when every tensor is in: a killed export never leaves a complete-looking file.
It never chooses types: it writes what it is given.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from quantkit.outputs import partial_path


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
        self.tmp = partial_path(self.path)
        self.tensors = tensors
        self._next = 0          # index of the tensor being written
        self._written = 0       # bytes of it written so far
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
        """Append bytes of tensor `name`: the next tensor of the plan, or more of the current one."""
        if self._next >= len(self.tensors):
            raise RuntimeError(f"{self.path}: got tensor {name}, but every tensor was written")
        expected = self.tensors[self._next]
        left = expected.nbytes - self._written
        if name != expected.name or data.nbytes > left:
            raise RuntimeError(f"{self.path}: expected {left} more bytes of tensor {expected.name}, "
                               f"got {data.nbytes} bytes of {name}")
        fout = self._w.fout[0]
        if self._written == 0:
            self._w.write_padding(fout, fout.tell())
        np.ascontiguousarray(data).view(np.uint8).tofile(fout)
        self._written += data.nbytes
        if self._written == expected.nbytes:
            self._w.write_padding(fout, expected.nbytes)
            self._next += 1
            self._written = 0

    def commit(self) -> Path:
        if self._next != len(self.tensors):
            raise RuntimeError(f"{self.path}: {len(self.tensors) - self._next} tensors were never written")
        self._w.close()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)            # on the disk before the rename makes it look complete
        finally:
            os.close(fd)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._w.close()
        self.tmp.unlink(missing_ok=True)
