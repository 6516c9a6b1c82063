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
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError

# weights and notes of the input are not copied; everything else at the top level is (tokenizer,
# chat template, generation config, README, license, ...)
_NOT_COPIED = re.compile(r"(\.(safetensors|bin|pt|pth|gguf|ckpt|h5|msgpack|pkl|partial)$|^\.|"
                         r"^(config|merge|residual|export|model\.safetensors\.index|pytorch_model\.bin\.index)\.json$|"
                         r"^adapter_)")


# what a killed writer leaves beside its output: `.NAME.PID.partial` files and `.NAME.partial-PID-XXXX`
# staging directories; the PID says whether the writer still runs. (`.NAME.old-PID-XXXX`, the previous
# output moved aside for the instant of the swap, is never removed here: it may be all that is left of it.)
_LEFT = re.compile(r"^\..+\.(?P<pid>\d+)\.partial$|^\..+\.partial-(?P<dpid>\d+)-[^/]*$")


# a leftover is only removed once nothing in it has changed for this long: a writer in another PID
# namespace (a container, another host on a shared disk) has a PID that looks dead from here
STALE_AFTER_S = 15 * 60


def sweep_leftovers(d: Path) -> list[Path]:
    """Remove from directory `d`, as far as it can, what writers left half-written (a SIGKILL, a power
    cut: Ctrl-C and SIGTERM clean up after themselves): hidden names whose PID runs no more here and
    that have not changed for STALE_AFTER_S. Returns what was removed; never raises."""
    removed = []
    try:
        entries = list(Path(d).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _LEFT.match(p.name)
        if not m:
            continue
        pid = int(m.group("pid") or m.group("dpid"))
        try:
            if pid == os.getpid() or _running(pid) or time.time() - _last_change(p) < STALE_AFTER_S:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:         # gone already, or not ours to remove (another user's, immutable)
            continue
        removed.append(p)
    return removed


def _last_change(p: Path) -> float:
    """The newest modification time of p and, for a directory, of what it holds."""
    times = [p.lstat().st_mtime]
    if p.is_dir() and not p.is_symlink():
        for q in p.rglob("*"):
            try:
                times.append(q.lstat().st_mtime)
            except OSError:
                pass
    return max(times)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # another user's process: running
        return True
    return True


def inside_input(out: Path, inputs: list[Path]) -> Path | None:
    """The input that `out` is or lies inside (resolved), if any."""
    o = Path(out).resolve()
    for i in inputs:
        i = Path(i).resolve()
        if o == i or i in o.parents:
            return i
    return None


def refuse_inputs(out: Path, inputs: list[Path] = ()) -> None:
    """OutputError if `out`, a directory files are written into, is one of `inputs` or lies inside
    one: inputs are only read."""
    i = inside_input(out, inputs)
    if i is not None:
        raise OutputError(f"would write into the input {i}: choose a directory of its own", out)


def existing_ancestor(path: Path) -> Path:
    """`path`, or its nearest parent that exists (where it would be created)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_creatable(path: Path, problem: str = "cannot be created", named: Path | None = None) -> None:
    """OutputError (naming `named`, default `path`) unless the directory `path` exists, or can be
    made, under a writable directory."""
    probe = existing_ancestor(path)
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise OutputError(f"{problem}: {probe} is " + ("not a directory" if not probe.is_dir() else "not writable"),
                          named or path)


def check_out_file(path: Path, *inputs: Path) -> None:
    """An output file's place, checked before the work: not a directory, not inside an input, and a
    directory that exists (or can be made) and takes files."""
    path = Path(path)
    if path.is_dir():
        raise OutputError("is a directory: give a file name, e.g. imatrix.gguf", path)
    refuse_inputs(path.parent, list(inputs))
    check_creatable(path.parent, "cannot be written", named=path)


def check_out_dir(path: Path, *inputs: Path) -> None:
    """A directory files will be written into, checked before the work: not a file, not inside an
    input, and one that exists (or can be made) and takes files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError("is a file, not a directory", path)
    refuse_inputs(path, list(inputs))
    check_creatable(path, "cannot be written")


def check_output_dir(out: Path, force: bool, inputs: list[Path] = ()) -> None:
    """What staged_output refuses, for a caller to check before any work: `out` is or holds an
    input, or exists and is not empty (without force)."""
    out = Path(out).absolute()
    for i in inputs:
        i = Path(i).resolve()
        if out.resolve() == i or out.resolve() in i.parents:
            raise OutputError(f"would replace the input {i}", out)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise OutputError("exists and is not empty (--force replaces it)", out)


@contextmanager
def staged_output(out: Path, force: bool, inputs: list[Path] = ()) -> Iterator[Path]:
    """A fresh hidden directory beside `out`, renamed to `out` when the block completes. An existing
    `out` is moved aside first and deleted only once the new one is in place (put back if not)."""
    out = Path(out).absolute()
    check_output_dir(out, force, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot be created ({e.strerror or e})", out) from None
    try:
        yield tmp
        fsync_tree(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)        # mkdtemp makes it 0700
        old = None
        try:
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
                os.replace(out, old / out.name)
            os.replace(tmp, out)
        except BaseException as e:      # an error, Ctrl-C or SIGTERM mid-swap: the old output goes back
            if old is not None:
                if not out.exists() and (old / out.name).exists():
                    os.replace(old / out.name, out)
                shutil.rmtree(old, ignore_errors=True)
            if isinstance(e, OSError):
                raise OutputError(f"cannot be put in place ({e.strerror or e})", out) from None
            raise
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


def partial_path(path: Path) -> Path:
    """The hidden name a file is written under before it is renamed into place; sweep_leftovers
    knows it by the writer's PID."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def write_text_atomic(path: Path, text: str, *, fsync: bool = False) -> None:
    """Write a file under a hidden temporary name in its directory and rename it into place, so
    readers see the old content or the new, never part of it (fsync: flushed to disk first)."""
    tmp = partial_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

