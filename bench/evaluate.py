"""Perplexity of every variant, and its divergence from the baseline, on the same token windows.

The baseline (the bf16 model, through transformers) is run once; for every scored token we keep
the log-probability of the true next token and the top-k log-probabilities with their ids plus the
log of the remaining mass, cached on disk under a key of the model, text, context and k. Each
variant is then run over the same windows and compared with that:

    KL(P || Q) ~= sum_{i in top-k(P)} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)

where q_rest = 1 - sum over the same k tokens of q. Lumping the tail into one bucket can only lower
the divergence (log-sum inequality); with k = 128 the tail holds a few 1e-4 of the mass on
WikiText-2. With k >= vocabulary size it is the exact divergence.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import scoring
from .backends import Backend

TOP_K = 128


def default_text() -> Path:
    """The bundled WikiText-2 raw test split."""
    import quantkit
    return Path(quantkit.__file__).parent / "data" / "wiki.test.raw"


def tokenize(model_dir: Path, text: str) -> tuple[np.ndarray, int | None]:
    """The whole text with the baseline's HF tokenizer, special tokens as the model adds them (BOS
    for Llama 3), and the BOS id each window starts with (None for models without BOS). A folder with
    a SentencePiece tokenizer.model and no tokenizer.json is tokenized by sentencepiece itself, as
    llama.cpp tokenizes its GGUF (transformers 5 would need protobuf to convert it)."""
    if not (Path(model_dir) / "tokenizer.json").exists() and (Path(model_dir) / "tokenizer.model").exists():
        from sentencepiece import SentencePieceProcessor
        sp = SentencePieceProcessor(model_file=str(Path(model_dir) / "tokenizer.model"))
        cfg_path = Path(model_dir) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
        bos = sp.bos_id() if cfg.get("add_bos_token", True) and sp.bos_id() >= 0 else None
        return np.asarray(([bos] if bos is not None else []) + sp.encode(text), dtype=np.int64), bos
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = np.asarray(tok(text, add_special_tokens=True, verbose=False)["input_ids"], dtype=np.int64)
    bos = tok.bos_token_id
    adds_bos = bos is not None and len(ids) > 0 and int(ids[0]) == bos and tok("x")["input_ids"][0] == bos
    return ids, (int(bos) if adds_bos else None)


@dataclass
class BaselineScores:
    nll: np.ndarray         # float64 [N]: -log p(true next token)
    top_ids: np.ndarray     # int32 [N, k], most probable first
    top_logp: np.ndarray    # float32 [N, k]
    rest_logp: np.ndarray   # float64 [N]: log of the mass outside top-k (-inf when k covers the vocabulary)
    seconds: float

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial.npz")
        np.savez(tmp, nll=self.nll, top_ids=self.top_ids, top_logp=self.top_logp, rest_logp=self.rest_logp,
                 seconds=np.float64(self.seconds))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> BaselineScores:
        z = np.load(path)
        return cls(z["nll"], z["top_ids"], z["top_logp"], z["rest_logp"], float(z["seconds"]))


def _rest_log(top_logp: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """log(1 - sum exp(top)) in float64; -inf (or log floor) where the top holds everything."""
    mass = torch.exp(top_logp.double()).sum(-1)
    return torch.log(torch.clamp(1.0 - mass, min=floor))


def _batches(windows: scoring.Windows, backend: Backend, desc: str, progress: bool):
    """(window index range, log-softmax [B, S, V] float32, targets [B, S]) over all windows."""
    bar = tqdm(total=windows.n_chunks * windows.ctx, unit="tok", unit_scale=True, disable=not progress,
               file=sys.stderr, desc=desc, dynamic_ncols=True)
    try:
        step = max(1, backend.batch_windows)
        for start in range(0, windows.n_chunks, step):
            stop = min(windows.n_chunks, start + step)
            logits = backend.scored_logits(windows.batch(start, stop), windows.first)
            logp = torch.log_softmax(logits.float(), dim=-1)
            targets = torch.from_numpy(np.stack([windows.targets(i) for i in range(start, stop)]))
            yield logp, targets
            bar.update((stop - start) * windows.ctx)
    finally:
        bar.close()


def score_baseline(backend: Backend, windows: scoring.Windows, k: int = TOP_K, progress: bool = True) -> BaselineScores:
    k = min(k, backend.n_vocab)
    nll, ids, lps, rest = [], [], [], []
    t0 = time.perf_counter()
    for logp, targets in _batches(windows, backend, "baseline", progress):
        nll.append(-logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().reshape(-1))
        top = torch.topk(logp, k, dim=-1)
        ids.append(top.indices.to(torch.int32).reshape(-1, k))
        lps.append(top.values.reshape(-1, k))
        rest.append((_rest_log(top.values) if k < logp.shape[-1] else torch.full(top.values.shape[:-1], -np.inf,
                     dtype=torch.float64)).reshape(-1))
    return BaselineScores(torch.cat(nll).numpy(), torch.cat(ids).numpy(), torch.cat(lps).numpy(),
                          torch.cat(rest).numpy(), time.perf_counter() - t0)


def kl_to_baseline(logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
                   rest_logp: torch.Tensor) -> torch.Tensor:
    """Per row: sum over the baseline's top-k of p (log p - log q), plus the lumped rest (float64)."""
    logq_top = logp.gather(-1, top_ids.long()).double()
    p_top = torch.exp(top_logp.double())
    kl = (p_top * (top_logp.double() - logq_top)).sum(-1)
    rest = rest_logp.double()
    has_rest = torch.isfinite(rest)
    # a variant that puts (nearly) everything in the baseline's top-k gets a large, finite term
    logq_rest = _rest_log(logq_top, floor=1e-30)
    rest_term = torch.where(has_rest, torch.exp(torch.where(has_rest, rest, 0.0)) * (rest - logq_rest),
                            torch.zeros_like(rest))
    return kl + rest_term


def score_variant(backend: Backend, windows: scoring.Windows, base: BaselineScores, progress: bool = True) -> dict:
    nll, kld, same = [], [], []
    pos = 0
    t0 = time.perf_counter()
    for logp, targets in _batches(windows, backend, backend.name[:24], progress):
        flat = logp.reshape(-1, logp.shape[-1])
        n = flat.shape[0]
        sl = slice(pos, pos + n)
        nll.append(-flat.gather(-1, targets.reshape(-1, 1)).squeeze(-1).double())
        kld.append(kl_to_baseline(flat, torch.from_numpy(base.top_ids[sl]), torch.from_numpy(base.top_logp[sl]),
                                  torch.from_numpy(base.rest_logp[sl])))
        same.append(flat.argmax(-1) == torch.from_numpy(base.top_ids[sl, 0]).long())
        pos += n
    seconds = time.perf_counter() - t0
    nll_a, kld_a, same_a = torch.cat(nll).numpy(), torch.cat(kld).numpy(), torch.cat(same).numpy()
    return {**scoring.perplexity(nll_a), **scoring.compare_to_base(nll_a, base.nll, kld_a, same_a),
            "seconds": round(seconds, 3), "tokens_per_s": round(windows.n_chunks * windows.ctx / seconds, 1)}


def baseline_key(fingerprint: str, windows: scoring.Windows, k: int, backend: str, device: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([fingerprint, windows.ctx, windows.n_chunks, windows.bos, k, backend, device]).encode())
    h.update(np.ascontiguousarray(windows.tokens[:windows.n_chunks * windows.ctx]).tobytes())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    root = os.environ.get("QUANTKIT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "quantkit") / "baselines"
