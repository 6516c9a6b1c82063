"""Compare two GGUF files (ours and llama.cpp's) tensor by tensor and key by key, with gguf-py's reader."""
from __future__ import annotations

import filecmp
import functools
from pathlib import Path

import gguf
import numpy as np


def reader(path: Path) -> gguf.GGUFReader:
    """gguf-py's reader of `path`, shared by the bench modules (label, VRAM, header check, diffs)."""
    # parsing a 150k-token vocabulary takes seconds: reuse the reader while the file is unchanged
    st = Path(path).stat()
    return _cached_reader(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_reader(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def tensors(path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, type, shape) of every tensor, in file order."""
    return [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader(path).tensors]


def _data(t) -> np.ndarray:
    return np.asarray(t.data).reshape(-1).view(np.uint8)   # a view of the file's memory map


def metadata(path: Path) -> dict[str, tuple[str, object]]:
    """key -> (value type, value) for every key/value but the GGUF.* header fields."""
    r = reader(path)
    return {k: (f.types[0].name, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def compare(ours: Path, ref: Path, *, same_order: bool = True) -> dict:
    """{"identical_tensors": bool, ...}: same names, types and shapes (in the same order unless
    same_order=False: the converter writes checkpoint order, llama-quantize its own) and bytes.
    Tensors are compared one at a time through the memory maps, never all in memory."""
    a, b = tensors(ours), tensors(ref)
    if (a != b) if same_order else (sorted(a) != sorted(b)):
        return {"identical_tensors": False, "reason": "tensor list, types or shapes differ",
                "only_ours": sorted(set(a) - set(b))[:5], "only_ref": sorted(set(b) - set(a))[:5]}
    ref_tensors = {t.name: t for t in reader(ref).tensors}
    differing = [t.name for t in reader(ours).tensors if not np.array_equal(_data(t), _data(ref_tensors[t.name]))]
    return {"identical_tensors": not differing, "tensors": len(a), "differing": differing[:10]}


def file_difference(ours: Path, ref: Path) -> str | None:
    """None when the two files are equal byte for byte; else what differs, tensors and keys (parsing
    a large vocabulary takes seconds, so the readers only run for files that differ)."""
    if filecmp.cmp(ours, ref, shallow=False):
        return None
    return f"{Path(ours).name} differs from {Path(ref).name}: {compare(ours, ref)}; keys: {metadata_differences(ours, ref)}"


def metadata_differences(ours: Path, ref: Path) -> dict:
    """Keys present in only one file, and keys whose type or value differ (lists by name only)."""
    a, b = metadata(ours), metadata(ref)
    out: dict = {}
    if a.keys() != b.keys():
        out["only_ours"] = sorted(set(a) - set(b))
        out["only_ref"] = sorted(set(b) - set(a))
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k]:
            out[k] = "differs" if isinstance(a[k][1], list) else (a[k], b[k])
    return out
