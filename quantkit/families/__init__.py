"""Model families, one module each, registered by their HF architecture names.

    from quantkit.families import family_of
    fam = family_of(HFModel(path))          # or an UnsupportedError naming config.json

Adding a family is one module here (and its fixtures and tests): subclass `Family`, set its data,
override the hooks its converter needs, decorate it with `@register`, and import it below.
"""
from .base import (BPE, BY_HF_NAME, FAMILIES, Family, HParams, SourceTensor, TestFixture, family_for, family_of,
                   hparams_from_config, hparams_of, presets, register, unregister)
from . import gemma, llama, mistral, phi, qwen  # noqa: F401,E402  (each registers itself)

def support_table() -> str:
    """The support table, from the registry: `quantkit families` prints it, the README holds it."""
    from ..plan import VARIANTS

    types = ", ".join(v.label for v in VARIANTS.values())
    lines = ["| family | HF architectures | GGUF arch | tokenizer (llama.cpp pre-tokenizers) | GGUF types "
             "| merge | GPTQ | imatrix |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in FAMILIES.values():
        # a BPE tokenizer is accepted by its pre-tokenizer: none known, none accepted (Phi-4's)
        pre = " or ".join(f"{t} ({', '.join(f.pre_tokenizers)})" if t == BPE else t
                          for t in f.tokenizers if t != BPE or f.pre_tokenizers)
        lines.append(f"| {f.name} | {', '.join(f.hf_names)} | {f.gguf_name} | {pre} | {types} | yes "
                     f"| {'yes' if f.gptq_groups else 'no'} | {'yes' if f.imatrix else 'no'} |")
    return "\n".join(lines)


__all__ = ["BY_HF_NAME", "FAMILIES", "Family", "HParams", "SourceTensor", "TestFixture", "family_for",
           "family_of", "hparams_from_config", "hparams_of", "presets", "register", "support_table", "unregister"]
