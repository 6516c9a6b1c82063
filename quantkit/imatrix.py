"""`quantkit imatrix`: the importance matrix llama-imatrix computes, from a transformers forward pass.

For every linear layer of the decoder (the GGUF tensors `blk.N.*.weight`; llama-imatrix leaves out
`output.weight` by default, and the embedding is a lookup), the sum over calibration tokens of each
input column's squared activation, and the number of tokens. Written as llama.cpp's imatrix GGUF:

    general.type = "imatrix", imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size
    <tensor>.in_sum2   F32 [1, columns]     sum of x^2 per input column
    <tensor>.counts    F32 [1, 1]           tokens seen

A MoE layer's stacked experts (ffn_{gate,up,down}_exps) have one row per expert, as llama-imatrix's
MUL_MAT_ID branch records them: expert e sums the rows it multiplies, the tokens the router sent to
it (a token counts once for each expert of its top k), and counts them:

    <tensor>.in_sum2   F32 [experts, columns]
    <tensor>.counts    F32 [experts, 1]

llama-quantize (and `quantkit export --imatrix`) divides each row of sums by its own count (1 where
the count is 0) and hands the per-column means to the K-quant searches as weights, expert e's to
expert e's slice. The model runs one decoder layer at a time (as GPTQ does), in float32 on a CPU
and in its stored dtype on a GPU; sums accumulate in float64.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import gguf
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
    # GGUF tensor name -> float32 [n, columns] sums of x^2 and int64 [n] counts: n = 1 for a matrix,
    # the number of experts for a stack of them (the file's in_sum2 and counts)
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def weights(self) -> dict[str, torch.Tensor]:
        """What llama-quantize passes to the quantizers (quantize.cpp's load_imatrix): each row of
        sums / its count (1 where the count is 0), one float32 vector per tensor, expert after expert."""
        out = {}
        for name, s in self.sums.items():
            c = np.asarray(self.counts[name], dtype=np.float32).reshape(-1, 1)
            w = np.where(c > 0, s / np.where(c > 0, c, 1), np.float32(1)).astype(np.float32)
            out[name] = torch.from_numpy(w.reshape(-1))
        return out


def linear_names(model: HFModel) -> dict[str, str]:
    """HF weight name -> GGUF tensor name, for the decoder's linear layers (experts' stacks aside)."""
    return {t.hf_name: t.gguf_name for t in family_of(model).source_tensors(model, hparams_of(model))
            if t.hf_name and t.gguf_name.startswith("blk.") and len(t.shape) == 2}


def expert_names(model: HFModel) -> set[str]:
    """The GGUF names of the experts' stacks (one imatrix row per expert)."""
    return {t.gguf_name for t in family_of(model).source_tensors(model, hparams_of(model)) if t.stacked}


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


def _gguf_name(tensor: gguf.MODEL_TENSOR, layer: int) -> str:
    return f"{gguf.TENSOR_NAMES[tensor].format(bid=layer)}.weight"


