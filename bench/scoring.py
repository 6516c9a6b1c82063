"""llama-perplexity's protocol and statistics, as pure functions (tools/perplexity/perplexity.cpp).

Windows: the whole text is tokenized once (BOS first where the model uses one) and cut into
non-overlapping windows of `ctx` tokens; the first token of each window is replaced by BOS where the
model uses one. Only the second half of each window is scored: the logits at positions
ctx/2 .. ctx-2 predict the tokens at ctx/2+1 .. ctx-1 (ctx/2 - 1 tokens per window, 255 at 512).

Statistics over the scored tokens, with llama.cpp's uncertainties:
    ppl = exp(mean nll)                   ± ppl * sqrt(var(nll) / (N - 1))
    mean KLD                              ± sqrt(var(kld) / (N - 1))
    same top token                        ± sqrt(p (1 - p) / (N - 1))
    ln(PPL(Q)/PPL(base)), PPL(Q) - PPL(base)   with the covariance of the two nll series
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Windows:
    tokens: np.ndarray          # int64 [n], the whole text
    ctx: int
    n_chunks: int
    bos: int | None             # replaces each window's first token, or None

    @property
    def first(self) -> int:
        return self.ctx // 2

    @property
    def scored_per_window(self) -> int:
        return self.ctx - 1 - self.first

    @property
    def n_scored(self) -> int:
        return self.n_chunks * self.scored_per_window

    def window(self, i: int) -> np.ndarray:
        w = self.tokens[i * self.ctx:(i + 1) * self.ctx].copy()
        if self.bos is not None:
            w[0] = self.bos
        return w

    def batch(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self.window(i) for i in range(start, stop)])

    def targets(self, i: int) -> np.ndarray:
        """The tokens predicted by the scored positions of window i (original tokens, not BOS)."""
        return self.tokens[i * self.ctx + self.first + 1:(i + 1) * self.ctx]


def plan_windows(tokens: np.ndarray, ctx: int, bos: int | None, limit_chunks: int | None = None) -> Windows:
    tokens = np.asarray(tokens, dtype=np.int64)
    if ctx < 4 or ctx % 2:
        raise ValueError(f"--ctx must be an even number of at least 4, got {ctx}")
    if len(tokens) < 2 * ctx:
        # llama-perplexity's own requirement
        raise ValueError(f"the text tokenizes to {len(tokens)} tokens; a context of {ctx} needs at least {2 * ctx}")
    n = len(tokens) // ctx
    if limit_chunks is not None:
        n = max(1, min(n, limit_chunks))
    return Windows(tokens, ctx, n, bos)


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: the mean, and sqrt(var / (N - 1)) of the sample."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    mean = float(v.mean())
    var = float((v * v).mean() - mean * mean)
    return mean, (math.sqrt(var / (n - 1)) if n > 1 and var > 0 else 0.0)


def covariance(a: np.ndarray, b: np.ndarray) -> float:
    """llama.cpp's covariance of the two means (sum a*b / N - mean a * mean b) / (N - 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = len(a)
    return float(((a * b).mean() - a.mean() * b.mean()) / (n - 1)) if n > 1 else 0.0


def perplexity(nll: np.ndarray) -> dict:
    log_ppl, unc = mean_and_uncertainty(nll)
    ppl = math.exp(log_ppl)
    return {"ppl": ppl, "ppl_err": ppl * unc, "tokens": int(len(nll))}


def compare_to_base(nll: np.ndarray, nll_base: np.ndarray, kld: np.ndarray, same_top: np.ndarray) -> dict:
    """The KL-divergence statistics of llama-perplexity --kl-divergence."""
    log_ppl, unc = mean_and_uncertainty(nll)
    log_base, unc_base = mean_and_uncertainty(nll_base)
    cov = covariance(nll, nll_base)
    ppl, base = math.exp(log_ppl), math.exp(log_base)
    ratio_log = log_ppl - log_base
    ratio_log_unc = math.sqrt(max(0.0, unc * unc + unc_base * unc_base - 2 * cov))
    ppl_unc, base_unc = ppl * unc, base * unc_base
    diff_unc = math.sqrt(max(0.0, ppl_unc ** 2 + base_unc ** 2 - 2 * ppl * base * cov))
    kl_mean, kl_unc = mean_and_uncertainty(kld)
    p_top = float(np.mean(same_top))
    n = len(kld)
    top_unc = math.sqrt(p_top * (1 - p_top) / (n - 1)) if n > 1 else 0.0
    s = np.sort(np.asarray(kld, np.float64))

    def percentile(fraction: float) -> float:     # llama.cpp's linear interpolation
        p = fraction * (len(s) - 1)
        i = int(p)
        return float((1 - (p - i)) * s[i] + (p - i) * s[min(i + 1, len(s) - 1)])

    return {
        "ppl_ratio": math.exp(ratio_log), "ppl_ratio_err": math.exp(ratio_log) * ratio_log_unc,
        "ppl_diff": ppl - base, "ppl_diff_err": diff_unc,
        "kld_mean": kl_mean, "kld_mean_err": kl_unc, "kld_median": percentile(0.5), "kld_p90": percentile(0.9),
        "kld_p99": percentile(0.99), "kld_p999": percentile(0.999), "kld_max": float(s[-1]),
        "same_top": p_top, "same_top_err": top_unc,
    }
