"""PEFT LoRA adapters as peft writes them, mapped onto the tensors of a base checkpoint.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (or a pickled
`adapter_model.bin`, read only through torch's `weights_only` loader). Its keys come in the
variants peft has written over the years:

    base_model.model.<module>.lora_A[.<adapter>].weight            [r, in]
    base_model.model.<module>.lora_B[.<adapter>].weight            [out, r]
    base_model.model.<module>.lora_embedding_A[.<adapter>]         [r, vocab]
    base_model.model.<module>.lora_embedding_B[.<adapter>]         [dim, r]
    base_model.model.<module>.lora_magnitude_vector[.<adapter>][.weight]   [out]   (DoRA)
    base_model.model.<module>.modules_to_save[.<adapter>].weight   full replacement
    base_model.model.<module>.base_layer.weight                    saved embedding layer: replacement
    base_model.model.<module>.weight                               modules_to_save (peft >= 0.13)

MoE experts come in two more forms. peft's `target_parameters` on transformers 5's fused experts
(`mlp.experts.gate_up_proj` [experts, 2 x ffn, hidden], `mlp.experts.down_proj` [experts, hidden,
ffn]) saves one pair per parameter under the experts module, nested wrappers spelled
`.base_layer` (the parameter defined first innermost), each pair holding every expert:

    base_model.model.<layer>.mlp.experts[.base_layer].lora_A.weight     [experts x r, in]   (expert-major)
    base_model.model.<layer>.mlp.experts[.base_layer].lora_B.weight     [out, r x experts]  (expert-minor)

expert e's update is scaling * B[:, e::experts] @ A[e*r:(e+1)*r] ([out, in], peft's ParamWrapper),
r and alpha resolved on the parameter's name. Adapters trained on one module per expert
(`mlp.experts.N.gate_proj`, Mixtral's `block_sparse_moe.experts.N.w1`) name those modules. Either
form merges into either layout of the base: one tensor per expert, or fused (the rows of the fused
tensor that linear holds); the family's `experts_layout` says which linears a fused parameter stacks.

Each is mapped to the base tensor `<module>.weight`; anything that maps nowhere or has the wrong
shape is an error naming it, raised before anything is written. Scaling is peft's: alpha / r, or
alpha / sqrt(r) with use_rslora, with r and alpha resolved through rank_pattern / alpha_pattern as
peft's get_pattern_key does, times the user's weight for this adapter.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError, UnsupportedError
from .hfmodel import HFModel

_PREFIX = "base_model.model."
_A = "[^.]+"  # an adapter name
# peft's LoraConfig defaults, for configs that leave them out
DEFAULT_R, DEFAULT_ALPHA = 8, 8
# modules peft may save whole beside modules_to_save (peft's EMBEDDING_LAYER_NAMES)
EMBEDDING_LAYERS = ("embed_tokens", "lm_head")
# model types whose linear layers are GPT-2's Conv1D ([in, out] weights): the only ones where peft
# honours fan_in_fan_out (it forces it off for nn.Linear, on for Conv1D)
CONV1D_MODEL_TYPES = {"gpt2"}
# LoRA variants whose merge is not W + scale * B @ A on the base the user has, or that peft will
# not merge: refused rather than merged wrongly
_VARIANT_FIELDS = ("use_qalora", "use_bdlora", "alora_invocation_tokens", "velora_config", "monteclora_config",
                   "kasa_config", "arrow_config", "lora_bias", "layer_replication")
# inits that change the base weights during training: such adapters must be converted first
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq", "kasa")
_KEY_FORMS = [
    ("lora_bias", re.compile(rf"^(?P<module>.+)\.lora_B(?:\.{_A})?\.bias$")),
    ("lora", re.compile(rf"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>{_A}))?\.weight$")),
    ("embedding", re.compile(rf"^(?P<module>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<adapter>{_A}))?$")),
    ("magnitude", re.compile(rf"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?!weight$)(?P<adapter>{_A}))?"
                             r"(?:\.weight)?$")),
    ("replace", re.compile(rf"^(?P<module>.+)\.modules_to_save(?:\.(?P<adapter>{_A}))?\.(?P<param>weight|bias)$")),
    ("replace", re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")),
    ("replace", re.compile(r"^(?P<module>.+)\.(?P<param>weight|bias)$")),
]


@dataclass
class LoraTerm:
    """One adapter's low-rank update of one base tensor: rows of transpose?(B @ A) * scaling."""
    module: str
    A: torch.Tensor                   # float32 [r, in] (linear) or [r, vocab] (embedding)
    B: torch.Tensor                   # float32 [out, r] or [dim, r]
    scaling: float
    transposed: bool                  # delta = (B @ A).T: fan_in_fan_out layers and embeddings
    magnitude: torch.Tensor | None = None   # DoRA: float32 [out]

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_shape(self) -> tuple[int, int]:
        return (self.A.shape[1], self.B.shape[0]) if self.transposed else (self.B.shape[0], self.A.shape[1])