def _fused_experts(module) -> bool:
    """transformers 5's experts: one module holding gate_up_proj [experts, 2 x ffn, hidden] (gate rows
    first) and down_proj [experts, hidden, ffn], called with (hidden_states, top_k_index, top_k_weights)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.nn.Parameter) and gate_up.dim() == 3 and isinstance(down, torch.nn.Parameter)


def _check_layout(module, where: str) -> None:
    # the layouts transformers' experts decorator can declare; quantkit reads the default one
    if (getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True)
            or getattr(module, "has_bias", False) or not getattr(module, "has_gate", True)
            or module.gate_up_proj.shape[1] != 2 * module.down_proj.shape[2]):
        raise UnsupportedError(f"{where}: an experts layout quantkit does not read (transposed, interleaved or "
                               "with biases)")


def collect(model_dir: Path, *, calib: Path | None = None, n_samples: int = 64, seqlen: int = 512,
            device: str = "cpu", progress: bool = True, tokens: torch.Tensor | None = None) -> Imatrix:
    """Run the model over the calibration text (default: text it generates itself) and accumulate
    the squared input activations of every decoder linear (of each expert apart, for its routed tokens)."""
    model_dir = Path(model_dir)
    hf = HFModel(model_dir)
    names, family = linear_names(hf), family_of(hf)
    if not family.imatrix:
        raise UnsupportedError(f"no importance matrix for {hf.architecture} yet", model_dir / "config.json")
    if tokens is None and calib is not None:        # the user's text is checked before any weight is loaded
        tokens = layerwise.text_tokens(model_dir, calib, n_samples, seqlen)
    model, stored, work = layerwise.load(model_dir, device, progress)
    if tokens is None:
        tokens = layerwise.generated_tokens(model_dir, model, stored, n_samples, seqlen, 0, device, progress)
    inputs, kwargs = layerwise.layer0_inputs(model, family, tokens, device, work)

    sums: dict[str, torch.Tensor] = {}         # GGUF name -> float64 [n, columns] (n: 1, or experts)
    counts: dict[str, np.ndarray] = {}

    def add(name: str, x: torch.Tensor, row: int = 0, rows: int = 1) -> None:
        """x: [tokens, columns], what the tensor (or expert `row` of a stack of `rows`) multiplies."""
        if name not in sums:
            sums[name] = torch.zeros(rows, x.shape[-1], dtype=torch.float64, device=x.device)
            counts[name] = np.zeros(rows, dtype=np.int64)
        x = x.detach().to(torch.float64)
        sums[name][row] += (x * x).sum(0)
        counts[name][row] += x.shape[0]

    def hook(gguf_name):
        def pre(module, args):
            add(gguf_name, args[0].reshape(-1, args[0].shape[-1]))
        return pre

    def experts_hook(layer: int):
        gate, up, down = (_gguf_name(t, layer) for t in (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP,
                                                         gguf.MODEL_TENSOR.FFN_DOWN_EXP))

        def pre(m, args, kwargs):
            x, chosen = layerwise.routed(args, kwargs)
            n = m.gate_up_proj.shape[0]
            for e in range(n):
                # llama-imatrix's MUL_MAT_ID: every (token, top-k slot) that chose expert e is one row
                rows = x[torch.where(chosen == e)[0]]
                add(gate, rows, e, n)
                add(up, rows, e, n)
                add(down, layerwise.expert_activation(m, e, rows), e, n)   # what down_proj multiplies
        return pre

    layers = family.layers(model)
    bar = tqdm(total=len(layers), desc="imatrix", unit="layer", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for i, layer in enumerate(layers):
            layerwise.to(layer, device, work)
            p = family.layer_prefix(i)
            handles, routers = [], set()
            for mname, m in layer.named_modules():
                if _fused_experts(m):
                    _check_layout(m, f"{p}{mname}")
                    handles.append(m.register_forward_pre_hook(experts_hook(i), with_kwargs=True))
                    # its router: the MoE block's `gate` (named as in the checkpoint or not: Mixtral's is
                    # block_sparse_moe.gate there, mlp.gate in transformers 5)
                    block = layer.get_submodule(mname.rpartition(".")[0]) if "." in mname else layer
                    router = getattr(block, "gate", None)
                    if isinstance(getattr(router, "weight", None), torch.nn.Parameter):
                        handles.append(router.register_forward_pre_hook(
                            hook(_gguf_name(gguf.MODEL_TENSOR.FFN_GATE_INP, i))))
                        routers.add(id(router))
            for mname, m in layer.named_modules():
                w = m._parameters.get("weight") if id(m) not in routers else None
                if isinstance(w, torch.nn.Parameter) and w.dim() == 2 and f"{p}{mname}.weight" in names:
                    handles.append(m.register_forward_pre_hook(hook(names[f"{p}{mname}.weight"])))
            with torch.no_grad():
                inputs = [layerwise.hidden(layer(x, **kwargs)) for x in inputs]
            for h in handles:
                h.remove()
            sums.update({n: s.cpu() for n, s in sums.items()})     # device memory: one layer's sums
            layerwise.to(layer, "cpu", stored)
            layers[i] = torch.nn.Identity()             # this layer is done: free it
            bar.update(1)
    finally:
        bar.close()
    stacks = expert_names(hf)
    missing = sorted((set(names.values()) | stacks) - set(sums))
    if any(n in stacks for n in missing):
        raise UnsupportedError(f"transformers {_transformers_version()} keeps {hf.architecture}'s experts as separate "
                               "modules: collecting per expert needs transformers 5's fused experts", model_dir)
    if missing:
        raise RuntimeError(f"no activations reached {', '.join(missing[:4])}")
    for name, s in sums.items():
        if not torch.isfinite(s).all():
            raise InputError(f"the activations of {name} overflow (NaN or Inf)", model_dir)
    return Imatrix({n: s.to(torch.float32).numpy() for n, s in sums.items()}, counts,
                   [str(calib) if calib else "generated by the model"], int(tokens.shape[0]), int(tokens.shape[1]))


def write(im: Imatrix, path: Path) -> Path:
    """llama.cpp's imatrix GGUF, under a temporary name renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kv = KeyValues(None)                                    # an imatrix file names no architecture
    kv.add_type(gguf.GGUFType.IMATRIX)
    kv.add_array(KEY_DATASETS, im.datasets)
    kv.add_uint32(KEY_CHUNK_COUNT, im.chunk_count)
    kv.add_uint32(KEY_CHUNK_SIZE, im.chunk_size)
    data = {}
    for name in sorted(im.sums):
        counts = np.asarray(im.counts[name]).reshape(-1, 1)        # [n, 1]: one count per row of sums
        data[f"{name}.in_sum2"] = im.sums[name].reshape(len(counts), -1).astype(np.float32)
        data[f"{name}.counts"] = counts.astype(np.float32)
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
        if gguf.GGMLQuantizationType.F32 not in (t.tensor_type, c.tensor_type) or t.tensor_type != c.tensor_type:
            raise InputError(f"{name}: sums and counts must be F32", path)
        counts = np.asarray(c.data, dtype=np.float32).reshape(-1)
        sums = np.asarray(t.data, dtype=np.float32).reshape(-1)
        if not counts.size or sums.size % counts.size:
            raise InputError(f"{name}: {sums.size} sums do not make {counts.size} rows, one per count", path)
        im.sums[name] = sums.reshape(counts.size, -1).copy()
        # common_imatrix_load rounds them (std::lround: halves away from zero)
        im.counts[name] = (np.sign(counts) * np.floor(np.abs(counts) + 0.5)).astype(np.int64)
    if not im.sums:
        raise InputError("the imatrix holds no tensors", path)
    return im
