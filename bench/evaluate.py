"""Perplexity of every variant, and its divergence from the baseline, on the same token windows.

The baseline (the bf16 model, through transformers) is run once; for every scored token we keep the
negative log-probability of the true next token, the most probable token, and the baseline's
log-probabilities, cached on disk under a key of the model, text, context and mode. Each variant is
then run over the same windows and compared with that:

    KL(P || Q) = sum_i p_i (log p_i - log q_i)

By default over the whole vocabulary, as `llama-perplexity --kl-divergence` defines it: the
baseline's log-probabilities are stored in llama-perplexity's own `--kl-divergence-base` file
format (per scored token a float32 scale and minimum, then one uint16 per vocabulary entry over
the 16 nats below the most probable token) and read back window by window, so memory stays at a
few windows' logits whatever the vocabulary; the cost is disk, 2 bytes per vocabulary entry per
scored token (SmolLM2: 25 MB per 512-token window, Llama 3: 65 MB). As in llama.cpp, tokens more
than 16 nats below the top one carry no weight; the uint16 steps are 16/65535 nats.

With top_k = K > 0 only the baseline's top K log-probabilities per token are kept (K*8 bytes) and
the rest is lumped into one bucket, q_rest = 1 - sum over the same K tokens of q:

    KL ~= sum_{i in top-K(P)} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)

which can only read low (log-sum inequality): ~14 % low at K = 128 for SmolLM2's Q4_K_M.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import scoring
from .backends import Backend

TOP_K = 0           # 0: the whole vocabulary
LOGPROB_RANGE = 16.0  # nats below the top token that llama-perplexity stores (and weighs)
ROWS_PER_STEP = 64  # scored tokens dequantized at once when comparing with the whole vocabulary


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


# --- llama-perplexity's --kl-divergence-base file ------------------------------------------------

class LogProbFile:
    """tools/perplexity/perplexity.cpp's file of the baseline's log-probabilities:

        "_logits_", uint32 n_ctx, int32 n_vocab, int32 n_chunk, int32 tokens[n_chunk * n_ctx],
        then per scored token (n_ctx - 1 - n_ctx/2 per chunk) nv = 2*((n_vocab+1)/2) + 4 uint16:
        float32 scale, float32 min_log_prob, n_vocab codes (log p = min_log_prob + scale * code)

    Written as the baseline is scored (never held in memory) and read back through a memmap."""
    MAGIC = b"_logits_"

    @staticmethod
    def row_values(n_vocab: int) -> int:
        return 2 * ((n_vocab + 1) // 2) + 4

    @classmethod
    def nbytes(cls, n_vocab: int, windows: scoring.Windows) -> int:
        return 20 + 4 * windows.n_chunks * windows.ctx + 2 * cls.row_values(n_vocab) * windows.n_scored

    @classmethod
    def header(cls, n_vocab: int, windows: scoring.Windows) -> bytes:
        tokens = np.ascontiguousarray(windows.tokens[:windows.n_chunks * windows.ctx], dtype="<i4")
        return cls.MAGIC + struct.pack("<Iii", windows.ctx, n_vocab, windows.n_chunks) + tokens.tobytes()

    @staticmethod
    def encode(logp: torch.Tensor) -> np.ndarray:
        """float32 log-probabilities [n, V] -> uint16 rows [n, nv], as perplexity.cpp's log_softmax
        stores them (its clamp of the range to 16 nats, float32 arithmetic, round to nearest)."""
        logp = logp.float()
        n, v = logp.shape
        top = logp.max(-1).values
        low = torch.maximum(logp.min(-1).values, top - LOGPROB_RANGE)
        scale = (top - low) / 65535.0
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        codes = torch.where(logp > low[:, None], torch.round(inv[:, None] * (logp - low[:, None])),
                            torch.zeros_like(logp))
        out = np.zeros((n, LogProbFile.row_values(v)), dtype=np.uint16)
        out[:, :4] = np.stack([scale.numpy(), low.numpy()], 1).astype("<f4").view(np.uint16)
        out[:, 4:4 + v] = codes.numpy().astype(np.uint16)
        return out

    @staticmethod
    def decode(rows: np.ndarray, n_vocab: int) -> torch.Tensor:
        """uint16 rows [n, nv] -> the stored log-probabilities, float32 [n, n_vocab]."""
        rows = np.ascontiguousarray(rows)
        scale_min = torch.from_numpy(rows[:, :4].copy().view("<f4").astype(np.float32))
        codes = torch.from_numpy(rows[:, 4:4 + n_vocab].astype(np.float32))
        return scale_min[:, :1] * codes + scale_min[:, 1:2]

    @classmethod
    def open(cls, path: Path) -> tuple[int, int, np.ndarray]:
        """(n_ctx, n_vocab, rows memmap [n_scored, nv]) of a file written by us or by llama-perplexity."""
        with open(path, "rb") as f:
            head = f.read(20)
        if len(head) < 20 or head[:8] != cls.MAGIC:
            raise ValueError(f"{path}: not a llama-perplexity log-probability file")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:20])
        offset = 20 + 4 * n_ctx * n_chunk
        nv = cls.row_values(n_vocab)
        n_rows = n_chunk * (n_ctx - 1 - n_ctx // 2)
        if path.stat().st_size != offset + 2 * nv * n_rows:
            raise ValueError(f"{path}: truncated log-probability file")
        return n_ctx, n_vocab, np.memmap(path, dtype="<u2", mode="r", offset=offset, shape=(n_rows, nv))


@dataclass
class BaselineScores:
    nll: np.ndarray         # float64 [N]: -log p(true next token)
    top1: np.ndarray        # int32 [N]: the most probable token
    seconds: float
    k: int                  # 0: the whole vocabulary, in `logprobs`; else the top-k arrays below
    top_ids: np.ndarray | None = None     # int32 [N, k], most probable first
    top_logp: np.ndarray | None = None    # float32 [N, k]
    rest_logp: np.ndarray | None = None   # float64 [N]: log of the mass outside the top k
    logprobs: Path | None = None          # llama-perplexity's --kl-divergence-base file

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial.npz")
        extra = {} if self.k == 0 else {"top_ids": self.top_ids, "top_logp": self.top_logp,
                                        "rest_logp": self.rest_logp}
        np.savez(tmp, nll=self.nll, top1=self.top1, seconds=np.float64(self.seconds), k=np.int64(self.k), **extra)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, logprobs: Path | None = None) -> BaselineScores:
        z = np.load(path)
        k = int(z["k"])
        if k == 0:
            return cls(z["nll"], z["top1"], float(z["seconds"]), 0, logprobs=logprobs)
        return cls(z["nll"], z["top1"], float(z["seconds"]), k, z["top_ids"], z["top_logp"], z["rest_logp"])


def _rest_log(top_logp: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """log(1 - sum exp(top)) in float64; -inf (or log floor) where the top holds everything."""
    mass = torch.exp(top_logp.double()).sum(-1)
    return torch.log(torch.clamp(1.0 - mass, min=floor))


def _batches(windows: scoring.Windows, backend: Backend, desc: str, progress: bool):
    """(log-softmax [B, S, V] float32, targets [B, S]) over all windows."""
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


def score_baseline(backend: Backend, windows: scoring.Windows, k: int = TOP_K, progress: bool = True,
                   logprobs: Path | None = None) -> BaselineScores:
    """Score the baseline; with k = 0 its log-probabilities are streamed to `logprobs` (written under
    a temporary name and renamed when complete)."""
    full = k == 0 or k >= backend.n_vocab
    if full and logprobs is None:
        raise ValueError("scoring against the whole vocabulary needs a file for the baseline's log-probabilities")
    nll, top1, ids, lps, rest = [], [], [], [], []
    t0 = time.perf_counter()
    tmp = logprobs.with_name(f".{logprobs.name}.{os.getpid()}.partial") if full else None
    sink = open(tmp, "wb") if full else None
    try:
        if sink is not None:
            sink.write(LogProbFile.header(backend.n_vocab, windows))
        for logp, targets in _batches(windows, backend, "baseline", progress):
            flat = logp.reshape(-1, logp.shape[-1])
            nll.append(-flat.gather(-1, targets.reshape(-1, 1)).squeeze(-1).double())
            top1.append(flat.argmax(-1).to(torch.int32))
            if sink is not None:
                for start in range(0, flat.shape[0], ROWS_PER_STEP):
                    sink.write(LogProbFile.encode(flat[start:start + ROWS_PER_STEP]).tobytes())
            else:
                top = torch.topk(flat, k, dim=-1)
                ids.append(top.indices.to(torch.int32))
                lps.append(top.values)
                rest.append(_rest_log(top.values))
        if sink is not None:
            sink.close()
            os.replace(tmp, logprobs)
    except BaseException:
        if sink is not None:
            sink.close()
            tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    nll_a, top1_a = torch.cat(nll).numpy(), torch.cat(top1).numpy()
    if full:
        return BaselineScores(nll_a, top1_a, seconds, 0, logprobs=logprobs)
    return BaselineScores(nll_a, top1_a, seconds, k, torch.cat(ids).numpy(), torch.cat(lps).numpy(),
                          torch.cat(rest).numpy())


def kl_full(logq: torch.Tensor, base_rows: np.ndarray) -> torch.Tensor:
    """Per row: sum over the vocabulary of p (log p - log q), p from the stored baseline rows, the
    terms of tokens below 16 nats left out as llama-perplexity leaves them out (float64 sums)."""
    out = []
    for start in range(0, logq.shape[0], ROWS_PER_STEP):
        q = logq[start:start + ROWS_PER_STEP]
        logp = LogProbFile.decode(base_rows[start:start + ROWS_PER_STEP], q.shape[-1])
        keep = logp > -LOGPROB_RANGE
        terms = torch.where(keep, torch.exp(logp).double() * (logp.double() - q.double()), 0.0)
        out.append(terms.sum(-1))
    return torch.cat(out)


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
    rows = None
    if base.k == 0:
        n_ctx, n_vocab, rows = LogProbFile.open(base.logprobs)
        if (n_ctx, n_vocab, rows.shape[0]) != (windows.ctx, backend.n_vocab, windows.n_scored):
            raise ValueError(f"{base.logprobs}: made for a context of {n_ctx} and {n_vocab} tokens "
                             f"({rows.shape[0]} scored); this run has {windows.ctx}, {backend.n_vocab} "
                             f"({windows.n_scored})")
    for logp, targets in _batches(windows, backend, backend.name[:24], progress):
        flat = logp.reshape(-1, logp.shape[-1])
        n = flat.shape[0]
        sl = slice(pos, pos + n)
        nll.append(-flat.gather(-1, targets.reshape(-1, 1)).squeeze(-1).double())
        if rows is not None:
            kld.append(kl_full(flat, rows[sl]))
        else:
            kld.append(kl_to_baseline(flat, torch.from_numpy(base.top_ids[sl]), torch.from_numpy(base.top_logp[sl]),
                                      torch.from_numpy(base.rest_logp[sl])))
        same.append(flat.argmax(-1) == torch.from_numpy(base.top1[sl]).long())
        pos += n
    seconds = time.perf_counter() - t0
    nll_a, kld_a, same_a = torch.cat(nll).numpy(), torch.cat(kld).numpy(), torch.cat(same).numpy()
    return {**scoring.perplexity(nll_a), **scoring.compare_to_base(nll_a, base.nll, kld_a, same_a),
            "seconds": round(seconds, 3), "tokens_per_s": round(windows.n_chunks * windows.ctx / seconds, 1)}


def baseline_key(fingerprint: str, windows: scoring.Windows, k: int, backend: str, device: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(["v2", fingerprint, windows.ctx, windows.n_chunks, windows.bos, k, backend, device]).encode())
    h.update(np.ascontiguousarray(windows.tokens[:windows.n_chunks * windows.ctx]).tobytes())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    root = os.environ.get("QUANTKIT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "quantkit") / "baselines"