# a fused experts tensor's updates: expert → (first row of the expert's matrix it updates, update)
ExpertTerms = dict[int, list[tuple[int, LoraTerm]]]


@dataclass
class Adapter:
    path: Path
    config: dict
    weight: float
    terms: dict[str, LoraTerm] = field(default_factory=dict)           # base tensor name → update
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # base tensor name → new tensor
    expert_terms: dict[str, ExpertTerms] = field(default_factory=dict)   # fused experts tensor → updates
    sha256: str = ""

    def note(self) -> dict:
        """What merge.json and the safetensors metadata record about this adapter."""
        c = self.config
        every = [*self.terms.values(), *(t for pieces in self.expert_terms.values() for p in pieces.values() for _, t in p)]
        scalings = sorted({round(t.scaling, 10) for t in every})
        return {"path": str(Path(self.path).resolve()), "sha256": self.sha256, "r": c.get("r"), "lora_alpha": c.get("lora_alpha"),
                "use_rslora": bool(c.get("use_rslora")), "use_dora": bool(c.get("use_dora")),
                "rank_pattern": c.get("rank_pattern") or {}, "alpha_pattern": c.get("alpha_pattern") or {},
                "weight": self.weight, "scaling": scalings, "base_model_name_or_path": c.get("base_model_name_or_path"),
                "lora_tensors": len(self.terms) + len(self.expert_terms), "replaced_tensors": sorted(self.replacements)}


def pattern_key(patterns, key: str) -> str:
    # peft.utils.other.get_pattern_key: the first pattern that matches the end of the module name
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return key


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    st, pt = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file
        try:
            return load_file(st)
        except Exception as e:
            raise InputError(f"cannot read adapter weights ({e})", st) from None
    if pt.is_file():
        try:
            return torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"refusing to load a pickle that is not plain tensors ({str(e).splitlines()[0]})",
                             pt) from None
    raise InputError("no adapter_model.safetensors or adapter_model.bin", path)


# name parts that say how a copy is stored, not which model it is
_FORMAT_TOKENS = {"bf16", "fp16", "fp32", "f16", "f32", "hf", "safetensors", "local", "copy", "weights"}


def _norm_name(s: str) -> str:
    return "".join(t for t in re.split(r"[^a-z0-9]+", s.lower()) if t and t not in _FORMAT_TOKENS)


def check_base_name(config: dict, base: HFModel, where: Path) -> None:
    """Refuse an adapter trained on another model. A local copy may carry a format suffix
    (Org/Model-8B as model-8b-bf16); anything else must match: Qwen3-8B is not Qwen3-8B-Base."""
    name = config.get("base_model_name_or_path")
    if not name:
        return
    if Path(name).is_dir() and Path(name).resolve() == base.path.resolve():
        return
    want = _norm_name(Path(name).name)
    have = {_norm_name(base.path.resolve().name), _norm_name(str(base.config.get("_name_or_path", "")).split("/")[-1])}
    if want and want not in have:
        raise InputError(f"adapter was trained on {name!r}, which does not look like the base {base.path.name!r} "
                         "(--ignore-base-name merges it anyway)", where / "adapter_config.json")


def _targets_allow(config: dict, module: str) -> bool:
    t = config.get("target_modules")
    if t is None or t == "all-linear":
        return True
    if isinstance(t, str):
        return re.fullmatch(t, module) is not None
    return any(module == m or module.endswith("." + m) for m in t)


def _params_allow(config: dict, param: str) -> bool:
    # peft's target_parameters: full parameter names or their endings
    return any(param == t or param.endswith("." + t) for t in config.get("target_parameters") or ())


