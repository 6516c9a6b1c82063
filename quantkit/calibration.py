"""Calibration tokens for GPTQ: never the evaluation text.

Either the user's text (`--calib FILE`: cut into consecutive samples of `seqlen` tokens), or, by
default, text the model writes itself: sampled from its start-of-text token (temperature 1, top-p
0.95, a fixed seed), so it follows the model's own distribution, needs no data set and carries no
license. Generated samples are cached under the model's fingerprint. The bundled WikiText-2 test
split is refused as calibration text.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import InputError
from .hfmodel import HFModel
from .outputs import partial_path

_EVAL_TEXT = Path(__file__).parent / "data" / "wiki.test.raw"


def _cache_dir() -> Path:
    root = os.environ.get("QUANTKIT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "quantkit") / "calibration"


# a calibration text sharing this many long lines (paragraphs) with the evaluation text holds a copy of
# part of it; a text of one's own domain shares none (WikiText-2's lines are whole paragraphs)
EVAL_LINES_REFUSED = 10
_LONG = 80


def _eval_lines_in(text: str) -> tuple[int, int]:
    """(long lines of `text` that are lines of the evaluation text, long lines of `text`)."""
    if not _EVAL_TEXT.exists():
        return 0, 0
    evaluated = {ln.strip() for ln in _EVAL_TEXT.read_text(encoding="utf-8").splitlines() if len(ln.strip()) >= _LONG}
    mine = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= _LONG]
    return sum(ln in evaluated for ln in mine), len(mine)


def from_file(path: Path, tokenizer, n_samples: int, seqlen: int) -> torch.Tensor:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the calibration text ({e})", path) from None
    if _EVAL_TEXT.exists() and hashlib.sha256(text.encode()).digest() == \
            hashlib.sha256(_EVAL_TEXT.read_bytes()).digest():
        raise InputError("this is the WikiText-2 test split, the evaluation text: calibrate on something else", path)
    shared, long_lines = _eval_lines_in(text)
    if shared >= EVAL_LINES_REFUSED:
        raise InputError(f"{shared} of its {long_lines} long lines are lines of the WikiText-2 test split, the "
                         "evaluation text: calibrating on it would flatter the benchmark; remove them", path)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < seqlen:
        raise InputError(f"calibration text has {len(ids)} tokens, fewer than one sample of {seqlen}"
                         " (--calib-seqlen)", path)
    n = min(n_samples, len(ids) // seqlen)
    return torch.tensor(ids[:n * seqlen], dtype=torch.long).reshape(n, seqlen)


def generated(model_dir: Path, model, tokenizer, n_samples: int, seqlen: int, seed: int = 0,
              device: str = "cpu", batch: int = 32, progress: bool = True) -> torch.Tensor:
    """n_samples x seqlen tokens written by the model itself (cached)."""
    key = hashlib.sha256(f"{HFModel(model_dir).fingerprint()}:{n_samples}:{seqlen}:{seed}".encode()).hexdigest()[:20]
    cache = _cache_dir() / f"generated-{key}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    out = []
    model.eval()
    bar = tqdm(total=n_samples * seqlen, desc="generating calibration text", unit="tok", unit_scale=True,
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for i in range(0, n_samples, batch):
        b = min(batch, n_samples - i)
        ids = torch.full((b, 1), start, dtype=torch.long, device=device)
        with torch.no_grad():
            # exactly seqlen new tokens (min_new_tokens keeps EOS from ending a sample early)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95,
                                 top_k=0, temperature=1.0, max_new_tokens=seqlen, min_new_tokens=seqlen,
                                 pad_token_id=tokenizer.eos_token_id)
        out.append(gen[:, 1:1 + seqlen].cpu())
        bar.update(b * seqlen)
    bar.close()
    tokens = torch.cat(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(cache)
    torch.save(tokens, tmp)
    os.replace(tmp, cache)
    return tokens
