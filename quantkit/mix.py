"""`--gguf auto:BPW` / `auto:q4_k_m`: a type per tensor, chosen to keep the model closest to bf16
under a size budget, from the model's measured sensitivity.

    measure  on calibration text (never the evaluation text), for every quantizable weight t:
             - probe: the KL divergence from bf16 of the model's next-token distributions, whole
               vocabulary, when t alone is quantized to the lowest type of its ladder (the rest of
               the model float32; the layers before t are not re-run: their outputs are kept)
             - the activation-weighted squared error sum_c E[x_c^2] sum_r (W - Q(W))^2_rc of t
               in every type of its ladder, quantized exactly as the export will (with the
               importance matrix, when one is given)
    predict  KLD_t(type) = probe KLD_t * error_t(type) / error_t(probe type): a small
             perturbation's KLD is quadratic in it, as the squared error is
    solve    minimise sum_t KLD_t(type_t) with sum_t bytes_t(type_t) <= budget: an exact
             multiple-choice knapsack (dynamic programming over the budget in 1/20000 steps, sizes
             rounded up, so the file never exceeds the budget)

The result is an ordinary plan: every tensor an ordinary GGML type, the file llama.cpp and Ollama
load. It equals what llama-quantize writes when given the same types per tensor (--tensor-type),
which is how it is tested. What was measured goes to export.json and `--dry-run` prints it.
"""
from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quantkit.kernels import registry as qreg

from .errors import InputError, UnsupportedError

# the candidate types: the K-quants (and IQ4_XS) for rows of a multiple of 256, the 32-value block
# types for the other rows (the types llama.cpp's own mixtures fall back to)
LADDER_256 = ("iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0")
LADDER_32 = ("q4_0", "iq4_nl", "q4_1", "q5_0", "q5_1", "q8_0")
STEPS = 20000                                   # budget resolution of the knapsack
ALIGN = 32                                      # GGUF aligns every tensor's data


@dataclass(frozen=True)
class Target:
    """What `auto:` was given: a named file type ("no larger than that file") or bits per weight."""
    spec: str
    variant: str = ""            # q4_k_m ...
    bpw: float = 0.0

    @property
    def name(self) -> str:
        return f"auto-{self.variant}" if self.variant else f"auto-{self.bpw:g}bpw"


def parse_target(spec: str, known: dict) -> Target:
    """auto:q4_k_m or auto:4.8 → Target; UnsupportedError naming the spec otherwise."""
    arg = spec.split(":", 1)[1].strip().lower() if ":" in spec else ""
    if arg in known and known[arg].quantized:
        return Target(spec, variant=arg)
    try:
        bpw = float(arg)
    except ValueError:
        bpw = math.nan
    if not (2.0 <= bpw <= 16.0):
        raise UnsupportedError(f"--gguf {spec!r}: auto needs a size, e.g. auto:q4_k_m (no larger than that file) or "
                               "auto:4.8 (bits per weight, 2 to 16)")
    return Target(spec, bpw=bpw)


def ladder(ncols: int) -> list[str]:
    """The types a tensor of rows of `ncols` values may take, smallest first ([] if none fits)."""
    types = LADDER_256 if ncols % 256 == 0 else LADDER_32 if ncols % 32 == 0 else ()
    return sorted(types, key=lambda t: qreg.get(t).type_size / qreg.get(t).block_size)