def _check_config_types(config, cfg_path: Path) -> None:
    """The numbers the merge computes with must be numbers (a JSON "16" or null is refused here, not
    deep in the arithmetic)."""
    if not isinstance(config, dict):
        raise InputError(f"expected a JSON object, not {type(config).__name__}", cfg_path)

    def number(key, v, integer):          # a rank: a positive integer; an alpha: any number
        ok = not isinstance(v, bool) and (isinstance(v, int) and v > 0 if integer else isinstance(v, (int, float)))
        if not ok:
            raise InputError(f"{key} must be {'a positive integer' if integer else 'a number'}, not {v!r}", cfg_path)

    for key, integer in (("r", True), ("lora_alpha", False)):
        if key in config:
            number(key, config[key], integer)
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise InputError(f"{key} must be true or false, not {config[key]!r}", cfg_path)
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise InputError(f"{key} must be an object of module pattern -> value, not {pattern!r}", cfg_path)
        for k, v in pattern.items():
            number(f"{key}[{k!r}]", v, integer)


def load_adapter(path: str | Path, base: HFModel, *, weight: float = 1.0,
                 ignore_base_name: bool = False) -> Adapter:
    path = Path(path)
    if not path.is_dir():
        raise InputError(("not a directory" if path.exists() else "does not exist")
                         + " (expected a PEFT adapter directory)", path)
    cfg_path = path / "adapter_config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found", cfg_path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", cfg_path) from None
    _check_config_types(config, cfg_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedError(f"peft_type {config.get('peft_type')!r} is not supported (only LORA)", cfg_path)
    for flag in _VARIANT_FIELDS:
        if config.get(flag):
            raise UnsupportedError(f"{flag} adapters are not supported (only LoRA, rsLoRA and DoRA)", cfg_path)
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise UnsupportedError(f"init_lora_weights={config['init_lora_weights']!r} changes the base weights in "
                               "training: convert the adapter to plain LoRA first (peft's "
                               "path_initial_model_for_weight_conversion)", cfg_path)
    if not ignore_base_name:
        check_base_name(config, base, path)

    weights = _read_weights(path)
    h = hashlib.sha256(cfg_path.read_bytes())
    for f in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / f).is_file():
            h.update((path / f).read_bytes())
    adapter = Adapter(path, config, weight, sha256=h.hexdigest())
    where = path / ("adapter_model.safetensors" if (path / "adapter_model.safetensors").is_file() else "adapter_model.bin")

    parts: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names: set[str] = set()
    for key, tensor in weights.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for kind, rx in _KEY_FORMS:
            m = rx.match(name)
            if m:
                break
        else:
            raise InputError(f"adapter tensor {key!r} is not a LoRA, DoRA or modules_to_save tensor", where)
        if kind == "lora_bias":
            raise UnsupportedError(f"adapter tensor {key!r}: LoRA biases are not supported", where)
        if m.groupdict().get("adapter"):
            adapter_names.add(m.group("adapter"))
        module = m.group("module")
        if kind == "replace" and rx is _KEY_FORMS[-1][1] and not _may_be_saved_whole(config, module):
            raise InputError(f"adapter tensor {key!r} is a whole weight of {module!r}, which is neither in "
                             "modules_to_save nor an embedding layer", where)
        if kind == "replace":
            target = f"{module}.{m.group('param')}"
            _check_replacement(target, tensor, base, key, where)
            adapter.replacements[target] = tensor
        else:
            slot = {"lora": f"lora_{m.groupdict().get('ab')}", "embedding": f"emb_{m.groupdict().get('ab')}",
                    "magnitude": "magnitude"}[kind]
            parts.setdefault(module, {})[slot] = tensor
    if len(adapter_names) > 1:
        raise UnsupportedError(f"the file holds several adapters ({', '.join(sorted(adapter_names))}); "
                               "save each on its own", where)

    layout = _expert_names(base)
    for module, p in sorted(parts.items()):
        target = f"{module}.weight"
        if layout is not None and target not in base.tensors and _expert_module(module, layout):
            _place_expert_lora(adapter, module, p, base, layout, where)
            continue
        if layout is not None and target not in base.tensors:
            target = _renamed_router(target, base, layout.router)
        adapter.terms[target] = _make_term(module, p, config, base, weight, where, target)
    if not adapter.terms and not adapter.replacements and not adapter.expert_terms:
        raise InputError("the adapter holds no LoRA tensors", where)
    return adapter


