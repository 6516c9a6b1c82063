"""What every model family shares: hyper-parameters read from config.json, the tensor template a
family fills in, and the hooks a family may override. A family module (llama.py, qwen.py) says the
rest as data: its HF architecture names, GGUF architecture, per-layer tensors, the transforms on the
way to GGUF, the GGUF keys it writes, its tokenizers, its GPTQ layer groups and where its decoder
layers live in a transformers model. Everything that walks a model (shapes, plans, synthetic
checkpoints, GPTQ, imatrix, the tests' family list) reads it from here instead of knowing the family.

Tensor names on the GGUF side come from gguf-py's TensorNameMap (the table convert_hf_to_gguf.py uses),
so a name llama.cpp expects is never spelled here by hand.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import gguf
import torch

from ..errors import InputError, UnsupportedError
from ..hfmodel import HFModel

# Tensors HF checkpoints carry that GGUF drops.
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")

Shape = tuple[int, ...]
KV = tuple[str, Any, gguf.GGUFValueType]


@dataclass(frozen=True)
class HParams:
    """The numbers of config.json that shape the tensors and the GGUF metadata."""
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope: dict            # rope scaling parameters ({} when none)
    tied: bool
    head_dim_given: bool = False    # config.json names head_dim (else it is hidden_size / heads)
    # config.json as the family's converter reads it (Family.complete_config): for keys of its own
    config: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    @property
    def n_expert(self) -> int:
        """Experts per MoE layer (0 for a dense model)."""
        return int(self.config.get("num_local_experts") or self.config.get("num_experts") or 0)

    @property
    def rope_type(self) -> str:
        return str(self.rope.get("rope_type", self.rope.get("type", ""))).lower()


def hparams_from_config(c: dict, path: Path | None = None) -> HParams:
    """HParams of a config.json dict (completed by its family, when config.json names one); an
    InputError naming `path` for a missing or mistyped value."""
    arch = (c.get("architectures") or [None])[0]
    if arch in BY_HF_NAME:
        c = BY_HF_NAME[arch].complete_config(c, path)
    def typed(key: str, value: Any, kind: type) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int,) if kind is int else (int, float)) or not value > 0:
            raise InputError(f"{key!r} must be a positive {'integer' if kind is int else 'number'}, not {value!r}", path)
        return value

    def need(key: str, kind: type = int) -> Any:
        if key not in c:
            raise InputError(f"missing {key!r}", path)
        return typed(key, c[key], kind)

    def optional(key: str, kind: type = int) -> Any:
        return None if c.get(key) is None else typed(key, c[key], kind)

    # transformers ≥ 5 writes `rope_parameters` (with rope_theta inside); 4.x `rope_scaling` + `rope_theta`
    rope_key = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    rope = c.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise InputError(f"{rope_key!r} must be an object, not {rope!r}", path)
    rope = dict(rope)
    theta = rope.pop("rope_theta", None) or c.get("rope_theta", 10000.0)
    theta = typed("rope_theta", theta, float)
    if rope.get("rope_type", rope.get("type")) in (None, "default"):
        rope = {}
    n_head = need("num_attention_heads")
    return HParams(
        n_layer=need("num_hidden_layers"), n_embd=need("hidden_size"), n_ff=need("intermediate_size"),
        n_head=n_head, n_head_kv=optional("num_key_value_heads") or n_head,
        head_dim=optional("head_dim") or need("hidden_size") // n_head,
        n_vocab=need("vocab_size"), n_ctx=need("max_position_embeddings"),
        rms_eps=need("rms_norm_eps", float), rope_theta=float(theta), rope=rope,
        tied=bool(c.get("tie_word_embeddings", False)), head_dim_given=c.get("head_dim") is not None, config=c,
    )


@dataclass(frozen=True)
class SourceTensor:
    """One GGUF tensor and how to produce it from the HF checkpoint (one read, one transform)."""
    gguf_name: str
    hf_name: str | None                 # None for generated tensors (rope_freqs)
    shape: Shape                        # HF/torch order (rows, cols)
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None   # applied to whole row chunks
    generate: Callable[[], torch.Tensor] | None = None
    row_granule: int = 1                # row chunks must be multiples of this (whole heads for q/k)
    # a stack of checkpoint tensors along a new first axis (MoE experts): their names, in order;
    # shape is then (len(parts), *part shape) and rows are counted along that first axis
    parts: tuple[str, ...] = ()
    # a stack read from one fused checkpoint tensor (hf_name) [n_expert, rows, cols]: the rows
    # [start, stop) of each expert it takes (gate_up_proj's gate half, its up half, or all of down_proj)
    fused: tuple[int, int] | None = None

    @property
    def stacked(self) -> bool:
        """A stack of experts (one matrix per expert along the first axis)."""
        return bool(self.parts) or self.fused is not None

    @property
    def layer(self) -> int:
        parts = self.gguf_name.split(".")
        return int(parts[1]) if parts[0] == "blk" else -1


@dataclass(frozen=True)
class TestFixture:
    """What the tests need to check a family against llama.cpp: the real tokenizer in
    tests/fixtures/tokenizers/<tokenizer>, llama.cpp's tokenizer test vectors for it (None where
    llama.cpp has none for that vocabulary), and whether the tiny checkpoint ties its embeddings."""
    tokenizer: str
    vectors: str | None
    tied: bool


BPE, SPM = "byte-level BPE", "SentencePiece"

# A decoder layer's linears as most families name them, grouped in the order data flows through them
# (the GPTQ groups: q/k/v read the same normed input, gate/up likewise).
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# The real 8B configs shrunk for tests: widths stay multiples of 256 so the K-quant path runs.
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 8}


@dataclass(frozen=True)
class Experts:
    """A MoE layer's experts, as GPTQ (quantkit.gptq) and the LoRA merge (quantkit.adapters) name them.
    transformers 5 holds them in one module (`module`: gate_up_proj [n, 2 x ffn, hidden], each expert's
    gate rows then its up rows; down_proj [n, hidden, ffn]), whose fused parameters peft's
    target_parameters adapt; the original checkpoints (and adapters trained on them, and the GPTQ
    checkpoints, as transformers 5's compressed-tensors and vLLM's MoE loaders read them) hold one
    Linear per expert and projection: `expert.format(e=...)` + one of `linears`. GPTQ leaves the router
    and the modules in `keep` unquantized (as gptqmodel does); `router` names the router in the
    transformers 5 model and in the checkpoint, which differ where transformers 5 renamed it (Mixtral's
    block_sparse_moe.gate is its mlp.gate)."""
    module: str                             # relative to the layer: "mlp.experts"
    expert: str                             # relative to the layer, {e} the expert: "mlp.experts.{e}"
    linears: tuple[str, str, str]           # one expert's linears: gate, up, down
    router: tuple[str, str] = ("mlp.gate", "mlp.gate")      # (in the transformers 5 model, in the checkpoint)
    keep: tuple[str, ...] = ("gate",)
    shared: tuple[str, ...] = ()        # a shared expert's Linears (gate, up, down), quantized as a dense MLP

    @property
    def fused(self) -> dict[str, tuple[str, ...]]:
        """transformers 5's fused parameters: the per-expert linears whose rows each stacks, in order."""
        gate, up, down = self.linears
        return {"gate_up_proj": (gate, up), "down_proj": (down,)}


