"""A base checkpoint with LoRA adapters and/or a residual merged in, read lazily like HFModel.

MergedModel has HFModel's interface (config, tensors, read_rows, fingerprint), so the export reads
it exactly as it reads a checkpoint on disk, and `quantkit merge` writes it out. Each read of a
row range reads those rows of the base (and of the residual), applies the tensor's ops in float32
(transforms.py) and rounds once to the output dtype. Ops per tensor, in order: the residual, then
each adapter in the order given (its replacement, then its LoRA / DoRA update).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import transforms
from .adapters import Adapter, is_tied
from .errors import InputError
from .hfmodel import FLOAT_DTYPES, HFModel, TensorRef

DTYPE_NAMES = {torch.bfloat16: ("BF16", "bfloat16"), torch.float16: ("F16", "float16"), torch.float32: ("F32", "float32")}


@dataclass(frozen=True)
class Residual:
    """A full-rank weight difference (e.g. instruct - base), added as base + scale * delta."""
    model: HFModel
    scale: float = 1.0

    def check(self, base: HFModel, mine: str = "residual", theirs: str = "the base") -> None:
        """Every base tensor needs a delta of the same shape, and every delta a base tensor."""
        have, want = self.model.tensors, base.tensors
        for name, ref in want.items():
            if name not in have:
                raise InputError(f"{mine} has no tensor {name!r} of {theirs}", self.model.path)
            if have[name].shape != ref.shape:
                raise InputError(f"{mine} tensor {name!r} has shape {list(have[name].shape)}, {theirs}'s has "
                                 f"{list(ref.shape)}", have[name].shard)
        extra = sorted(set(have) - set(want))
        if extra:
            raise InputError(f"{mine} tensor {extra[0]!r} matches no tensor of {theirs} "
                             f"({len(extra)} such tensors)", have[extra[0]].shard)

    def note(self) -> dict:
        return {"path": str(Path(self.model.path).resolve()), "fingerprint": self.model.fingerprint(), "scale": self.scale}


class MergedModel(HFModel):
    def __init__(self, base: HFModel, adapters: list[Adapter] = (), residual: Residual | None = None, *,
                 dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
        # not HFModel.__init__: the files (config, tokenizer) are the base's, the weights are computed
        self.path = base.path
        self.base, self.adapters, self.residual = base, list(adapters), residual
        self.dtype, self.device = dtype, torch.device(device)
        if residual is not None:
            residual.check(base)
        for a in self.adapters:
            for t in [*a.terms.values(), *(t for p in a.expert_terms.values() for ts in p.values() for _, t in ts)]:
                t.A, t.B = t.A.to(self.device), t.B.to(self.device)
                if t.magnitude is not None:
                    t.magnitude = t.magnitude.to(self.device)

        self.ops: dict[str, list[transforms.Op]] = {}
        if residual is not None:
            for name in base.tensors:
                reader = (lambda n: lambda rows: residual.model.read_rows(n, rows.start, rows.stop))(name)
                expert = (lambda n: lambda e, rows: residual.model.read_expert_rows(n, e, rows.start, rows.stop))(name)
                self.ops.setdefault(name, []).append(transforms.AddResidual(reader, residual.scale, expert))
        for a in self.adapters:
            for name, tensor in a.replacements.items():
                self.ops.setdefault(name, []).append(transforms.Replace(tensor))
            for name, term in a.terms.items():
                self.ops.setdefault(name, []).append(transforms.Lora(term))
            for name, pieces in a.expert_terms.items():
                self.ops.setdefault(name, []).append(transforms.ExpertLora(pieces))

        # an adapter that replaces lm_head of a tied model unties it (also where a tied checkpoint
        # stores lm_head anyway: transformers would re-tie it on load and drop the change)
        self.untied = is_tied(base) and "lm_head.weight" in self.ops
        self.config = dict(base.config)
        if self.untied:
            self.config["tie_word_embeddings"] = False
        for key in ("torch_dtype", "dtype"):
            if key in self.config or key == "torch_dtype":
                self.config[key] = DTYPE_NAMES[dtype][1]

        refs = dict(base.tensors)
        if self.untied and "lm_head.weight" not in refs:
            refs["lm_head.weight"] = TensorRef("lm_head.weight", refs["model.embed_tokens.weight"].shard,
                                               refs["model.embed_tokens.weight"].dtype,
                                               refs["model.embed_tokens.weight"].shape, -1, 0)
        esize = torch.empty((), dtype=dtype).element_size()
        self._tensors = {}
        for name, r in refs.items():
            if r.dtype not in FLOAT_DTYPES:
                raise InputError(f"tensor {name!r} has dtype {r.dtype}; expected BF16, F16 or F32", r.shard)
            n = esize
            for d in r.shape:
                n *= d
            self._tensors[name] = TensorRef(name, r.shard, DTYPE_NAMES[dtype][0], r.shape, -1, n)

    @property
    def tensors(self) -> dict[str, TensorRef]:
        return self._tensors

    @property
    def shards(self) -> list[Path]:
        return self.base.shards

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.finish(name, start, stop, self.fetch(name, start, stop)).cpu()

    def fetch(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """The base's rows as stored (None for an lm_head that only an adapter supplies)."""
        return self.base.read_rows(name, start, stop) if name in self.base.tensors else None

    def finish(self, name: str, start: int, stop: int, fetched: torch.Tensor | None) -> torch.Tensor:
        """The merged rows in the output dtype, on the merge device."""
        ops = self.ops.get(name)
        if not ops:
            return fetched.to(self.dtype)
        rows = slice(start, stop)
        if fetched is not None:
            x = fetched.to(device=self.device, dtype=torch.float32)
        else:   # lm_head of a tied base, replaced by an adapter: its first op supplies the rows
            shape = self.tensors[name].shape
            x = torch.zeros((stop - start, *shape[1:]), dtype=torch.float32, device=self.device)
        out = transforms.apply(ops, x, rows)   # 1-D tensors: rows are elements, the ops are elementwise
        return self._checked(name, out, x if fetched is not None else None)

    def _checked(self, name: str, out: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """out in the output dtype, or an error if the merge gave NaN or Inf (x: the base's rows)."""
        if not transforms.all_finite(out):
            if x is not None and not transforms.all_finite(x):
                raise InputError(f"tensor {name!r} holds NaN or Inf (in the base itself, before any merge)",
                                 self.base.path)
            sources = [str(p) for p in self.input_paths()[1:]]       # what is merged into the base
            raise InputError(f"merging {', '.join(sources)} into it gives NaN or Inf in tensor {name!r}",
                             self.base.path)
        return out.to(self.dtype)

    def fetch_expert(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one expert of a fused experts tensor, as stored: its ops (a residual,
        LoRA on experts) work on any rows of one expert; others (a replacement) on the expert whole."""
        if not self._by_expert(name):
            return self.base.read_rows(name, expert, expert + 1)
        return self.base.read_expert_rows(name, expert, start, stop)

    def _by_expert(self, name: str) -> bool:
        return all(hasattr(op, "expert") for op in self.ops.get(name, ()))

    def finish_expert(self, name: str, expert: int, start: int, stop: int, fetched: torch.Tensor) -> torch.Tensor:
        ops = self.ops.get(name)
        if not ops:
            return fetched.to(self.dtype)
        if not self._by_expert(name):
            return self.finish(name, expert, expert + 1, fetched)[0, start:stop]
        x = out = fetched.to(device=self.device, dtype=torch.float32)
        for op in ops:
            out = op.expert(out, expert, slice(start, stop))
        return self._checked(name, out, x)

    def total_bytes(self) -> int:
        return self.base.total_bytes()

    def input_paths(self) -> list[Path]:
        return [self.base.path, *(a.path for a in self.adapters)] + ([self.residual.model.path] if self.residual else [])

    def merge_note(self) -> dict:
        return {"base": {"path": str(Path(self.base.path).resolve()), "fingerprint": self.base.fingerprint()},
                "adapters": [a.note() for a in self.adapters],
                "residual": self.residual.note() if self.residual else None,
                "dtype": DTYPE_NAMES[self.dtype][1], "untied_lm_head": self.untied,
                "numerics": "float32 W + scale * (B @ A) (DoRA: peft's weight-norm rescaling), rounded once"}

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.base.fingerprint().encode())
        h.update(json.dumps(self.merge_note(), sort_keys=True, default=str).encode())
        return h.hexdigest()