def _may_be_saved_whole(config: dict, module: str) -> bool:
    names = list(config.get("modules_to_save") or []) + list(EMBEDDING_LAYERS)
    return any(module == n or module.endswith("." + n) for n in names)


def is_tied(base: HFModel) -> bool:
    """Whether the base's output matrix is its embedding matrix (config key, else: no lm_head stored)."""
    return bool(base.config.get("tie_word_embeddings", "lm_head.weight" not in base.tensors))


def _check_replacement(target: str, tensor: torch.Tensor, base: HFModel, key: str, where: Path) -> None:
    refs = base.tensors
    if target in refs:
        shape = refs[target].shape
    elif target == "lm_head.weight" and is_tied(base) and "model.embed_tokens.weight" in refs:
        shape = refs["model.embed_tokens.weight"].shape   # an untied copy of a tied output matrix
    else:
        raise InputError(f"adapter tensor {key!r} matches no tensor of the base ({target!r})", where)
    if tuple(tensor.shape) != tuple(shape):
        raise InputError(f"adapter tensor {key!r} has shape {list(tensor.shape)}, base tensor {target!r} "
                         f"has {list(shape)}", where)
    if not tensor.is_floating_point():
        raise InputError(f"adapter tensor {key!r} has dtype {tensor.dtype}", where)


def _fused_experts(module: str, base: HFModel) -> str | None:
    """The fused experts tensor ([experts, rows, cols], transformers 5's layout) of the base that a
    LoRA module falls on: the experts module itself (peft's target_parameters), or one expert's linear
    (experts.N.gate_proj) of a base that holds them fused."""
    stem = re.sub(r"\.experts\.\d+\..*$", ".experts", module)
    fused = sorted(n for n, r in base.tensors.items() if n.startswith(stem + ".") and len(r.shape) == 3)
    linear = module.rsplit(".", 1)[-1].removesuffix("_proj")       # gate_proj's rows are in gate_up_proj
    return next((n for n in fused if linear in n.rsplit(".", 1)[-1]), fused[0] if fused else None)


def _scaling(config: dict, key: str, r: int, weight: float, where: Path, what: str = "module") -> float:
    """peft's scaling of the LoRA on `key` (a module, or a parameter for target_parameters), whose
    tensors have rank r: r and alpha through rank_pattern / alpha_pattern, times the user's weight."""
    r_cfg = (config.get("rank_pattern") or {}).get(pattern_key((config.get("rank_pattern") or {}).keys(), key),
                                                   config.get("r", DEFAULT_R))
    if r_cfg != r:
        raise InputError(f"{what} {key!r} has rank {r}, adapter_config.json says {r_cfg}", where)
    alpha = (config.get("alpha_pattern") or {}).get(pattern_key((config.get("alpha_pattern") or {}).keys(), key),
                                                    config.get("lora_alpha", DEFAULT_ALPHA))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    if weight != 1.0:
        scaling *= weight          # as peft's scale_layer(weight)
    return scaling


def _make_term(module: str, p: dict[str, torch.Tensor], config: dict, base: HFModel, weight: float,
               where: Path, target: str | None = None) -> LoraTerm:
    target = target or f"{module}.weight"
    embedding = "emb_A" in p or "emb_B" in p
    A, B = (p.get("emb_A"), p.get("emb_B")) if embedding else (p.get("lora_A"), p.get("lora_B"))
    if A is None or B is None:
        raise InputError(f"module {module!r} has lora_{'A' if A is None else 'B'} missing", where)
    if target == "lm_head.weight" and is_tied(base):
        raise UnsupportedError("the adapter has LoRA on lm_head of a model with tied embeddings; "
                               "peft would change the embeddings with it. Untie the model first", where)
    if target not in base.tensors:
        fused = _fused_experts(module, base)
        if fused is not None:
            raise UnsupportedError(f"adapter module {module!r}: LoRA on experts the base holds fused in one tensor "
                                   f"({fused!r}) is not supported yet", where)
        raise InputError(f"adapter module {module!r} matches no tensor of the base ({target!r})", where)
    by_param = not _targets_allow(config, module) and _params_allow(config, f"{module}.weight")  # 2-D target_parameters
    if not _targets_allow(config, module) and not by_param:
        raise InputError(f"adapter module {module!r} is not among target_modules {config.get('target_modules')}", where)
    r = A.shape[0]
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r:
        raise InputError(f"module {module!r}: lora_A {list(A.shape)} and lora_B {list(B.shape)} do not form a "
                         "low-rank pair", where)
    # peft resolves rank_pattern / alpha_pattern on the parameter's name for target_parameters
    scaling = _scaling(config, f"{module}.weight" if by_param else module, r, weight, where,
                       "parameter" if by_param else "module")
    conv1d = base.config.get("model_type") in CONV1D_MODEL_TYPES
    term = LoraTerm(module, A.float(), B.float(), scaling, transposed=embedding or conv1d)
    shape = tuple(base.tensors[target].shape)
    if term.delta_shape() != shape:
        raise InputError(f"module {module!r}: lora_A {list(A.shape)} @ lora_B {list(B.shape)} gives "
                         f"{list(term.delta_shape())}, base tensor {target!r} has {list(shape)}", where)
    if "magnitude" in p:
        mag = p["magnitude"].float().reshape(-1)
        if term.transposed:
            raise UnsupportedError(f"module {module!r}: DoRA on embedding or fan_in_fan_out layers is not supported",
                                   where)
        if mag.shape[0] != shape[0]:
            raise InputError(f"module {module!r}: DoRA magnitude of shape {list(p['magnitude'].shape)} does not fit "
                             f"{target!r} {list(shape)}", where)
        term.magnitude = mag
    elif config.get("use_dora") and not embedding:
        raise InputError(f"module {module!r}: use_dora is set but lora_magnitude_vector is missing", where)
    return term


