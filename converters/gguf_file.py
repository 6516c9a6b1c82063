"""A streaming GGUF writer of our own: header → key/values → tensor infos → aligned tensor data.

    GGUF v3, little-endian:
      magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
      n_kv ×      key (u64 length + utf-8) | value type u32 | value
      n_tensors × name | n_dims u32 | dims u64 × n_dims (ggml order: innermost first) | type u32 | offset u64
      padding to the alignment, then each tensor's bytes, each padded to the alignment

Tensor infos (names, types, shapes) are declared up front from the plan, so the header is written
before any weight is quantized; each tensor's bytes are then appended as they are produced, in as many
row chunks as the caller likes. A small state machine refuses anything out of order. The file is
written under a temporary name and renamed only when every tensor is in: a killed export never leaves
a complete-looking file. It never chooses types: it writes what it is given.

gguf-py serves only for its constants (value and quantization types, key names) and, in KeyValues,
for its public add_* helpers, which Metadata and SpecialVocab call to describe a model.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import Enum, auto
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np

from quantkit.outputs import partial_path

T = gguf.GGUFValueType
_SCALAR = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i",
           T.FLOAT32: "f", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d", T.BOOL: "?"}


def _string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("<Q", len(raw)) + raw


def pack_value(value: Any, vtype: gguf.GGUFValueType, sub_type: gguf.GGUFValueType | None = None) -> bytes:
    """A key's value: its type, then the value (an array: element type, count, elements). An array's
    element type, when not given, is that of its first element, as gguf-py infers it."""
    return struct.pack("<I", vtype) + _pack_bare(value, vtype, sub_type)


def _pack_bare(value: Any, vtype: gguf.GGUFValueType, sub_type: gguf.GGUFValueType | None = None) -> bytes:
    if vtype in _SCALAR:
        return struct.pack("<" + _SCALAR[vtype], value)
    if vtype == T.STRING:
        return _string(value)
    if vtype == T.ARRAY:
        if not len(value):
            raise ValueError("a GGUF array may not be empty")
        etype = sub_type or (T.UINT8 if isinstance(value, bytes) else T.get_type(value[0]))
        if etype in _SCALAR and etype != T.BOOL:      # numbers: one struct call for the whole array
            body = struct.pack(f"<{len(value)}{_SCALAR[etype]}", *value)
        else:
            body = b"".join(_pack_bare(v, etype) for v in value)
        return struct.pack("<IQ", etype, len(value)) + body
    raise ValueError(f"unknown GGUF value type {vtype!r}")


class KeyValues(gguf.GGUFWriter):
    """Records key/values through gguf-py's public add_* helpers (what Metadata.set_gguf_meta_model and
    SpecialVocab.add_to_gguf call) into `self.kv`, in the order they are added; never opens a file.
    arch=None records no general.architecture (an imatrix file names none)."""

    def __init__(self, arch: str | None):
        self.kv: dict[str, gguf.GGUFValue] = {}
        super().__init__(None, arch or "")
        if arch is None:
            self.kv.pop(gguf.Keys.General.ARCHITECTURE, None)

    def add_key_value(self, key: str, val: Any, vtype: gguf.GGUFValueType,
                      sub_type: gguf.GGUFValueType | None = None) -> None:
        self.kv[key] = gguf.GGUFValue(val, vtype, sub_type)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: gguf.GGMLQuantizationType
    byte_shape: tuple[int, ...]    # torch order, the last dim in bytes

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.byte_shape:
            n *= d
        return n

    @property
    def shape(self) -> tuple[int, ...]:
        """Elements, torch order: the last dim's bytes as values of the type."""
        block, size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        if self.byte_shape[-1] % size:
            raise ValueError(f"tensor {self.name}: {self.byte_shape[-1]} bytes per row is not a whole number of "
                             f"{self.ggml_type.name} blocks ({size} bytes)")
        return (*self.byte_shape[:-1], self.byte_shape[-1] // size * block)


class _State(Enum):
    NEW = auto()        # nothing on disk
    DATA = auto()       # header, key/values and infos written; tensor data being appended
    DONE = auto()       # renamed into place, or aborted


def _pad(n: int, align: int) -> int:
    return -n % align


class GGUFFile:
    def __init__(self, path: Path, kv: dict[str, gguf.GGUFValue], tensors: list[TensorInfo]):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.kv = dict(kv)
        self.tensors = tensors
        align = self.kv.get(gguf.Keys.General.ALIGNMENT)
        self.alignment = int(align.value) if align is not None else gguf.GGUF_DEFAULT_ALIGNMENT
        self._state = _State.NEW
        self._f: BinaryIO | None = None
        self._next = 0          # index of the tensor being written
        self._written = 0       # bytes of it written so far

    def header(self) -> bytes:
        """Everything before the first tensor's bytes, padding included."""
        out = bytearray(struct.pack("<IIQQ", gguf.GGUF_MAGIC, gguf.GGUF_VERSION, len(self.tensors), len(self.kv)))
        for key, v in self.kv.items():
            out += _string(key) + pack_value(v.value, v.type, v.sub_type)
        offset = 0
        for t in self.tensors:
            dims = t.shape[::-1]
            out += _string(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.ggml_type, offset)
            offset += t.nbytes + _pad(t.nbytes, self.alignment)
        return bytes(out + b"\0" * _pad(len(out), self.alignment))

    def _expect(self, state: _State) -> None:
        if self._state is not state:
            raise RuntimeError(f"{self.path}: the writer is {self._state.name}, expected {state.name}")

    def open(self) -> None:
        self._expect(_State.NEW)
        self._f = open(self.tmp, "wb")
        self._f.write(self.header())
        self._state = _State.DATA

    def write(self, name: str, data: np.ndarray) -> None:
        """Append bytes of tensor `name`: the next tensor of the plan, or more of the current one."""
        self._expect(_State.DATA)
        if self._next >= len(self.tensors):
            raise RuntimeError(f"{self.path}: got tensor {name}, but every tensor was written")
        expected = self.tensors[self._next]
        left = expected.nbytes - self._written
        if name != expected.name or data.nbytes > left:
            raise RuntimeError(f"{self.path}: expected {left} more bytes of tensor {expected.name}, "
                               f"got {data.nbytes} bytes of {name}")
        np.ascontiguousarray(data).view(np.uint8).tofile(self._f)
        self._written += data.nbytes
        if self._written == expected.nbytes:
            self._f.write(b"\0" * _pad(expected.nbytes, self.alignment))
            self._next += 1
            self._written = 0

    def commit(self) -> Path:
        self._expect(_State.DATA)
        if self._next != len(self.tensors):
            raise RuntimeError(f"{self.path}: {len(self.tensors) - self._next} tensors were never written")
        self._f.flush()
        os.fsync(self._f.fileno())      # on the disk before the rename makes it look complete
        self._f.close()
        os.replace(self.tmp, self.path)
        self._state = _State.DONE
        return self.path

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
        self.tmp.unlink(missing_ok=True)
        self._state = _State.DONE
