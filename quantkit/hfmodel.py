"""Lazy reader of a local HF model directory: config, shard index, tensors by row range.

Nothing is loaded up front except safetensors headers (a few KB per shard). `read_rows()` returns
a range of rows of one tensor: a row-major range is one contiguous byte range of the shard, read
with pread into a fresh buffer. (Not mmap: the pages of a mapping stay resident and count towards
the process's RSS until it is closed, which for a 5 GB shard is most of it.) Peak memory is one
chunk of one tensor, whatever the model size.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from .errors import InputError

FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class TensorRef:
    name: str
    shard: Path
    dtype: str          # safetensors dtype string: "BF16", "F16", "F32", ...
    shape: tuple[int, ...]
    offset: int         # absolute file offset of the first byte
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def row_ranges(shape: tuple[int, ...], max_values: int, granule: int = 1):
    """Consecutive row ranges of a tensor (elements, for a 1-D one) of at most ~max_values values each,
    in multiples of `granule` rows."""
    rows = shape[0] if shape else 1
    cols = 1
    for d in shape[1:]:
        cols *= d
    step = max(granule, (max_values // max(cols, 1)) // granule * granule) if len(shape) > 1 else max(rows, 1)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", path) from None


def _read_header(shard: Path) -> tuple[dict, int]:
    """Parse and check a safetensors header: 8-byte length, JSON, offsets inside the file.

    Returns the header and the file offset where the data section starts."""
    try:
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError("truncated safetensors file (no header)", shard)
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise InputError("corrupt safetensors header (header length beyond end of file)", shard)
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise InputError("shard file not found", shard) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("corrupt safetensors header (not JSON)", shard) from None
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", shard) from None
    if not isinstance(header, dict):
        raise InputError("corrupt safetensors header (not a JSON object)", shard)
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape = info["shape"]
            dtype = info["dtype"]
            if not (0 <= begin <= end) or any(int(d) < 0 for d in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise InputError(f"corrupt safetensors header entry for tensor {name!r}", shard) from None
        if end > data_size:
            raise InputError(f"truncated safetensors file: tensor {name!r} ends at byte {end} "
                             f"but the data section has {data_size}", shard)
        n_el = 1
        for d in shape:
            n_el *= d
        if dtype in DTYPE_BYTES and end - begin != n_el * DTYPE_BYTES[dtype]:
            raise InputError(f"corrupt safetensors header: tensor {name!r} of shape {shape} and dtype {dtype} "
                             f"spans {end - begin} bytes", shard)
    return header, 8 + n


class HFModel:
    """A local HF model directory, read lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(("not a directory" if self.path.exists() else "does not exist")
                             + " (expected a HF model directory)", self.path)
        self.config: dict = _read_json(self.path / "config.json")
        if not isinstance(self.config, dict):
            raise InputError("config.json is not a JSON object", self.path / "config.json")

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise InputError("config.json has no 'architectures' entry", self.path / "config.json")
        return archs[0]

    def optional_json(self, name: str) -> dict | None:
        p = self.path / name
        return _read_json(p) if p.exists() else None

    @cached_property
    def shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            wm = _read_json(index).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise InputError("index has no 'weight_map'", index)
            names = sorted(set(wm.values()))
            for n in names:
                if not (self.path / n).is_file():
                    raise InputError(f"index names shard {n!r}, which does not exist", index)
            return [self.path / n for n in names]
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        found = sorted(p for p in self.path.glob("*.safetensors") if not p.name.startswith("adapter_"))
        if not found:
            raise InputError("no *.safetensors weights found (pytorch .bin checkpoints are not supported)", self.path)
        return found

    @cached_property
    def tensors(self) -> dict[str, TensorRef]:
        refs: dict[str, TensorRef] = {}
        for shard in self.shards:
            header, base = _read_header(shard)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in refs:
                    raise InputError(f"tensor {name!r} appears in two shards", shard)
                begin, end = info["data_offsets"]
                refs[name] = TensorRef(name, shard, info["dtype"], tuple(info["shape"]), base + begin, end - begin)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            wm = _read_json(index)["weight_map"]
            missing = sorted(set(wm) - set(refs))
            if missing:
                raise InputError(f"index lists {len(missing)} tensors not found in the shards, "
                                 f"e.g. {missing[0]!r} (expected in {wm[missing[0]]})", index)
        return refs

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor, as stored (bf16/fp16/fp32)."""
        ref = self.tensors[name]
        return self.read_rows(name, 0, ref.shape[0] if ref.shape else 1)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (along its first dimension), as stored."""
        ref = self.tensors[name]
        rows = ref.shape[0] if ref.shape else 1
        assert 0 <= start <= stop <= rows, (name, start, stop, rows)
        return self._read(ref, start * (ref.nbytes // rows if rows else 0), (stop - start, *ref.shape[1:])
                          if ref.shape else ())

    def read_expert_rows(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor[expert] (a fused [experts, rows, cols] tensor), as stored:
        one contiguous byte range, whatever the rest of the tensor holds."""
        ref = self.tensors[name]
        assert len(ref.shape) == 3 and 0 <= expert < ref.shape[0] and 0 <= start <= stop <= ref.shape[1], \
            (name, expert, start, stop, ref.shape)
        row_bytes = ref.nbytes // (ref.shape[0] * ref.shape[1]) if ref.nbytes else 0
        return self._read(ref, (expert * ref.shape[1] + start) * row_bytes, (stop - start, ref.shape[2]))

    def _read(self, ref: TensorRef, skip: int, shape: tuple[int, ...]) -> torch.Tensor:
        """`shape`'s values of a tensor from `skip` bytes into it, with pread into a fresh buffer."""
        if ref.dtype not in FLOAT_DTYPES:
            raise InputError(f"tensor {ref.name!r} has dtype {ref.dtype}; expected BF16, F16 or F32", ref.shard)
        n = math.prod(shape) * DTYPE_BYTES[ref.dtype]
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        try:
            fd = os.open(ref.shard, os.O_RDONLY)
            try:
                while got < n:     # one read returns at most ~2 GiB on Linux
                    k = os.preadv(fd, [view[got:]], ref.offset + skip + got)
                    if k == 0:
                        break
                    got += k
            finally:
                os.close(fd)
        except OSError as e:
            raise InputError(f"cannot read tensor {ref.name!r}: {e.strerror or e}", ref.shard) from None
        if got != n:
            raise InputError(f"truncated safetensors file: tensor {ref.name!r} is cut short", ref.shard)
        return torch.frombuffer(buf, dtype=FLOAT_DTYPES[ref.dtype]).reshape(shape) if n else \
            torch.empty(shape, dtype=FLOAT_DTYPES[ref.dtype])

    # Reading in two steps, for a reader thread that does I/O only (see export._reads): `fetch`
    # reads, `finish` computes whatever the rows still need, on the thread that quantizes.
    def fetch(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.read_rows(name, start, stop)

    def finish(self, name: str, start: int, stop: int, fetched: torch.Tensor) -> torch.Tensor:
        return fetched

    # the same for rows of one expert of a fused [experts, rows, cols] tensor
    def fetch_expert(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        return self.read_expert_rows(name, expert, start, stop)

    def finish_expert(self, name: str, expert: int, start: int, stop: int, fetched: torch.Tensor) -> torch.Tensor:
        return fetched

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shards)

    def n_params(self) -> int:
        return sum(math.prod(r.shape) for r in self.tensors.values())

    def merge_note(self) -> dict | None:
        """What was merged into these weights (None: the checkpoint as stored)."""
        return None

    def input_paths(self) -> list[Path]:
        """The directories these weights are read from (outputs must stay out of them)."""
        return [self.path]

    def fingerprint(self) -> str:
        """A cheap content hash: config + every shard's safetensors header and size."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for shard in self.shards:
            with open(shard, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(n))
            h.update(f"{shard.name}:{shard.stat().st_size}".encode())
        return h.hexdigest()