# -- MoE experts ------------------------------------------------------------------------------------

def _expert_names(base: HFModel):
    from .families import BY_HF_NAME
    fam = BY_HF_NAME.get((base.config.get("architectures") or [None])[0])
    return fam.experts_layout if fam is not None else None


def _expert_module(module: str, layout) -> re.Match | None:
    """`<layer>.mlp.experts[.base_layer...]` (target_parameters) or `<layer>.<one expert>.<linear>`."""
    linears = "|".join(re.escape(n) for parts in layout.fused.values() for n in parts)
    one = re.escape(layout.expert).replace(re.escape("{e}"), r"(?P<e>\d+)")
    return (re.fullmatch(rf"(?P<layer>.+\.){re.escape(layout.module)}(?P<wrap>(?:\.base_layer)*)", module)
            or re.fullmatch(rf"(?P<layer>.+\.){one}\.(?P<linear>{linears})", module))


def _renamed_router(target: str, base: HFModel, router: tuple[str, str]) -> str:
    """The base's name of a router that transformers 5 renamed (Mixtral's block_sparse_moe.gate is
    its mlp.gate): adapters made on either name merge into either layout. A router it did not rename
    (both names the same) keeps its name."""
    for a, b in (router, router[::-1]):
        renamed = re.sub(rf"\.{re.escape(a)}\.weight$", f".{b}.weight", target)
        if renamed != target and renamed in base.tensors:
            return renamed
    return target


def _fused_tensor(base: HFModel, layer: str, layout, param: str) -> str | None:
    """The base's fused tensor of `param` in this layer (transformers writes no `.weight` suffix; the
    converter reads both), or None where the base holds the layer's experts one tensor per expert."""
    name = f"{layer}{layout.module}.{param}"
    return next((n for n in (name, name + ".weight") if n in base.tensors and len(base.tensors[n].shape) == 3), None)


def _per_expert_tensor(layer: str, layout, e: int, linear: str) -> str:
    return f"{layer}{layout.expert.format(e=e)}.{linear}.weight"


