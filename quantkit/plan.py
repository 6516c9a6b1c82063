"""Per-tensor type plan for every requested variant, with the reason for each choice.

The mixtures (Q4_K_S/M, Q5_K_S/M, Q6_K, Q4_0 .. Q5_1, IQ4_NL and IQ4_XS) follow llama.cpp's `llama-quant.cpp`
(llama_tensor_get_type) for dense Llama / Qwen3 models, written as ordered tables of (rule name, predicate, type): the first
rule that matches picks the type, else the variant's default; then the shape fallback of
`tensor_type_fallback` applies (a K-quant or IQ4_XS needs rows divisible by 256).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from math import prod
from typing import Callable

import gguf

from quantkit.kernels import registry as qreg

from .families import HParams, SourceTensor
from .errors import UnsupportedError


def category(gguf_name: str) -> str:
    # llama-quant.cpp's tensor_get_category, for the tensors of dense models
    if gguf_name == "output.weight":
        return "output"
    if gguf_name == "token_embd.weight":
        return "token_embd"
    if "attn_qkv.weight" in gguf_name:
        # a fused q/k/v (Phi-3) takes attn_v's rules: llama-quant.cpp's category_is_attn_v (its own
        # ATTENTION_QKV branch comes after that one and is never reached)
        return "attn_v"
    for cat in ("attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_output.weight",
                "ffn_up", "ffn_gate", "ffn_down"):
        if cat in gguf_name:
            return cat.removesuffix(".weight")
    return "other"


@dataclass(frozen=True)
class TensorCtx:
    """What a rule may look at: the tensor, its category and its index among tensors of that category."""
    tensor: SourceTensor
    category: str
    index: int          # i-th tensor of this category in file order (llama.cpp's i_attention_wv, i_ffn_down)
    count: int          # how many of this category (n_attention_wv; n_layer for ffn)
    hp: HParams
    default: str        # the variant's default type
    imatrix: bool       # whether an importance matrix is given

    @property
    def ncols(self) -> int:
        return self.tensor.shape[-1]


def use_more_bits(i: int, n: int) -> bool:
    # llama.cpp: the first and last eighth of the layers, and every third layer in between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _output_like(c: TensorCtx) -> bool:
    # tied models quantize token_embd as if it were the output tensor
    return c.category == "output" or (c.category == "token_embd" and c.hp.tied)


Rule = tuple[str, Callable[[TensorCtx], bool], str]

OUTPUT_RULES: list[Rule] = [
    ("output: rows not divisible by the block size", lambda c: _output_like(c) and c.ncols % qreg.get(c.default).block_size != 0, "q8_0"),
    ("output: Q6_K unless the file is Q8_0", lambda c: _output_like(c) and c.default != "q8_0", "q6_k"),
]
# llama.cpp's LLM_TYPE_70B for Llama is the 80-layer model; its attn_v is 8x smaller than attn_q
ATTN_V_70B: Rule = ("attn_v: 70B model", lambda c: c.category == "attn_v" and c.hp.n_layer == 80 and c.default == "q4_k", "q5_k")
K_M_RULES: list[Rule] = OUTPUT_RULES + [
    ("attn_v: first/last eighth or every third layer", lambda c: c.category == "attn_v" and use_more_bits(c.index, c.count), "q6_k"),
    ATTN_V_70B,
    ("ffn_down: first/last eighth or every third layer", lambda c: c.category == "ffn_down" and use_more_bits(c.index, c.count), "q6_k"),
]
Q4_K_S_RULES: list[Rule] = OUTPUT_RULES + [
    ("attn_v: first four layers", lambda c: c.category == "attn_v" and c.index < 4, "q5_k"),
    ATTN_V_70B,
    ("ffn_down: first eighth of the layers", lambda c: c.category == "ffn_down" and c.index < c.count // 8, "q5_k"),
]

# IQ4_NL / IQ4_XS: Q5_K for attn_v when 4 or more query heads share a KV head, and for the first
# eighth of ffn_down when no imatrix is given
IQ4_RULES: list[Rule] = OUTPUT_RULES + [
    ("attn_v: 4+ query heads per KV head", lambda c: c.category == "attn_v" and c.hp.n_gqa >= 4, "q5_k"),
    ("ffn_down: first eighth of the layers, without an imatrix",
     lambda c: not c.imatrix and c.category == "ffn_down" and c.index < c.count // 8, "q5_k"),
]

# llama.cpp's rules for a model of exactly 8 experts (Mixtral), before every variant's own: attention
# v and k in Q8_0 ("trades just ~128MB"), attn_output in Q5_K for the Q4_K and IQ4 mixtures
EXPERT8_RULES: list[Rule] = [
    ("attn_v: 8-expert model", lambda c: c.category == "attn_v" and c.hp.n_expert == 8, "q8_0"),
    ("attn_k: 8-expert model", lambda c: c.category == "attn_k" and c.hp.n_expert == 8, "q8_0"),
    ("attn_output: 8-expert model, Q4_K or IQ4 mixture",
     lambda c: c.category == "attn_output" and c.hp.n_expert == 8 and c.default in ("q4_k", "iq4_nl", "iq4_xs"), "q5_k"),
]


# Q4_0 / Q5_0 with an importance matrix guard the first ffn_down layers with the _1 type
def _legacy_rules(guard: str) -> list[Rule]:
    return OUTPUT_RULES + [
        ("ffn_down: first eighth of the layers, with an imatrix",
         lambda c: c.imatrix and c.category == "ffn_down" and c.index < c.count // 8, guard)]


# llama.cpp's tensor_type_fallback: a type whose block does not divide the row falls back to a
# 32-block type of similar size, and to F16 when even that does not fit (a 32-block type, IQ4_NL
# included, goes to F16 directly).
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl"}


@dataclass(frozen=True)
class Variant:
    name: str                     # as the user types it: q4_k_m
    file_type: gguf.LlamaFileType
    default: str                  # registry name of the default tensor type
    rules: list[Rule] = field(default_factory=list)
    bpw: float = 16.0             # bits per weight of an 8B model's tensors (size estimates)
    quantized: bool = True        # False: the converter's float output (no mixture, no fallback)
    # `auto:`: the size it must fit (quantkit.mix.Target), and once measured the type of every
    # tensor the budget was spent on (GGUF name -> Choice)
    target: object = None
    assigned: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def label(self) -> str:
        return self.name.upper()


# bpw: the plan's tensor bytes * 8 / values for Llama-3.1-8B's shapes (Qwen3-8B's are within 0.02)
VARIANTS = {v.name: v for v in (
    Variant("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0, "q8_0", OUTPUT_RULES, bpw=8.5),
    Variant("q6_k", gguf.LlamaFileType.MOSTLY_Q6_K, "q6_k", OUTPUT_RULES, bpw=6.56),
    Variant("q5_k_m", gguf.LlamaFileType.MOSTLY_Q5_K_M, "q5_k", K_M_RULES, bpw=5.7),
    Variant("q5_k_s", gguf.LlamaFileType.MOSTLY_Q5_K_S, "q5_k", OUTPUT_RULES, bpw=5.57),
    Variant("q4_k_m", gguf.LlamaFileType.MOSTLY_Q4_K_M, "q4_k", K_M_RULES, bpw=4.89),
    Variant("q4_k_s", gguf.LlamaFileType.MOSTLY_Q4_K_S, "q4_k", Q4_K_S_RULES, bpw=4.67),
    Variant("q5_1", gguf.LlamaFileType.MOSTLY_Q5_1, "q5_1", OUTPUT_RULES, bpw=6.04),
    Variant("q5_0", gguf.LlamaFileType.MOSTLY_Q5_0, "q5_0", _legacy_rules("q5_1"), bpw=5.57),
    Variant("q4_1", gguf.LlamaFileType.MOSTLY_Q4_1, "q4_1", OUTPUT_RULES, bpw=5.1),
    Variant("q4_0", gguf.LlamaFileType.MOSTLY_Q4_0, "q4_0", _legacy_rules("q4_1"), bpw=4.64),
    Variant("iq4_nl", gguf.LlamaFileType.MOSTLY_IQ4_NL, "iq4_nl", IQ4_RULES, bpw=4.68),
    Variant("iq4_xs", gguf.LlamaFileType.MOSTLY_IQ4_XS, "iq4_xs", IQ4_RULES, bpw=4.46),
    Variant("bf16", gguf.LlamaFileType.MOSTLY_BF16, "bf16", quantized=False),
    Variant("f16", gguf.LlamaFileType.MOSTLY_F16, "f16", quantized=False),
)}


def parse_variants(spec: str) -> list[Variant]:
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in VARIANTS and not n.startswith("auto")]
    if unknown or not names:
        raise UnsupportedError(f"unknown GGUF type {', '.join(unknown) or spec!r} (choose from {', '.join(VARIANTS)}, "
                               "or auto:q4_k_m / auto:4.8 for a measured mix of that size)")
    return [auto_variant(n) if n.startswith("auto") else VARIANTS[n] for n in dict.fromkeys(names)]


def auto_variant(spec: str) -> Variant:
    """`auto:q4_k_m` (no larger than that file) or `auto:4.8` (bits per weight): a mix measured on the
    model (quantkit.mix). Its file type is the named one's, or that of the largest type whose 8B size
    fits the bits per weight; until measured it plans as that type."""
    from .mix import parse_target
    target = parse_target(spec, VARIANTS)
    if target.variant:
        ref = VARIANTS[target.variant]
    else:
        fits = [v for v in VARIANTS.values() if v.quantized and v.bpw <= target.bpw]
        ref = max(fits, key=lambda v: v.bpw) if fits else VARIANTS["q4_0"]
    return Variant(target.name, ref.file_type, ref.default, ref.rules, bpw=target.bpw or ref.bpw, target=target)


@dataclass(frozen=True)
class Overrides:
    """llama-quantize's per-tensor choices, for the quantized types: `--tensor-type REGEX=TYPE` (searched
    in the tensor's name, in the order given, the first match wins), `--output-tensor-type`,
    `--token-embedding-type` (these two win over a pattern) and `--pure` (no mixture rules: every
    tensor not named by an override gets the file's type). A tensor an override or --pure decides
    is not counted in the layer indices the mixture rules use, as in llama-quant.cpp."""
    tensor_types: tuple[tuple[str, str], ...] = ()
    output: str = ""
    token_embd: str = ""
    pure: bool = False

    @classmethod
    def parse(cls, tensor_types=(), output: str = "", token_embd: str = "", pure: bool = False) -> Overrides:
        """From "REGEX=TYPE" strings and type names; an UnsupportedError naming the bad one."""
        pairs = []
        for spec in tensor_types:
            pattern, sep, qtype = str(spec).rpartition("=")
            if not sep or not pattern:
                raise UnsupportedError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. attn_v=q8_0")
            try:
                re.compile(pattern)
            except re.error as e:
                raise UnsupportedError(f"--tensor-type {spec!r}: not a regular expression ({e})") from None
            pairs.append((pattern, _type_name(qtype.strip(), f"--tensor-type {spec!r}")))
        return cls(tuple(pairs), _type_name(output, "--output-tensor-type") if output else "",
                   _type_name(token_embd, "--token-embedding-type") if token_embd else "", bool(pure))

    def __bool__(self) -> bool:
        return bool(self.tensor_types or self.output or self.token_embd or self.pure)

    def manual(self, gguf_name: str) -> tuple[str, str] | None:
        return next(((p, t) for p, t in self.tensor_types if re.search(p, gguf_name)), None)


def _type_name(name: str, what: str) -> str:
    name = name.strip().lower()
    if name not in qreg.QUANT_TYPES:
        raise UnsupportedError(f"{what}: unknown type {name!r} (choose from {', '.join(qreg.QUANT_TYPES)})")
    return name


@dataclass(frozen=True)
class Choice:
    qtype: str
    reason: str


@dataclass(frozen=True)
class TensorPlan:
    tensor: SourceTensor
    choices: dict[str, Choice]    # variant name → type and reason


def _choose(v: Variant, c: TensorCtx, ov: Overrides) -> Choice:
    t = c.tensor
    # 1-D tensors (norms, rope factors) stay F32 in every file, as the converter writes them
    if len(t.shape) < 2 or t.gguf_name.endswith("_norm.weight"):
        return Choice("f32", "1-D / norm: kept in F32")
    if t.gguf_name.endswith("ffn_gate_inp.weight"):
        # the converter writes a MoE router in F32 and llama-quantize never quantizes it
        return Choice("f32", "MoE router: kept in F32")
    if not v.quantized:
        # the converter writes the shared expert's gate, [1, n_embd], in F32 too
        if t.gguf_name.endswith("ffn_gate_inp_shexp.weight"):
            return Choice("f32", "MoE router: kept in F32")
        return Choice(v.default, "weight matrix")
    if prod(t.shape[:-1]) == 1:
        # one row is one dimension to ggml (ggml_n_dims): llama-quantize keeps such a tensor as it is
        return Choice("f32", "one row: kept in F32")
    if t.gguf_name in v.assigned:
        return v.assigned[t.gguf_name]
    # llama-quant.cpp's llama_tensor_get_type: the two named tensors' types, then the patterns, then
    # the mixture (unless --pure), then the shape fallback (not for the named tensors)
    if ov.token_embd and c.category == "token_embd":
        return _fits(Choice(ov.token_embd, "override: --token-embedding-type"), c)
    if ov.output and c.category == "output":
        return _fits(Choice(ov.output, "override: --output-tensor-type"), c)
    qtype, reason = v.default, "default type"
    manual = ov.manual(t.gguf_name)
    if manual:
        return _fits(Choice(manual[1], f"override: --tensor-type {manual[0]}"), c)
    for name, pred, rtype in ([] if ov.pure else EXPERT8_RULES + v.rules):
        if pred(c):
            qtype, reason = rtype, name
            break
    if ov.pure:
        reason = "--pure"
    if c.ncols % qreg.get(qtype).block_size != 0:
        fb = FALLBACK.get(qtype, qtype)
        if c.ncols % qreg.get(fb).block_size != 0:
            fb = "f16"
        reason += f"; {c.ncols} columns not divisible by {qreg.get(qtype).block_size}: {qtype} -> {fb}"
        qtype = fb
    return Choice(qtype, reason)


def _fits(choice: Choice, c: TensorCtx) -> Choice:
    # llama.cpp would fall back silently (or, for the two named tensors, write a broken file): refuse
    block = qreg.get(choice.qtype).block_size
    if c.ncols % block:
        raise UnsupportedError(f"{choice.reason.removeprefix('override: ')}: {choice.qtype} needs rows divisible "
                               f"by {block}; {c.tensor.gguf_name} has {c.ncols} columns")
    return choice


def make_plan(tensors: list[SourceTensor], hp: HParams, variants: list[Variant], *,
              imatrix: bool = False, overrides: Overrides = Overrides()) -> list[TensorPlan]:
    cats = [category(t.gguf_name) for t in tensors]
    counts = {"attn_v": cats.count("attn_v"), "ffn_down": hp.n_layer, "ffn_gate": hp.n_layer, "ffn_up": hp.n_layer}
    seen: dict[str, int] = {}
    matched: set[str] = set()
    plans = []
    for t, cat in zip(tensors, cats):
        manual = overrides.manual(t.gguf_name) if len(t.shape) > 1 else None
        if manual:
            matched.add(manual[0])
        idx = seen.get(cat, 0)
        if not (manual or overrides.pure):     # llama-quant.cpp counts a tensor when its mixture rules run
            seen[cat] = idx + 1
        if hp.n_expert > 1 and cat in ("ffn_down", "ffn_gate", "ffn_up"):
            idx = t.layer                       # llama-quant.cpp's layer_info: a MoE's layer, from the name
        choices = {}
        for v in variants:
            ctx = TensorCtx(t, cat, idx, counts.get(cat, 0), hp, v.default, imatrix)
            choices[v.name] = _choose(v, ctx, overrides)
        plans.append(TensorPlan(t, choices))
    unmatched = [p for p, _ in overrides.tensor_types if p not in matched]
    if unmatched:
        raise UnsupportedError(f"--tensor-type {unmatched[0]!r} matches no weight matrix of this model "
                               f"(names look like {tensors[len(tensors) // 2].gguf_name})")
    return plans


def variant_nbytes(plans: list[TensorPlan], v: Variant) -> int:
    """The bytes of tensor data in the variant's file (the header and vocabulary come on top)."""
    return sum(prod(p.tensor.shape[:-1]) * qreg.row_nbytes(qreg.get(p.choices[v.name].qtype), p.tensor.shape[-1])
               for p in plans)


def format_plan(plans: list[TensorPlan], variants: list[Variant]) -> str:
    w = max(len(p.tensor.gguf_name) for p in plans)
    cw = [max(8, len(v.label)) for v in variants]
    head = f"{'tensor':<{w}}  {'shape':<14}" + "".join(f"  {v.label:<{c}}" for v, c in zip(variants, cw))
    lines = [head, "-" * len(head)]
    quiet = ("default type", "weight matrix", "1-D / norm: kept in F32", "MoE router: kept in F32", "one row: kept in F32")
    for p in plans:
        shape = "x".join(str(d) for d in reversed(p.tensor.shape))
        row = f"{p.tensor.gguf_name:<{w}}  {shape:<14}" + "".join(
            f"  {p.choices[v.name].qtype.upper():<{c}}" for v, c in zip(variants, cw))
        reasons = {p.choices[v.name].reason for v in variants if p.choices[v.name].reason not in quiet}
        lines.append(row + ("   # " + "; ".join(sorted(reasons)) if reasons else ""))
    lines.append("-" * len(head))
    lines.append(f"{'tensor data, MB':<{w}}  {'':<14}" + "".join(
        f"  {variant_nbytes(plans, v) / 1e6:<{c},.0f}" for v, c in zip(variants, cw)))
    return "\n".join(lines)
