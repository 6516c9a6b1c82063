"""`quantkit export --int8 / --nf4`: bitsandbytes checkpoints through transformers' BitsAndBytesConfig.

LLM.int8 (8-bit weights with fp16 outlier handling) and NF4 with double quantization (4-bit
normal-float weights, the quantization constants themselves quantized), saved with
save_pretrained so transformers loads them back with the same config. bitsandbytes quantizes on
the CPU (0.45+) or on CUDA; lm_head stays unquantized, as transformers' integration leaves it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import UnsupportedError
from .outputs import copy_model_files, staged_output, write_json

MODES = ("int8", "nf4")


def config(mode: str, keep: tuple[str, ...] = ()):
    """`keep`: module names left unquantized besides lm_head (the family's bnb_keep: a one-row
    shared-expert gate, which bitsandbytes' 4-bit CPU kernel cannot run)."""
    import transformers
    skip = {"llm_int8_skip_modules": ["lm_head", *keep]} if keep else {}
    if mode == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, **skip)
    if mode == "nf4":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                               **skip)
    raise UnsupportedError(f"unknown bitsandbytes mode {mode!r} (choose from {', '.join(MODES)})")


def export(model_dir: Path, out_dir: Path, mode: str, *, device: str = "cpu", force: bool = False) -> Path:
    try:
        import bitsandbytes  # noqa: F401
        import transformers
    except ImportError:
        raise UnsupportedError("--int8 / --nf4 need bitsandbytes and transformers: pip install 'quantkit[quant]'") from None
    from .families import family_of
    from .hfmodel import HFModel
    keep = family_of(HFModel(model_dir)).bnb_keep
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config(mode, keep),
                                                              device_map=device, dtype=torch.bfloat16)
    with staged_output(out_dir, force, [Path(model_dir)]) as tmp:
        model.save_pretrained(tmp)
        copy_model_files(Path(model_dir), tmp)
        write_json(tmp / "quantkit_bnb.json", {"mode": mode, "bitsandbytes": bitsandbytes.__version__,
                                              "device": device})
    return Path(out_dir)
