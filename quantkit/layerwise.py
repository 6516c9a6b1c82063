"""Running a HF decoder one layer at a time, as GPTQ and the importance matrix do.

The model loads in its stored dtype on the CPU; the embeddings run once to catch what decoder
layer 0 receives for every calibration sample; then each layer in turn moves to the device, works
(in float32 on a CPU, whose bf16 matmuls are slow and round, in the stored dtype on a GPU), and
goes back. Peak device memory is one layer plus the activations.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import calibration
from .hfmodel import HFModel


class _Captured(Exception):
    pass


def load(model_dir: Path, device: str, progress: bool):
    """(model, stored dtype, working dtype): the model in its stored dtype, on the CPU, no KV cache."""
    import transformers

    if not progress:
        transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    model.config.use_cache = False
    stored = model.dtype
    return model, stored, (torch.float32 if device == "cpu" else stored)


def text_tokens(model_dir: Path, calib: Path, n_samples: int, seqlen: int) -> torch.Tensor:
    """[samples, seqlen] tokens of the user's calibration text, cut by the model's tokenizer; an
    InputError for a text that is unreadable, too short or the evaluation text. Cheap: callers run
    it before loading any weight."""
    import transformers
    return calibration.from_file(calib, transformers.AutoTokenizer.from_pretrained(model_dir), n_samples, seqlen)


def generated_tokens(model_dir: Path, model, stored: torch.dtype, n_samples: int, seqlen: int, seed: int,
                     device: str, progress: bool) -> torch.Tensor:
    """[samples, seqlen] tokens the model generates itself (cached by calibration.generated)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    small = HFModel(model_dir).n_params() * 4 < ram_bytes() // 3
    gen_dtype = torch.float32 if device == "cpu" and small else stored
    try:
        return calibration.generated(Path(model_dir), to(model, device, gen_dtype), tok, n_samples, seqlen, seed,
                                     device, progress=progress)
    finally:
        to(model, "cpu", stored)


def layer0_inputs(model, family, tokens: torch.Tensor, device: str, work: torch.dtype) -> tuple[list, dict]:
    """Run the embeddings (and rotary tables) on the device and catch what decoder layer 0 receives:
    (one hidden-state tensor per sample, the keyword arguments every layer gets)."""
    inputs, kwargs = [], {}

    class Catcher(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden_states, *args, **kw):
            inputs.append(hidden_states)
            kwargs.update(kw)
            raise _Captured

    layers, emb = family.layers(model), family.module(model, family.embeddings)
    stored = emb.weight.dtype
    to(emb, device, work)
    family.module(model, family.rotary).to(device)
    layers[0] = Catcher(layers[0])
    try:
        with torch.no_grad():
            for sample in tokens:
                try:
                    model(input_ids=sample[None].to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        layers[0] = layers[0].inner
        to(emb, "cpu", stored)
    return inputs, {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}


def to(module, device, dtype):
    """Move a module and cast its parameters only: buffers such as the rotary inv_freq stay float32
    (Module.to(dtype) would round them to bf16 and shift every position's angle)."""
    module.to(device)
    for p in module.parameters():
        p.data = p.data.to(dtype)
    return module


def ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def hidden(out):
    """A decoder layer's hidden states (some transformers versions return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def routed(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of transformers 5's fused experts module, as a forward pre-hook sees them: the
    tokens [N, hidden] and the router's choice for each [N, top k] (the model's own routing)."""
    x = (args[0] if args else kwargs["hidden_states"]).detach()
    chosen = args[1] if len(args) > 1 else kwargs["top_k_index"]
    x = x.reshape(-1, x.shape[-1])
    return x, chosen.reshape(x.shape[0], -1)


def expert_activation(experts, e: int, rows: torch.Tensor) -> torch.Tensor:
    """What expert e's down_proj multiplies for `rows`: act(gate) * up, through the module's own
    gate (its _apply_gate where it has one: gpt-oss-style clamped gates)."""
    gate_up = torch.nn.functional.linear(rows, experts.gate_up_proj[e])
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gate_up)
    g, u = gate_up.chunk(2, dim=-1)
    return experts.act_fn(g) * u
