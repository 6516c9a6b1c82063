"""Benchmark: how many torch operations (on a GPU: kernel launches) quantizing one 16 M-value chunk
takes, per type, with and without an importance matrix: all torch, the torch code around the compiled
searches, and the whole-block kernels (searches.cu, compiled here for the host: on the GPU each
search or block kernel call is one launch more).

Counted on the CPU, without a GPU: the count does not depend on the device, and on a GPU each
operation is at least one launch over the whole chunk. Results go to
bench/results/launch_count-<date>.json.

    python tools/launch_count.py
    python tools/launch_count.py --rows 4096 --cols 4096 --types q4_k,q6_k
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import tempfile
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

from quantkit.testing import host_searches
from quantkit.bench.proc import machine, save_result
from quantkit.kernels import backends, registry


# operations that allocate or make views: no kernel runs
NO_LAUNCH = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::view", "aten::reshape",
             "aten::_reshape_alias", "aten::t", "aten::transpose", "aten::permute", "aten::select", "aten::slice",
             "aten::unbind", "aten::expand", "aten::as_strided", "aten::unsqueeze", "aten::squeeze", "aten::detach",
             "aten::alias", "aten::lift_fresh", "aten::split", "aten::chunk", "aten::view_as", "aten::contiguous",
             "aten::resolve_conj", "aten::resolve_neg", "aten::result_type", "aten::item", "aten::_local_scalar_dense"}


def count_ops(x: torch.Tensor, qname: str, imatrix: torch.Tensor | None) -> int:
    """Operations that run a kernel (leaf aten ops, views and allocations left out) in one
    quantize_rows call on x, as one chunk."""
    saved = dict(registry.CHUNK_VALUES)
    registry.CHUNK_VALUES["cpu"] = x.numel()      # the whole matrix in one kernel call, as on a GPU
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            registry.quantize_rows(x, registry.get(qname), imatrix)
    finally:
        registry.CHUNK_VALUES.clear()
        registry.CHUNK_VALUES.update(saved)
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.name not in NO_LAUNCH
               and not any(c.name.startswith("aten::") for c in e.cpu_children))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--types", default="q8_0,q4_k,q5_k,q6_k")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(a.rows, a.cols) * 0.02
    imatrix = torch.rand(a.cols)
    counts: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        compiled = host_searches.compile_searches(tmp)
        if compiled is None:
            raise SystemExit("launch_count: no C++ compiler to build kernels/searches.cu for the host")
        for searches in ("torch", "compiled", "blocks"):
            with contextlib.ExitStack() as patches:
                def setattr(obj, name, value):
                    patches.enter_context(mock.patch.object(obj, name, value))
                if searches != "torch":
                    compiled.install(setattr)
                patches.enter_context(backends.only(*{"torch": [], "compiled": ["host-searches"],
                                                      "blocks": ["host-searches", "host-blocks"]}[searches]))
                for q in a.types.split(","):
                    for im in (None, imatrix):
                        if im is not None and registry.get(q).quantize_weighted is None:
                            continue
                        key = q + ("+imatrix" if im is not None else "")
                        counts.setdefault(key, {})[searches] = count_ops(x, q, im)
                        print(f"{key:14s} {searches:9s} {counts[key][searches]:6d} ops", flush=True)
    result = {"benchmark": "launch_count", "date": dt.date.today().isoformat(), "machine": machine(),
              "chunk": {"rows": a.rows, "cols": a.cols, "values": a.rows * a.cols},
              "ops_per_chunk": counts,
              "note": "leaf aten ops that run a kernel (views and allocations left out) in one registry.quantize_rows "
                      "call; 'compiled' runs the torch code around searches.cu's searches built for the host, "
                      "which on a GPU adds one launch per search call; 'blocks' runs searches.cu's whole-block "
                      "kernels (one launch per call on a GPU, not counted here)"}
    save_result("launch_count", f"{a.rows}x{a.cols}", result)
    return result


if __name__ == "__main__":
    main()