class Family:
    """A model family. Subclasses set the data below and override a hook only where data can't say it."""
    name: ClassVar[str]                         # short name: llama, qwen3
    hf_names: ClassVar[tuple[str, ...]]         # config.json "architectures" it serves
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    # the tokenizer kinds of its checkpoints (quantkit.tokenizer reads each), and the llama.cpp
    # pre-tokenizer names seen for its byte-level BPE ones
    tokenizers: ClassVar[tuple[str, ...]] = (BPE,)
    pre_tokenizers: ClassVar[tuple[str, ...]] = ()
    rope_types: ClassVar[tuple[str, ...]] = ("", "linear", "yarn")
    # whether transformers' config class fills in head_dim when config.json leaves it out: the
    # converter reads the completed config and writes key_length / value_length only where it is set
    config_has_head_dim: ClassVar[bool] = True
    # RMSNorm weights are stored as (gain - norm_shift): Gemma's are gain - 1
    norm_shift: ClassVar[float] = 0.0
    # how the converter types a SentencePiece vocabulary's added tokens (quantkit.tokenizer.load_vocab)
    added_token_rules: ClassVar[str] = "converter"
    imatrix: ClassVar[bool] = True      # whether `quantkit imatrix` and --imatrix support it
    bnb_keep: ClassVar[tuple[str, ...]] = ()    # modules INT8 / NF4 leave unquantized besides lm_head
    # where the decoder layers, embeddings and rotary tables live in the transformers model; the layer
    # path is also the prefix of the layers' tensor names in the checkpoint
    decoder_layers: ClassVar[str] = "model.layers"
    embeddings: ClassVar[str] = "model.embed_tokens"
    rotary: ClassVar[str] = "model.rotary_emb"
    final_norm: ClassVar[str] = "model.norm"
    head: ClassVar[str] = "lm_head"
    gptq_groups: ClassVar[tuple[tuple[str, ...], ...]] = (ATTENTION[:3], ATTENTION[3:], MLP[:2], MLP[2:])
    # MoE: how the experts are named (GPTQ quantizes them after gptq_groups, the attention; LoRA merges)
    experts_layout: ClassVar[Experts | None] = None
    presets: ClassVar[dict[str, dict]] = {}     # synthetic checkpoints: published configs, and shrunk
    fixture: ClassVar[TestFixture | None] = None

    @property
    def sentencepiece_only(self) -> bool:
        return BPE not in self.tokenizers

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    # -- the tensor template -------------------------------------------------------------------
    def layer_tensors(self, hp: HParams) -> dict[str, Shape]:
        """One decoder layer's tensors (names relative to the layer) and shapes, in HF's order."""
        h, f, hd = hp.n_embd, hp.n_ff, hp.head_dim
        q, kv = hp.n_head * hd, hp.n_head_kv * hd
        return {"input_layernorm.weight": (h,),
                "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                "post_attention_layernorm.weight": (h,),
                "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}

    def tensor_shapes(self, hp: HParams, fused: frozenset[int] | set[int] = frozenset()) -> dict[str, Shape]:
        """Every HF tensor the checkpoint holds, with its shape, in the order HF writes them; the
        layers in `fused` with their experts fused (fused_experts) in place of one tensor per expert."""
        out = {f"{self.embeddings}.weight": (hp.n_vocab, hp.n_embd)}
        stacks = self.stacked_tensors(hp) if fused else {}
        for i in range(hp.n_layer):
            layer = {f"{self.layer_prefix(i)}{k}": s for k, s in self.layer_tensors(hp).items()}
            if i in fused:
                layer = self._fuse(hp, i, layer, stacks)
            out |= layer
        out[f"{self.final_norm}.weight"] = (hp.n_embd,)
        if not hp.tied:
            out[f"{self.head}.weight"] = (hp.n_vocab, hp.n_embd)
        return out

    def _fuse(self, hp: HParams, i: int, layer: dict[str, Shape], stacks: dict[str, tuple[str, ...]]) -> dict[str, Shape]:
        """A layer's tensors with its experts fused: the fused tensors where the first expert was."""
        pre, fused = self.layer_prefix(i), self.fused_experts(hp)
        per_expert = {p for fname, (_, feeds) in fused.items() for s in feeds for p in stacks[pre + s]}
        first = next(n for n in layer if n in per_expert)
        out: dict[str, Shape] = {}
        for n, s in layer.items():
            if n == first:
                out |= {pre + fname: shape for fname, (shape, _) in fused.items()}
            if n not in per_expert:
                out[n] = s
        return out

    def fused_layers(self, names, hp: HParams) -> set[int]:
        """The layers whose experts the checkpoint (its tensors by template name) holds fused."""
        fused = self.fused_experts(hp)
        return {i for i in range(hp.n_layer) if any(self.layer_prefix(i) + f in names for f in fused)}

    def layer_prefix(self, i: int) -> str:
        return f"{self.decoder_layers}.{i}."

    def linear_names(self, hp: HParams) -> list[str]:
        """The decoder layers' linears as module names (no .weight), layer by layer."""
        return [f"{self.layer_prefix(i)}{m}" for i in range(hp.n_layer) for g in self.gptq_groups for m in g]

    # -- hooks -----------------------------------------------------------------------------------
    def complete_config(self, c: dict, path: Path | None = None) -> dict:
        """config.json as the converter sees it: it reads transformers' config object, whose class
        fills in defaults (and, for multimodal checkpoints, holds the text model's config apart)."""
        return c

    def transform(self, hf_name: str, hp: HParams) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, int]:
        """What happens to a tensor on its way to GGUF, applied to float32 row chunks that are
        multiples of the returned granule: (None, 1) for most."""
        return None, 1

    def generated_tensors(self, hp: HParams) -> list[SourceTensor]:
        """Tensors GGUF has that the checkpoint does not (llama3 rope factors)."""
        return []

    def kv(self, hp: HParams, *names: str) -> list[KV]:
        """The named architecture keys (block_count, context_length, ... as below), with hp's values,
        in the order given: families whose converter writes its own order list theirs."""
        K, T = gguf.Keys, gguf.GGUFValueType
        table = {"block_count": (K.LLM.BLOCK_COUNT, hp.n_layer, T.UINT32),
                 "context_length": (K.LLM.CONTEXT_LENGTH, hp.n_ctx, T.UINT32),
                 "embedding_length": (K.LLM.EMBEDDING_LENGTH, hp.n_embd, T.UINT32),
                 "feed_forward_length": (K.LLM.FEED_FORWARD_LENGTH, hp.n_ff, T.UINT32),
                 "head_count": (K.Attention.HEAD_COUNT, hp.n_head, T.UINT32),
                 "head_count_kv": (K.Attention.HEAD_COUNT_KV, hp.n_head_kv, T.UINT32),
                 "rope_freq_base": (K.Rope.FREQ_BASE, hp.rope_theta, T.FLOAT32),
                 "rms_eps": (K.Attention.LAYERNORM_RMS_EPS, hp.rms_eps, T.FLOAT32),
                 "key_length": (K.Attention.KEY_LENGTH, hp.head_dim, T.UINT32),
                 "value_length": (K.Attention.VALUE_LENGTH, hp.head_dim, T.UINT32)}
        return [(table[n][0].format(arch=self.gguf_name), table[n][1], table[n][2]) for n in names]

    def with_expert_kv(self, hp: HParams, kv: list[KV]) -> list[KV]:
        """`kv` with TextModel's expert counts where it writes them: after the norm epsilon."""
        K, a, T = gguf.Keys, self.gguf_name, gguf.GGUFValueType
        i = next(j for j, (key, _, _) in enumerate(kv) if key == K.Attention.LAYERNORM_RMS_EPS.format(arch=a)) + 1
        return kv[:i] + [(K.LLM.EXPERT_COUNT.format(arch=a), hp.n_expert, T.UINT32),
                         (K.LLM.EXPERT_USED_COUNT.format(arch=a), hp.config["num_experts_per_tok"], T.UINT32)] + kv[i:]

    def hparam_kv(self, hp: HParams) -> list[KV]:
        """The architecture keys, in the order convert_hf_to_gguf.py writes them."""
        K, a, T = gguf.Keys, self.gguf_name, gguf.GGUFValueType
        kv = self.kv(hp, "block_count", "context_length", "embedding_length", "feed_forward_length", "head_count",
                     "head_count_kv")
        rtype = hp.rope_type
        if rtype not in self.rope_types:
            raise UnsupportedError(f"rope scaling type {rtype!r} is not supported for {self.name} "
                                   f"(supported: {', '.join(t for t in self.rope_types if t)})")
        if rtype == "linear" and hp.rope.get("factor") is not None:
            kv += [(K.Rope.SCALING_TYPE.format(arch=a), gguf.RopeScalingType.LINEAR.value, T.STRING),
                   (K.Rope.SCALING_FACTOR.format(arch=a), hp.rope["factor"], T.FLOAT32)]
        elif rtype == "yarn" and hp.rope.get("factor") is not None:
            kv += [(K.Rope.SCALING_TYPE.format(arch=a), gguf.RopeScalingType.YARN.value, T.STRING),
                   (K.Rope.SCALING_FACTOR.format(arch=a), hp.rope["factor"], T.FLOAT32),
                   (K.Rope.SCALING_ORIG_CTX_LEN.format(arch=a), hp.rope["original_max_position_embeddings"],
                    T.UINT32)]
        kv += self.kv(hp, "rope_freq_base", "rms_eps")
        if self.config_has_head_dim or hp.head_dim_given:
            kv += self.kv(hp, "key_length", "value_length")
        return kv

    def tokenizer_kv(self, tokenizer_config: dict) -> list[KV]:
        """Keys the family's converter writes from tokenizer_config.json before the vocabulary."""
        return []

    def tensor_kv(self, hp: HParams) -> list[KV]:
        """Keys the converter writes while it prepares the tensors, before any other metadata: they
        follow general.architecture (Phi-3's LongRoPE attention factor)."""
        return []

    def vocab_kv(self, vocab_model: str) -> list[KV]:
        """Keys the family's converter writes after the vocabulary (`vocab_model`: "llama" for a
        SentencePiece vocabulary, "gpt2" for a byte-level BPE one)."""
        return []

    # -- the GGUF tensor list ---------------------------------------------------------------------
    def source_tensors(self, model: HFModel, hp: HParams) -> list[SourceTensor]:
        """The GGUF tensors, in llama-quantize's order (non-layer tensors, then by layer; by name),
        after checking the checkpoint holds exactly the template's tensors with its shapes (and
        those skipped_tensors names); a layer whose experts the checkpoint holds fused is checked
        against the fused template (fused_experts), and its stacks read the fused tensors."""
        skipped = set(self.skipped_tensors(model))
        actual = self.checkpoint_names(model)        # template name → the checkpoint's
        refs = {name: model.tensors[a] for name, a in actual.items() if a not in skipped}
        fused = self.fused_layers(refs, hp)
        expected = self.tensor_shapes(hp, fused)
        for name, shape in expected.items():
            if name not in refs:
                raise InputError(f"missing tensor {name!r}", model.path)
            if refs[name].shape != shape:
                raise InputError(f"tensor {name!r} has shape {list(refs[name].shape)}, config.json implies "
                                 f"{list(shape)}", refs[name].shard)
            if refs[name].dtype not in ("BF16", "F16", "F32"):
                raise InputError(f"tensor {name!r} has dtype {refs[name].dtype}; expected BF16, F16 or F32",
                                 refs[name].shard)
        extra = [n for n in refs if n not in expected and not n.endswith(SKIPPED_SUFFIXES)
                 and not (hp.tied and n == f"{self.head}.weight")]
        if extra:
            raise UnsupportedError(f"{len(extra)} tensors that {model.architecture} does not have, e.g. "
                                   f"{extra[0]!r}", model.path)
        names = gguf.get_tensor_name_map(self.gguf_arch, hp.n_layer)
        out: list[SourceTensor] = []
        stacks = self.stacked_tensors(hp)
        from_fused = {pre + s: (pre + fname, rows) for pre in (self.layer_prefix(i) for i in fused)
                      for fname, (_, feeds) in self.fused_experts(hp).items() for s, rows in feeds.items()}
        for stacked, parts in stacks.items():
            gname = names.get_name(self.mapped_name(stacked), try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UnsupportedError(f"no GGUF name for tensor {stacked!r}", model.path)
            if stacked in from_fused:       # expert e's rows [start, stop) of the fused tensor
                fname, (start, stop) = from_fused[stacked]
                shape = expected[fname]
                out.append(SourceTensor(gname, actual[fname], (shape[0], stop - start, *shape[2:]), fused=(start, stop)))
                continue
            shape = (len(parts), *expected[parts[0]])
            out.append(SourceTensor(gname, actual[parts[0]], shape, parts=tuple(actual[p] for p in parts)))
        in_stacks = {p for parts in stacks.values() for p in parts} | {f for f, _ in from_fused.values()}
        for hf_name, shape in expected.items():
            if hf_name in in_stacks:
                continue
            gname = names.get_name(self.mapped_name(hf_name), try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UnsupportedError(f"no GGUF name for tensor {hf_name!r}", model.path)
            transform, granule = self.transform(hf_name, hp)
            out.append(SourceTensor(gname, actual[hf_name], shape, transform, row_granule=granule))
        out += self.generated_tensors(hp)
        return sorted(out, key=lambda t: (t.layer, t.gguf_name))

    def stacked_tensors(self, hp: HParams) -> dict[str, tuple[str, ...]]:
        """GGUF tensors that stack several checkpoint tensors (a layer's experts), by the template
        name the tensor map knows the stack by: {name: the stacked template names, in order}."""
        return {}

    def fused_experts(self, hp: HParams) -> dict[str, tuple[Shape, dict[str, tuple[int, int]]]]:
        """A layer's experts fused as transformers 5 holds them (and saves them with
        save_pretrained(save_original_format=False)), where llama.cpp's converter reads that layout:
        {fused tensor (relative to the layer): (its shape [n_expert, rows, cols], {each stack it
        feeds, by its stacked_tensors name relative to the layer: the rows [start, stop) of every
        expert})}. Empty where the converter reads one tensor per expert only."""
        return {}

    def checkpoint_names(self, model: HFModel) -> dict[str, str]:
        """The checkpoint's tensors by their template names (the names are the same for most)."""
        return {n: n for n in model.tensors}

    def skipped_tensors(self, model: HFModel) -> list[str]:
        """Checkpoint tensors the GGUF leaves out on purpose (a multimodal model's vision tower)."""
        return []

    def mapped_name(self, hf_name: str) -> str:
        """The name gguf-py's tensor map knows a template tensor by (the name, for most)."""
        return hf_name

    # -- a transformers model, walked layer by layer (GPTQ, imatrix) -------------------------------
    def module(self, model, path: str):
        return operator.attrgetter(path)(model)

    def layers(self, model):
        return self.module(model, self.decoder_layers)


# -- the registry ---------------------------------------------------------------------------------
FAMILIES: dict[str, Family] = {}        # family name → family
BY_HF_NAME: dict[str, Family] = {}      # config.json architecture → family


def register(cls: type[Family]) -> type[Family]:
    fam = cls()
    for hf in cls.hf_names:
        if hf in BY_HF_NAME:
            raise ValueError(f"{hf} is registered twice ({BY_HF_NAME[hf].name}, {fam.name})")
    FAMILIES[fam.name] = fam
    BY_HF_NAME.update({hf: fam for hf in cls.hf_names})
    return cls


def unregister(name: str) -> None:
    fam = FAMILIES.pop(name)
    for hf in fam.hf_names:
        BY_HF_NAME.pop(hf, None)


def family_for(architecture: str | None, path: Path | None = None, what: str = "") -> Family:
    if architecture not in BY_HF_NAME:
        raise UnsupportedError(f"architecture {architecture!r} is not supported{what} "
                               f"(supported: {', '.join(BY_HF_NAME)})", path)
    return BY_HF_NAME[architecture]


def family_of(model: HFModel, what: str = "") -> Family:
    """The family of a model directory, or an UnsupportedError naming its config.json."""
    return family_for(model.architecture, model.path / "config.json", what)


def hparams_of(model: HFModel) -> HParams:
    return hparams_from_config(model.config, model.path / "config.json")


def presets() -> dict[str, dict]:
    """Every family's synthetic-checkpoint configs by preset name (llama3-8b, qwen3-tiny, ...)."""
    return {name: cfg for fam in FAMILIES.values() for name, cfg in fam.presets.items()}
