"""Output directories: built in a hidden staging directory, flushed, and renamed into place whole.

Every command that writes a model directory (merge, residual extract, GPTQ, bitsandbytes) goes
through staged_output, so a killed run never leaves a directory that looks complete, an existing
output is replaced only with --force (and only once the new one is whole), and an input is never
overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError

# weights and notes of the input are not copied; everything else at the top level is (tokenizer,
# chat template, generation config, README, license, ...)
_NOT_COPIED = re.compile(r"(\.(safetensors|bin|pt|pth|gguf|ckpt|h5|msgpack|pkl|partial)$|^\.|"
                         r"^(config|merge|residual|export|model\.safetensors\.index|pytorch_model\.bin\.index)\.json$|"
                         r"^adapter_)")


@contextmanager
def staged_output(out: Path, force: bool, inputs: list[Path] = ()) -> Iterator[Path]:
    """A fresh hidden directory beside `out`, renamed to `out` when the block completes. An existing
    `out` is moved aside first and deleted only once the new one is in place (put back if not)."""
    out = Path(out).absolute()
    for i in inputs:
        i = Path(i).resolve()
        if out.resolve() == i or out.resolve() in i.parents:
            raise OutputError(f"would replace the input {i}", out)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise OutputError("exists and is not empty (--force replaces it)", out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot be created ({e.strerror or e})", out) from None
    try:
        yield tmp
        fsync_tree(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)        # mkdtemp makes it 0700
        try:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) if out.exists() else None
            if old is not None:
                os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except OSError:
                if old is not None:
                    os.replace(old / out.name, out)
                raise
        except OSError as e:
            raise OutputError(f"cannot be put in place ({e.strerror or e})", out) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(d: Path) -> None:
    """Flush every file to the disk before the rename makes it look complete."""
    for f in d.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def copy_model_files(src: Path, dest: Path) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not _NOT_COPIED.search(f.name):
            shutil.copyfile(f, dest / f.name)
            copied.append(f.name)
    return copied


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str, *, fsync: bool = False) -> None:
    """Write a file under a hidden temporary name in its directory and rename it into place, so
    readers see the old content or the new, never part of it (fsync: flushed to disk first)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

