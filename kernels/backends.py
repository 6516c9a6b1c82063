"""Which implementation of a hot kernel runs: the backends are data.

The scale searches and the whole Q8_0 / K-quant / IQ4 blocks each have a torch implementation (the
reference form, on any device) and compiled ones with the same bytes:

    numba-searches  CPU tensors, where numba is installed: searches_cpu
    numba-blocks    CPU tensors: whole blocks in legacy_cpu (Q8_0), kquants_cpu (K-quants) and iq4_cpu
                    (IQ4_NL, IQ4_XS)
    cuda-searches   CUDA tensors: the searches in searches.cu, compiled at run time by NVRTC
    cuda-blocks     CUDA tensors: whole blocks in searches.cu (one launch a chunk)
    torch           any device, always on

A kernel lists its implementations in order of preference, each with a predicate saying where it
applies (the tensor's device, a compiled kernel for its shape); the first enabled one that applies
runs. Where a whole-block backend is off, the torch block code runs and calls the searches, which
dispatch again: cuda-searches without cuda-blocks is a GPU's "compiled searches, torch around them".

One override, QUANTKIT_KERNELS: a comma-separated list of the backends to enable ("torch" alone:
the reference code everywhere; "numba" or "cuda" stand for both of theirs). Tests and benchmarks
pick backends with `only(...)`, which wins over the variable.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from quantkit.errors import UnsupportedError

BACKENDS = ("numba-searches", "numba-blocks", "cuda-searches", "cuda-blocks", "torch")
ENV = "QUANTKIT_KERNELS"


@dataclass(frozen=True)
class Impl:
    backend: str
    applies: Callable[..., bool]      # (x, *args) -> whether this implementation can run on them
    run: Callable


IMPLEMENTATIONS: dict[str, list[Impl]] = {}     # kernel name -> implementations, preferred first
_only: frozenset[str] | None = None


def _expand(names) -> frozenset[str]:
    out = set()
    for n in (n.strip() for n in names if n.strip()):
        found = [b for b in BACKENDS if b == n or b.startswith(n + "-")]
        if not found and n not in _extra_backends():
            raise UnsupportedError(f"{ENV}: unknown kernel backend {n!r} (known: {', '.join(BACKENDS)}, numba, cuda)")
        out.update(found or [n])
    return frozenset(out | {"torch"})


def _extra_backends() -> set[str]:
    return {i.backend for impls in IMPLEMENTATIONS.values() for i in impls}


def enabled() -> frozenset[str]:
    """The backends allowed to run now: only()'s, else QUANTKIT_KERNELS's, else all."""
    if _only is not None:
        return _only
    spec = os.environ.get(ENV)
    return _expand(spec.split(",")) if spec else frozenset(_extra_backends() | set(BACKENDS))


@contextmanager
def only(*backends: str) -> Iterator[None]:
    """Run the block with just these backends (and torch) enabled."""
    global _only
    before, _only = _only, _expand(backends)
    try:
        yield
    finally:
        _only = before


def kernel(name: str, impls: list[Impl]) -> Callable:
    """Register `name`'s implementations (the last must be torch's, which applies everywhere) and
    return the function that runs the first enabled one that applies."""
    assert impls[-1].backend == "torch", name
    IMPLEMENTATIONS[name] = list(impls)

    def dispatch(x, *args):
        return choose(name, x, *args).run(x, *args)
    dispatch.__name__ = name
    return dispatch


def choose(name: str, x, *args) -> Impl:
    on = enabled()
    for impl in IMPLEMENTATIONS[name]:
        if impl.backend in on and impl.applies(x, *args):
            return impl
    raise RuntimeError(f"no implementation of {name} applies")      # torch's always does


def anywhere(x, *args) -> bool:
    return True
