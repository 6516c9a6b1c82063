"""The GGUF key/value metadata of one export, assembled once and shared by every output file.

`general.*` comes from gguf-py's Metadata heuristics (model card, config, generation_config), as
convert_hf_to_gguf.py does; then the architecture keys, then the tokenizer. Each output file gets
a copy with its own `general.file_type`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from math import prod
from pathlib import Path

import gguf

from quantkit.converters.gguf_file import KeyValues

from .families import Family, HParams, SourceTensor
from .hfmodel import HFModel
from .tokenizer import Vocab, add_vocab


@dataclass
class ModelMetadata:
    kv: dict[str, gguf.GGUFValue]      # without general.file_type
    name: str                          # file name stem, e.g. SmolLM2-135M-Instruct
    total_params: int

    def for_file_type(self, file_type: gguf.LlamaFileType, quantized: bool = False) -> dict[str, gguf.GGUFValue]:
        """The keys of one output file. A quantized file's order is llama-quantize's: it copies the
        converter's keys, then sets general.quantization_version and general.file_type, and
        setting a key in ggml's gguf removes it and appends it (gguf_set_val_*)."""
        kv = dict(self.kv)
        if quantized and gguf.Keys.General.QUANTIZATION_VERSION in kv:
            kv[gguf.Keys.General.QUANTIZATION_VERSION] = kv.pop(gguf.Keys.General.QUANTIZATION_VERSION)
        kv[gguf.Keys.General.FILE_TYPE] = gguf.GGUFValue(int(file_type), gguf.GGUFValueType.UINT32)
        return kv


def parameter_counts(tensors: list[SourceTensor]) -> tuple[int, int, int, int]:
    """(total, shared, per-expert, expert count) as gguf-py's writer counts them for the size label:
    a stacked expert tensor (`*_exps.*`) adds one expert's worth to the expert parameters."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for t in tensors:
        size = prod(t.shape)
        if "_exps." in t.gguf_name and len(t.shape) >= 3:
            expert += size // t.shape[0]
            expert_sum += t.shape[0]
            n_expert_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, (expert_sum // n_expert_tensors if n_expert_tensors else 0)


def build_metadata(model: HFModel, family: Family, hp: HParams, tensors: list[SourceTensor],
                   vocab: Vocab, name: str | None = None, name_from: Path | None = None) -> ModelMetadata:
    """`name_from`: the directory whose model card, config and folder name give general.name,
    basename, finetune and size (default: the model's own)."""
    total = sum(prod(t.shape) for t in tensors)
    # absolute (symlinks kept, as the converter sees them), so that `.` is named after the folder
    named = Path(os.path.abspath(name_from if name_from is not None else model.path))
    meta = gguf.Metadata.load(None, named, name, total)
    if meta.name is None:
        meta.name = named.name
    gen = model.optional_json("generation_config.json") or {}
    if meta.sampling_penalty_repeat is None and "repetition_penalty" in gen:
        # newer converters read transformers' name for it too
        meta.sampling_penalty_repeat = gen["repetition_penalty"]
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(*parameter_counts(tensors))

    w = KeyValues(family.gguf_name)
    for key, val, vtype in family.tensor_kv(hp):
        w.add_key_value(key, val, vtype)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    for key, val, vtype in family.hparam_kv(hp):
        w.add_key_value(key, val, vtype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok_cfg = model.optional_json("tokenizer_config.json") or {}
    for key, val, vtype in family.tokenizer_kv(tok_cfg):
        w.add_key_value(key, val, vtype)
    add_vocab(w, vocab)
    for key, val, vtype in family.vocab_kv(vocab.model):
        w.add_key_value(key, val, vtype)
    stem = gguf.naming_convention(meta.name, meta.basename, meta.finetune, meta.version, meta.size_label, None)
    return ModelMetadata(w.kv, stem, total)
