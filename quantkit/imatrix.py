"""`quantkit imatrix`: the importance matrix llama-imatrix computes, from a transformers forward pass.

For every linear layer of the decoder (the GGUF tensors `blk.N.*.weight`; llama-imatrix leaves out
`output.weight` by default, and the embedding is a lookup), the sum over calibration tokens of each
input column's squared activation, and the number of tokens. Written as llama.cpp's imatrix GGUF:

    general.type = "imatrix", imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size
    <tensor>.in_sum2   F32 [1, columns]     sum of x^2 per input column
    <tensor>.counts    F32 [1, 1]           tokens seen

llama-quantize (and `quantkit export --imatrix`) divides the sums by the count and hands the
per-column means to the K-quant searches as weights. The model runs one decoder layer at a time
(as GPTQ does), in float32 on a CPU and in its stored dtype on a GPU; sums accumulate in float64.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import layerwise
from .errors import InputError, UnsupportedError
from .families import family_of, hparams_of
from .hfmodel import HFModel
from quantkit.converters.gguf_file import GGUFFile, KeyValues, TensorInfo


KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)     # GGUF tensor name -> float32 [columns]
    counts: dict[str, int] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def weights(self) -> dict[str, torch.Tensor]:
        """What llama-quantize passes to the quantizers: sum / count per column (1 where no count)."""
        out = {}
        for name, s in self.sums.items():
            c = np.float32(self.counts.get(name, 0))
            out[name] = torch.from_numpy(s / c if c > 0 else np.ones_like(s)).to(torch.float32)
        return out


def linear_names(model: HFModel) -> dict[str, str]:
    """HF weight name -> GGUF tensor name, for the decoder's linear layers."""
    return {t.hf_name: t.gguf_name for t in family_of(model).source_tensors(model, hparams_of(model))
            if t.hf_name and t.gguf_name.startswith("blk.") and len(t.shape) == 2}


def collect(model_dir: Path, *, calib: Path | None = None, n_samples: int = 64, seqlen: int = 512,
            device: str = "cpu", progress: bool = True, tokens: torch.Tensor | None = None) -> Imatrix:
    """Run the model over the calibration text (default: text it generates itself) and accumulate
    the squared input activations of every decoder linear."""
    model_dir = Path(model_dir)
    hf = HFModel(model_dir)
    names, family = linear_names(hf), family_of(hf)
    if not family.imatrix:
        raise UnsupportedError(f"no importance matrix for {hf.architecture} yet (its experts' activations are "
                               "not collected per expert)", model_dir / "config.json")
    if tokens is None and calib is not None:        # the user's text is checked before any weight is loaded
        tokens = layerwise.text_tokens(model_dir, calib, n_samples, seqlen)
    model, stored, work = layerwise.load(model_dir, device, progress)
    if tokens is None:
        tokens = layerwise.generated_tokens(model_dir, model, stored, n_samples, seqlen, 0, device, progress)
    inputs, kwargs = layerwise.layer0_inputs(model, family, tokens, device, work)

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(gguf_name):
        def pre(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[gguf_name] = sums.get(gguf_name, 0) + (x * x).sum(0).cpu()
            counts[gguf_name] = counts.get(gguf_name, 0) + x.shape[0]
        return pre

    layers = family.layers(model)
    bar = tqdm(total=len(layers), desc="imatrix", unit="layer", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for i, layer in enumerate(layers):
            layerwise.to(layer, device, work)
            p = family.layer_prefix(i)
            handles = [m.register_forward_pre_hook(hook(names[f"{p}{mname}.weight"]))
                       for mname, m in layer.named_modules()
                       if isinstance(m, torch.nn.Linear) and f"{p}{mname}.weight" in names]
            with torch.no_grad():
                inputs = [layerwise.hidden(layer(x, **kwargs)) for x in inputs]
            for h in handles:
                h.remove()
            layerwise.to(layer, "cpu", stored)
            layers[i] = torch.nn.Identity()             # this layer is done: free it
            bar.update(1)
    finally:
        bar.close()
    missing = sorted(set(names.values()) - set(sums))
    if missing:
        raise RuntimeError(f"no activations reached {', '.join(missing[:4])}")
    for name, s in sums.items():
        if not torch.isfinite(s).all():
            raise InputError(f"the activations of {name} overflow (NaN or Inf)", model_dir)
    return Imatrix({n: s.to(torch.float32).numpy() for n, s in sums.items()}, counts,
                   [str(calib) if calib else "generated by the model"], int(tokens.shape[0]), int(tokens.shape[1]))


def write(im: Imatrix, path: Path) -> Path:
    """llama.cpp's imatrix GGUF, under a temporary name renamed when complete."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kv = KeyValues(None)                                    # an imatrix file names no architecture
    kv.add_type(gguf.GGUFType.IMATRIX)
    kv.add_array(KEY_DATASETS, im.datasets)
    kv.add_uint32(KEY_CHUNK_COUNT, im.chunk_count)
    kv.add_uint32(KEY_CHUNK_SIZE, im.chunk_size)
    data = {}
    for name in sorted(im.sums):
        data[f"{name}.in_sum2"] = im.sums[name].reshape(1, -1).astype(np.float32)
        data[f"{name}.counts"] = np.array([[im.counts[name]]], dtype=np.float32)
    f = GGUFFile(path, kv.kv, [TensorInfo(n, gguf.GGMLQuantizationType.F32, (*a.shape[:-1], a.shape[-1] * 4))
                               for n, a in data.items()])
    try:
        f.open()
        for n, a in data.items():
            f.write(n, a)
        return f.commit()
    except BaseException:
        f.abort()
        raise


def load(path: Path) -> Imatrix:
    """An imatrix GGUF (llama-imatrix's or ours); InputError naming the file if it is not one."""
    import gguf

    path = Path(path)
    try:
        r = gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except Exception as e:            # gguf-py raises ValueError/struct errors on a non-GGUF file
        raise InputError(f"not a GGUF imatrix file ({e}); convert a legacy .dat with llama-imatrix", path) from None

    def field_value(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    if field_value(gguf.Keys.General.TYPE) != gguf.GGUFType.IMATRIX:
        raise InputError("not an imatrix file (general.type is not 'imatrix')", path)
    im = Imatrix(datasets=list(field_value(KEY_DATASETS) or []), chunk_count=int(field_value(KEY_CHUNK_COUNT) or 0),
                 chunk_size=int(field_value(KEY_CHUNK_SIZE) or 0))
    tensors = {t.name: t for t in r.tensors}
    for tname, t in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        name = tname.removesuffix(".in_sum2")
        c = tensors.get(f"{name}.counts")
        if c is None:
            raise InputError(f"{name}.in_sum2 has no {name}.counts", path)
        if int(c.n_elements) != 1:
            raise InputError(f"{name}: {int(c.n_elements)} expert counts; quantkit handles dense models only", path)
        im.sums[name] = np.asarray(t.data, dtype=np.float32).reshape(-1).copy()
        im.counts[name] = int(np.asarray(c.data).reshape(-1)[0])
    if not im.sums:
        raise InputError("the imatrix holds no tensors", path)
    return im