def _place_expert_lora(adapter: Adapter, module: str, p: dict[str, torch.Tensor], base: HFModel, layout,
                       where: Path) -> None:
    """Map a LoRA pair on experts onto the base: its fused tensors (expert_terms, by rows) or its
    tensors per expert (terms)."""
    m = _expert_module(module, layout)
    config, weight = adapter.config, adapter.weight
    A, B = p.get("lora_A"), p.get("lora_B")
    if A is None or B is None or set(p) - {"lora_A", "lora_B"}:
        what = f"lora_{'A' if A is None else 'B'} missing" if A is None or B is None else "DoRA or an embedding LoRA"
        raise (InputError if A is None or B is None else UnsupportedError)(
            f"adapter module {module!r} on MoE experts: {what}" + ("" if A is None or B is None else
                                                                   " is not supported there (plain LoRA only)"), where)
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise InputError(f"module {module!r}: lora_A {list(A.shape)} and lora_B {list(B.shape)} do not form a "
                         "low-rank pair", where)
    A, B = A.float(), B.float()
    layer = m.group("layer")
    n_expert = int(base.config.get("num_local_experts") or base.config.get("num_experts") or 0)

    def fused_shape(param: str) -> tuple[int, int] | None:
        """One expert's [rows, cols] of `param`, from the fused tensor or the per-expert ones."""
        fused = _fused_tensor(base, layer, layout, param)
        if fused is not None:
            return tuple(base.tensors[fused].shape[1:])
        names = [_per_expert_tensor(layer, layout, 0, lin) for lin in layout.fused[param]]
        if not all(n in base.tensors for n in names):
            return None
        return sum(base.tensors[n].shape[0] for n in names), base.tensors[names[0]].shape[1]

    def add_piece(param: str, e: int, row: int, term: LoraTerm, linear_rows: tuple[str, int] | None) -> None:
        fused = _fused_tensor(base, layer, layout, param)
        if fused is not None:
            adapter.expert_terms.setdefault(fused, {}).setdefault(e, []).append((row, term))
            return
        name = _per_expert_tensor(layer, layout, e, linear_rows[0])
        if name in adapter.terms:
            raise InputError(f"adapter module {module!r} updates {name!r}, which another module of it updates too", where)
        adapter.terms[name] = term

    if m.groupdict().get("wrap") is not None:
        # peft's ParamWrapper: which parameter the pair adapts, by its shape (gate_up_proj's and
        # down_proj's [rows, cols] never agree: that would need 2 x ffn = hidden = ffn)
        fits = [q for q in layout.fused if (shape := fused_shape(q)) is not None
                and (B.shape[0], A.shape[1]) == shape and _params_allow(config, f"{layer}{layout.module}.{q}")]
        if not fits:
            raise InputError(f"adapter module {module!r}: lora_A {list(A.shape)} @ lora_B {list(B.shape)} fits none of "
                             f"the experts' parameters {sorted(layout.fused)} that target_parameters "
                             f"{config.get('target_parameters')} names in the base", where)
        param = fits[0]
        if n_expert <= 0 or A.shape[0] % n_expert:
            raise InputError(f"adapter module {module!r}: lora_A has {A.shape[0]} rows, not a multiple of the "
                             f"{n_expert} experts of config.json", where)
        r = A.shape[0] // n_expert
        scaling = _scaling(config, f"{layer}{layout.module}.{param}", r, weight, where, "parameter")
        parts = layout.fused[param]
        rows = fused_shape(param)[0] // len(parts)
        for e in range(n_expert):
            A_e, B_e = A[e * r:(e + 1) * r].contiguous(), B[:, e::n_expert]
            if _fused_tensor(base, layer, layout, param) is not None:
                add_piece(param, e, 0, LoraTerm(f"{module}[{e}]", A_e, B_e.contiguous(), scaling, False), None)
            else:
                for j, lin in enumerate(parts):
                    piece = LoraTerm(f"{module}[{e}]", A_e, B_e[j * rows:(j + 1) * rows].contiguous(), scaling, False)
                    add_piece(param, e, 0, piece, (lin, j))
        return

    # one expert's linear, on a base that holds the layer's experts fused
    e, linear = int(m.group("e")), m.group("linear")
    param, j = next((q, parts.index(linear)) for q, parts in layout.fused.items() if linear in parts)
    fused = _fused_tensor(base, layer, layout, param)
    if fused is None:
        raise InputError(f"adapter module {module!r} matches no tensor of the base "
                         f"({_per_expert_tensor(layer, layout, e, linear)!r})", where)
    if not _targets_allow(config, module):
        raise InputError(f"adapter module {module!r} is not among target_modules {config.get('target_modules')}", where)
    n, rows, cols = base.tensors[fused].shape
    rows //= len(layout.fused[param])
    if e >= n or (B.shape[0], A.shape[1]) != (rows, cols):
        raise InputError(f"module {module!r}: lora_A {list(A.shape)} @ lora_B {list(B.shape)} does not fit expert {e} "
                         f"of {fused!r} {list(base.tensors[fused].shape)} ({rows} rows each of "
                         f"{', '.join(layout.fused[param])})", where)
    scaling = _scaling(config, module, A.shape[0], weight, where)
    add_piece(param, e, j * rows, LoraTerm(module, A, B, scaling, False), (linear, j))