def tensor_nbytes(shape: tuple[int, ...], qtype: str) -> int:
    n = prod(shape[:-1]) * qreg.row_nbytes(qreg.get(qtype), shape[-1])
    return -(-n // ALIGN) * ALIGN


# --- the knapsack -----------------------------------------------------------------------------

def solve(options: list[list[tuple[int, float]]], budget: int) -> list[int] | None:
    """options[t] = [(bytes, cost), ...]: the index chosen per item minimising the total cost with
    total bytes <= budget, exactly, with sizes rounded up to budget / STEPS (None if even the
    smallest choice of every item does not fit)."""
    if not options:
        return []
    unit = max(1, -(-budget // STEPS))
    cap = budget // unit
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    picks = np.zeros((len(options), cap + 1), dtype=np.int16)
    for i, opts in enumerate(options):
        new = np.full(cap + 1, inf)
        for j, (nbytes, cost) in enumerate(opts):
            w = -(-nbytes // unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[:cap + 1 - w] + cost
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        return None
    chosen = [0] * len(options)
    for i in range(len(options) - 1, -1, -1):
        j = int(picks[i, end])
        chosen[i] = j
        end -= -(-options[i][j][0] // unit)
    return chosen


# --- measuring --------------------------------------------------------------------------------

@dataclass
class Sensitivity:
    probe: str                           # the type the KLD was measured at
    probe_kld: float
    error: dict[str, float]              # type -> activation-weighted squared error

    def predicted(self, qtype: str) -> float:
        e0 = self.error[self.probe]
        return self.probe_kld * self.error[qtype] / e0 if e0 > 0 else 0.0


@dataclass
class Measured:
    sensitivity: dict[str, Sensitivity] = field(default_factory=dict)    # GGUF name -> its figures
    tokens: int = 0
    calibration: str = ""
    seconds: float = 0.0


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Mean over tokens of the whole-vocabulary KL(P || Q), float64 sums."""
    return float((logp.exp() * (logp - logq)).sum(-1, dtype=torch.float64).mean())


def calibration_size(device: str, n_samples: int = 0, seqlen: int = 0) -> tuple[int, int]:
    """Samples x tokens of the sensitivity pass (0: 4 x 256 on a CPU, where SmolLM2-135M's pass takes
    ~8 min on 2 cores, 16 x 512 on a GPU)."""
    return n_samples or (4 if device == "cpu" else 16), seqlen or (256 if device == "cpu" else 512)


def measure(model_dir: Path, searched: dict[str, tuple[str, tuple[int, ...]]], weights: dict[str, torch.Tensor],
            calib: Path | None = None, n_samples: int = 0, seqlen: int = 0, device: str = "cpu",
            progress: bool = True) -> Measured:
    """searched: GGUF name -> (HF parameter name, GGUF shape) of every tensor the budget is spent on.
    weights: the importance matrix's per-column weights by GGUF name (quantizing as the export does).
    Calibration: the text `calib`, or text the model generates itself (cached, as for the imatrix)."""
    from . import layerwise
    from .families import family_of
    from .hfmodel import HFModel

    t0 = time.perf_counter()
    hf = HFModel(model_dir)
    family = family_of(hf)
    n_samples, seqlen = calibration_size(device, n_samples, seqlen)
    tokens = layerwise.text_tokens(model_dir, calib, n_samples, seqlen) if calib else None
    model, stored, work = layerwise.load(model_dir, device, progress)
    if tokens is None:
        tokens = layerwise.generated_tokens(model_dir, model, stored, n_samples, seqlen, 0, device, progress)
    layerwise.to(model, device, work)
    params = dict(model.named_parameters())
    missing = [h for h, _ in searched.values() if h not in params]
    if missing:
        raise UnsupportedError(f"auto: {hf.architecture}'s weight {missing[0]} is not a parameter of transformers' "
                               "model (a fused or stacked tensor): use a named type", model_dir / "config.json")
    layers = family.layers(model)
    norm, head = family.module(model, family.final_norm), family.module(model, family.head)
    cap = (hf.config.get("final_logit_softcapping") or
           (hf.config.get("text_config") or {}).get("final_logit_softcapping"))

    def layer_of(hf_name: str) -> int | None:
        m = re.match(re.escape(family.decoder_layers) + r"\.(\d+)\.", hf_name)
        return int(m.group(1)) if m else None

    def logprobs(h: torch.Tensor) -> torch.Tensor:
        logits = head(norm(h)).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)

    def first_inputs() -> tuple[torch.Tensor, dict]:
        # the samples run as one batch through the layers: the rotary tables and masks caught for
        # one sample broadcast over it
        xs, kw = layerwise.layer0_inputs(model, family, tokens, device, work)
        return torch.cat(xs), kw

    # the float model once: every layer's inputs and the squared activations of every linear
    sq: dict[str, torch.Tensor] = {}
    by_param = {h: g for g, (h, _) in searched.items()}

    def hook(hf_name):
        def pre(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq[hf_name] = sq.get(hf_name, 0) + (x * x).sum(0)
        return pre

    handles = [m.register_forward_pre_hook(hook(f"{name}.weight")) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and f"{name}.weight" in by_param]
    with torch.no_grad():
        x, kwargs = first_inputs()
        layer_in = [x]
        for layer in layers:
            x = layerwise.hidden(layer(x, **kwargs))
            layer_in.append(x)
        base = logprobs(x)
    for h in handles:
        h.remove()

    def rerun(start: int, x: torch.Tensor) -> float:
        with torch.no_grad():
            for layer in layers[start:]:
                x = layerwise.hidden(layer(x, **kwargs))
            return _kl(base, logprobs(x))

    out = Measured(tokens=int(tokens.numel()), calibration=str(calib) if calib else "generated by the model")
    names = list(searched)
    bar = tqdm(total=len(names), desc="auto: sensitivity", unit="tensor", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for gname in names:
            hf_name, shape = searched[gname]
            p = params[hf_name]
            original = p.data
            w = original.float().reshape(-1, original.shape[-1])
            col = sq.get(hf_name)
            col = (col / tokens.numel()).float() if col is not None else torch.ones(w.shape[-1])
            errors, probe_q = {}, None
            for qtype in ladder(shape[-1]):           # smallest first: the first is the probe
                qt = qreg.get(qtype)
                q = qreg.dequantize_rows(qreg.quantize_rows(w, qt, weights.get(gname)), qt, w.shape[-1])
                errors[qtype] = float((((w - q) ** 2).sum(0).double() * col.double()).sum())
                probe_q = q if probe_q is None else probe_q
            probe = ladder(shape[-1])[0]
            p.data = probe_q.reshape(original.shape).to(original.dtype)
            try:
                i = layer_of(hf_name)
                if i is None:                       # the embedding (and a tied head) or the output head
                    if hf_name == f"{family.head}.weight":
                        with torch.no_grad():
                            kld = _kl(base, logprobs(layer_in[-1]))
                    else:
                        kld = rerun(0, first_inputs()[0])
                else:
                    kld = rerun(i, layer_in[i])
            finally:
                p.data = original
            out.sensitivity[gname] = Sensitivity(probe, max(kld, 0.0), errors)
            bar.update(1)
    finally:
        bar.close()
    out.seconds = time.perf_counter() - t0
    return out


def choose(searched: dict[str, tuple[int, ...]], measured: Measured, budget: int) -> dict[str, str]:
    """GGUF name -> type within `budget` bytes of the searched tensors; InputError if none fits."""
    names = list(searched)
    options = [[(tensor_nbytes(searched[n], t), measured.sensitivity[n].predicted(t))
                for t in ladder(searched[n][-1])] for n in names]
    picked = solve(options, budget)
    if picked is None:
        smallest = sum(min(b for b, _ in o) for o in options)
        raise InputError(f"auto: the budget leaves {budget / 1e6:.1f} MB for the quantized tensors; their smallest "
                         f"types take {smallest / 1e6:.1f} MB: give a larger size")
    return {n: ladder(searched[n][-1])[j] for n, j in zip(names, picked)}
