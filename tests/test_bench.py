"""`quantkit bench`: llama-perplexity's protocol and statistics, KLD, VRAM arithmetic and the report.

References: hand-computed windows and probabilities; the statistics computed directly with numpy
(sample standard deviations, percentiles, the delta method); torch's kl_div for the exact KL;
transformers against llama.cpp for the same SmolLM2 weights.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from quantkit.bench import evaluate, report, scoring, vram
from quantkit.cli import main


# --- the window protocol on a case small enough to check by hand -------------------------------

class RecordingBackend:
    """Logits that give the true next token probability 1/2 and spread the rest evenly; records the
    windows it is shown."""
    name, kind, batch_windows = "fake", "fake", 2

    def __init__(self, n_vocab: int, tokens: np.ndarray):
        self.n_vocab, self.tokens, self.seen = n_vocab, tokens, []

    def scored_logits(self, windows: np.ndarray, first: int) -> torch.Tensor:
        self.seen.append(windows.copy())
        b, ctx = windows.shape
        out = torch.zeros(b, ctx - 1 - first, self.n_vocab)
        # p(true) = 1/2: logit log((n-1)) above the others
        for i in range(b):
            for j in range(ctx - 1 - first):
                out[i, j, int(self._truth(len(self.seen) - 1, i, first + j))] = math.log(self.n_vocab - 1)
        return out

    def _truth(self, call: int, i: int, pos: int) -> int:
        window = call * self.batch_windows + i
        return self.tokens[window * self.ctx + pos + 1]

    def close(self):
        pass


def test_windows_bos_and_second_half_scoring_by_hand():
    tokens = np.arange(100, 121)                 # 21 tokens: two windows of 8, the rest unused
    w = scoring.plan_windows(tokens, ctx=8, bos=1)
    assert (w.n_chunks, w.first, w.scored_per_window, w.n_scored) == (2, 4, 3, 6)
    assert w.window(0).tolist() == [1, 101, 102, 103, 104, 105, 106, 107]     # BOS replaces the first token
    assert w.window(1).tolist() == [1, 109, 110, 111, 112, 113, 114, 115]
    assert w.targets(0).tolist() == [105, 106, 107]                        # predicted from positions 4, 5, 6
    assert w.targets(1).tolist() == [113, 114, 115]
    assert scoring.plan_windows(tokens, 8, None).window(0).tolist() == list(range(100, 108))
    assert scoring.plan_windows(tokens, 8, 1, limit_chunks=1).n_chunks == 1
    with pytest.raises(ValueError, match="at least 32"):
        scoring.plan_windows(tokens, 16, 1)      # llama-perplexity needs 2 * ctx tokens


def test_scoring_uses_exactly_the_scored_positions():
    vocab, tokens = 7, np.array([3, 1, 4, 1, 5, 2, 6, 5, 3, 5, 0, 2, 6, 4, 3, 1, 0])
    w = scoring.plan_windows(tokens, ctx=8, bos=None)
    backend = RecordingBackend(vocab, tokens)
    backend.ctx = 8
    base = evaluate.score_baseline(backend, w, k=3, progress=False)
    # every scored token had probability 1/2: nll = log 2 for each of 2 windows x 3 positions
    np.testing.assert_allclose(base.nll, [math.log(2)] * 6, rtol=1e-6)
    assert scoring.perplexity(base.nll)["ppl"] == pytest.approx(2.0, rel=1e-6)
    assert [s.tolist() for s in backend.seen] == [[w.window(0).tolist(), w.window(1).tolist()]]
    # top-1 is the true token; the rest of the mass beyond the top 3 is (vocab - 3) / (2 (vocab - 1))
    assert base.top_ids[:, 0].tolist() == [w.targets(0)[j] for j in range(3)] + [w.targets(1)[j] for j in range(3)]
    np.testing.assert_allclose(np.exp(base.rest_logp), (vocab - 3) / (2 * (vocab - 1)), rtol=1e-5)


def test_whole_vocabulary_file_is_llama_perplexity_layout(tmp_path):
    """The baseline file as tools/perplexity/perplexity.cpp writes it, read here with struct alone:
    header, the text's tokens, then per scored token float32 scale and min and one uint16 per entry."""
    import struct
    vocab, tokens = 7, np.array([3, 1, 4, 1, 5, 2, 6, 5, 3, 5, 0, 2, 6, 4, 3, 1, 0])
    w = scoring.plan_windows(tokens, ctx=8, bos=None)
    backend = RecordingBackend(vocab, tokens)
    backend.ctx = 8
    path = tmp_path / "base.kld"
    base = evaluate.score_baseline(backend, w, k=0, progress=False, logprobs=path)
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_" and struct.unpack("<Iii", raw[8:20]) == (8, vocab, 2)
    assert list(struct.unpack("<16i", raw[20:84])) == tokens[:16].tolist()
    nv = 2 * ((vocab + 1) // 2) + 4
    assert len(raw) == 84 + 2 * nv * 6 == evaluate.LogProbFile.nbytes(vocab, w) and not list(tmp_path.glob(".*partial"))
    for row in range(6):
        r = raw[84 + 2 * nv * row:84 + 2 * nv * (row + 1)]
        scale, low = struct.unpack("<ff", r[:8])
        codes = struct.unpack(f"<{vocab}H", r[8:8 + 2 * vocab])
        logp = [low + scale * c for c in codes]
        true = int(base.top1[row])
        # p(true) = 1/2, the others 1/(2 (n-1)): the top token at 65535, the others at the minimum
        assert codes[true] == 65535 and math.exp(logp[true]) == pytest.approx(0.5, rel=1e-4)
        assert all(c == 0 for i, c in enumerate(codes) if i != true)
        assert math.exp(low) == pytest.approx(1 / (2 * (vocab - 1)), rel=1e-4)
    assert base.nll.tolist() == pytest.approx([math.log(2)] * 6, rel=1e-6)


# --- statistics against direct computation ------------------------------------------------------

def test_ppl_standard_error_is_the_standard_error_of_the_mean_nll():
    nll = np.random.default_rng(0).gamma(2.0, 1.5, size=5000)
    r = scoring.perplexity(nll)
    assert r["ppl"] == pytest.approx(math.exp(nll.mean()))
    assert r["ppl_err"] == pytest.approx(math.exp(nll.mean()) * nll.std(ddof=1) / math.sqrt(len(nll)), rel=1e-9)


def test_comparison_statistics_against_direct_computation():
    rng = np.random.default_rng(1)
    base = rng.gamma(2.0, 1.5, size=4000)
    q = base + rng.normal(0.05, 0.1, size=4000)
    kld = rng.exponential(0.03, size=4000)
    same = rng.random(4000) < 0.9
    r = scoring.compare_to_base(q, base, kld, same)
    n = len(q)
    d = q - base                                  # ln ratio = mean of differences; its error directly
    assert r["ppl_ratio"] == pytest.approx(math.exp(d.mean()))
    assert r["ppl_ratio_err"] == pytest.approx(math.exp(d.mean()) * d.std(ddof=1) / math.sqrt(n), rel=1e-6)
    # PPL difference: delta method on (mean q, mean base) with their covariance
    cov = np.cov(np.stack([q, base]), ddof=1) / n
    g = np.array([math.exp(q.mean()), -math.exp(base.mean())])
    assert r["ppl_diff"] == pytest.approx(math.exp(q.mean()) - math.exp(base.mean()))
    assert r["ppl_diff_err"] == pytest.approx(math.sqrt(g @ cov @ g), rel=1e-6)
    assert r["kld_mean"] == pytest.approx(kld.mean())
    assert r["kld_mean_err"] == pytest.approx(kld.std(ddof=1) / math.sqrt(n), rel=1e-9)
    for key, p in (("kld_median", 50), ("kld_p90", 90), ("kld_p99", 99), ("kld_p999", 99.9)):
        assert r[key] == pytest.approx(np.percentile(kld, p), rel=1e-6), key
    assert r["same_top"] == pytest.approx(same.mean())
    assert r["same_top_err"] == pytest.approx(math.sqrt(same.mean() * (1 - same.mean()) / (n - 1)))


def test_kl_with_the_whole_vocabulary_is_exact_and_top_k_a_close_lower_bound():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(50, 300, generator=g) * 3, torch.randn(50, 300, generator=g) * 3
    logp, logq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    exact = torch.nn.functional.kl_div(logq.double(), logp.double(), log_target=True, reduction="none").sum(-1)
    for k in (300, 64):
        top = torch.topk(logp, k, dim=-1)
        rest = evaluate._rest_log(top.values) if k < 300 else torch.full((50,), -math.inf, dtype=torch.float64)
        kl = evaluate.kl_to_baseline(logq, top.indices, top.values, rest)
        if k == 300:
            torch.testing.assert_close(kl, exact, rtol=1e-5, atol=1e-7)
        else:
            assert bool((kl <= exact + 1e-9).all()) and float((exact - kl).max()) < 0.15 * float(exact.mean())
    same = evaluate.kl_to_baseline(logp, torch.topk(logp, 64).indices, torch.topk(logp, 64).values,
                                   evaluate._rest_log(torch.topk(logp, 64).values))
    assert float(same.abs().max()) == 0.0
    # the whole vocabulary from the stored uint16 rows: within the storage's rounding (16/65535 nats)
    # and the 16-nat cut-off, here well inside 1 % of the exact value
    full = evaluate.kl_full(logq, evaluate.LogProbFile.encode(logp))
    assert float(((full - exact).abs() / exact).max()) < 0.01
    assert abs(float(full.mean() / exact.mean()) - 1) < 1e-3
    itself = evaluate.kl_full(logp, evaluate.LogProbFile.encode(logp))
    assert float(itself.abs().max()) < 1e-4


# --- VRAM and the report from a fixed results JSON ----------------------------------------------

LLAMA8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
           "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072}
GB = 10 ** 9


def fixed_results() -> dict:
    arch = vram.Arch.from_config(LLAMA8B)

    def row(name, label, size, ppl, kld=None, top=None):
        r = {"name": name, "path": f"/models/{name}", "label": label, "kind": "gguf", "backend": "llama.cpp",
             "file_bytes": size, "ppl": ppl, "ppl_err": 0.04, "tokens_per_s": 1000.0,
             "vram": vram.estimate(size, arch)}
        if kld is not None:
            r.update(ppl_ratio=ppl / 6.2332, ppl_diff=ppl - 6.2332, ppl_diff_err=0.005, kld_mean=kld, kld_mean_err=kld / 50,
                     kld_p99=kld * 8, same_top=top, same_top_err=0.0005)
        return r

    base = dict(row("Llama-8B-bf16", "BF16", int(16.06 * GB), 6.2332), kind="hf", backend="transformers")
    variants = [row("m-Q8_0.gguf", "Q8_0", int(8.54 * GB), 6.2342, 0.0010, 0.985),
                row("m-Q5_K_M.gguf", "Q5_K_M", int(5.73 * GB), 6.2797, 0.0200, 0.955),
                row("m-Q4_K_M.gguf", "Q4_K_M", int(4.92 * GB), 6.4071, 0.0550, 0.925)]
    gpus = vram.parse_gpus(["rtx3060", "rtx4090", "a100-40"], None)
    return {"quantkit_bench": 1, "date": "2026-11-25", "machine": {"cpu": "test"}, "model": "Llama-3.1-8B",
            "text": {"name": "wiki.test.raw"}, "ctx": 512, "chunks": 584, "scored_tokens": 148920, "contexts": [4096, 8192, 32768],
            "arch": {**arch.__dict__, "kv_mib_per_1k_tokens": 128.0}, "baseline": base, "variants": variants,
            "gpus": gpus, "fits": vram.gpu_fits({r["name"]: r["vram"] for r in [base] + variants}, arch, gpus)}


def test_vram_estimate_and_max_context_by_hand():
    arch = vram.Arch.from_config(LLAMA8B)
    assert arch.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 131072      # 128 KiB per token
    est = vram.estimate(16 * 2 ** 30, arch)
    compute = 512 * (128256 + 3 * 14336 + 4 * 4096) * 4
    assert est["at_context"]["8192"] == round((16 * 2 ** 30 + 8192 * 131072 + compute) / 2 ** 20)
    # RTX 4090: 24564 MiB - 768 headroom - 16 GiB weights - compute, in 128 KiB tokens, down to 256
    free = (24564 - 768) * 2 ** 20 - 16 * 2 ** 30 - compute
    assert vram.max_context(est, arch, 24564) == free // 131072 // 256 * 256
    assert vram.max_context(est, arch, 12288) == 0                        # 16 GiB of weights on 12 GB


def test_report_from_fixed_results_has_the_expected_tables_and_valid_pngs(tmp_path):
    res = fixed_results()
    files = report.write(res, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert sorted(p.name for p in files) == ["quality.png", "report.json", "report.md", "vram.png"]
    fits = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if re.match(r"\| (RTX|A100)", line)}
    # columns: BF16, Q8_0, Q5_K_M, Q4_K_M
    assert fits["RTX 3060 12GB"][0] == "—"                                               # 16 GB of bf16 weights
    # Q8_0 (8.54 GB) on a 12 GB card, by hand: what is left after the headroom, the weights and the
    # compute buffers, in 128 KiB tokens, rounded down to 256
    compute = 512 * (128256 + 3 * 14336 + 4 * 4096) * 4
    left = (12288 - 768) * 2 ** 20 - round(8.54 * GB / 2 ** 20) * 2 ** 20 - compute
    assert fits["RTX 3060 12GB"][1] == f"{left // 131072 // 256 * 256 // 1024}k" == "23k"
    assert fits["RTX 3060 12GB"][3].endswith("k") and fits["RTX 4090 24GB"][0].endswith("k")
    assert fits["A100 40GB"][3] == "128k"                                                # capped at the model's own
    assert "| Q8_0 |" in md and "near-lossless" in md.split("| Q8_0 |")[1].splitlines()[0]
    assert "recommended" in [ln for ln in md.splitlines() if ln.startswith("| `m-Q4_K_M.gguf`")][0]
    assert "## Inference Requirements" in md and "## Available Files" in md
    for png in ("quality.png", "vram.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.pyplot as plt
        img = plt.imread(tmp_path / png)
        assert img.shape[0] > 300 and img.shape[1] > 600 and img.std() > 0.01
    assert json.loads((tmp_path / "report.json").read_text())["fits"] == res["fits"]



def test_report_marks_the_pareto_front_and_the_best_variant_per_gpu(tmp_path):
    res = fixed_results()
    arch = vram.Arch.from_config(LLAMA8B)
    # a variant larger than Q5_K_M and further from bf16: dominated, off the front
    worse = dict(res["variants"][1], name="m-worse.gguf", label="WORSE", file_bytes=int(6.0 * GB), kld_mean=0.03,
                 vram=vram.estimate(int(6.0 * GB), arch))
    res["variants"].append(worse)
    res["fits"] = vram.gpu_fits({r["name"]: r["vram"] for r in [res["baseline"]] + res["variants"]}, arch, res["gpus"])
    assert report.pareto(res) == {"m-Q8_0.gguf", "m-Q5_K_M.gguf", "m-Q4_K_M.gguf"}
    md = report.markdown(res)
    row = {}
    for ln in md.splitlines():          # the quality table comes first
        if ln.startswith(("| Q", "| WORSE")):
            row.setdefault(ln.split("|")[1].strip(), ln)
    assert "Pareto" in row["Q4_K_M"] and "Pareto" in row["Q8_0"] and "Pareto" not in row["WORSE"]
    best = report.best_fits(res)
    # 12 GB: bf16 (16 GB) does not fit, Q8_0 (8.5 GB) does with 8k: the closest to bf16 that fits;
    # 24 GB: bf16 itself (16 GB of weights and 8k of KV cache fit); 40 GB: bf16
    assert best == {"RTX 3060 12GB": "m-Q8_0.gguf", "RTX 4090 24GB": "Llama-8B-bf16", "A100 40GB": "Llama-8B-bf16"}
    gpu_rows = {ln.split("|")[1].strip(): ln.split("|")[-2].strip() for ln in md.splitlines() if re.match(r"\| (RTX|A100)", ln)}
    assert gpu_rows == {"RTX 3060 12GB": "Q8_0", "RTX 4090 24GB": "BF16", "A100 40GB": "BF16"}


def test_gpu_catalog_is_extendable_and_names_match_loosely(tmp_path):
    cat = tmp_path / "gpus.json"
    cat.write_text(json.dumps({"RTX 4070 12GB": 12282}))
    g = vram.parse_gpus(["rtx4070", "h200"], ["My Box 48GB=48"], cat)
    assert g == {"RTX 4070 12GB": 12282, "H200 141GB": 143771, "My Box 48GB": 48 * 1024}
    with pytest.raises(ValueError, match="unknown GPU"):
        vram.parse_gpus(["rtx9999"], None)
    assert len(vram.GPU_CATALOG) >= 13


# --- end to end on SmolLM2: transformers vs llama.cpp on the same weights -------------------------

@pytest.fixture(scope="module")
def smol_ggufs(smollm2_dir, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from quantkit.export import export_gguf
    from quantkit.plan import VARIANTS
    out = tmp_path_factory.mktemp("ggufs")
    return export_gguf(smollm2_dir, [VARIANTS["f16"], VARIANTS["q4_k_m"]], out, progress=False).files


@pytest.mark.slow
def test_bench_transformers_and_llama_cpp_agree_and_a_model_matches_itself(smollm2_dir, smol_ggufs, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["bench", "--baseline", str(smollm2_dir), str(smol_ggufs["f16"]),
                                  str(smol_ggufs["q4_k_m"]), str(smollm2_dir), "--limit-chunks", "6",
                                  "--device", "cpu", "--gpus", "rtx3060,a100-40", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output + (r.stderr or "")
    res = json.loads((out / "report.json").read_text())
    f16, q4, itself = res["variants"]
    assert res["scored_tokens"] == 6 * 255 and res["bos"] is None        # SmolLM2 adds no BOS
    assert abs(f16["ppl"] / res["baseline"]["ppl"] - 1) < 0.005           # same weights, two engines
    # the baseline's log-probabilities are stored rounded to 16/65535 nats: a model is ~1e-6 from itself
    assert abs(itself["kld_mean"]) < 1e-5 and itself["same_top"] == 1.0 and itself["ppl"] == res["baseline"]["ppl"]
    assert q4["kld_mean"] > 10 * f16["kld_mean"] and q4["ppl"] > f16["ppl"]
    assert res["top_k"] == 0 and "whole vocabulary" in (out / "report.md").read_text()
    # the whole vocabulary, independently: transformers' and llama.cpp's logits of the same windows, KL in float64
    exact = _exact_kld(smollm2_dir, smol_ggufs["q4_k_m"], 6)
    print(f"KLD q4_k_m: bench {q4['kld_mean']:.6f}, exact {exact:.6f}, itself {itself['kld_mean']:.2e}")
    assert abs(q4["kld_mean"] / exact - 1) < 0.01, (q4["kld_mean"], exact)
    assert (out / "quality.png").exists() and (out / "vram.png").exists()
    # the baseline is cached: a second run does not compute it again
    monkeypatch.setattr(evaluate, "score_baseline", lambda *a, **k: pytest.fail("baseline recomputed"))
    r = CliRunner().invoke(main, ["bench", "--baseline", str(smollm2_dir), str(smol_ggufs["q4_k_m"]),
                                  "--limit-chunks", "6", "--device", "cpu", "-o", str(tmp_path / "r2"), "-q"])
    assert r.exit_code == 0, r.output + (r.stderr or "")
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["variants"][0]["ppl"] == q4["ppl"]
    # --top-k 128 keeps the old compact baseline, which reads low
    monkeypatch.undo()
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(main, ["bench", "--baseline", str(smollm2_dir), str(smol_ggufs["q4_k_m"]), "--top-k", "128",
                                  "--limit-chunks", "6", "--device", "cpu", "-o", str(tmp_path / "r3"), "-q"])
    assert r.exit_code == 0, r.output + (r.stderr or "")
    top = json.loads((tmp_path / "r3" / "report.json").read_text())["variants"][0]
    assert top["kld_mean"] < 0.97 * q4["kld_mean"] and top["ppl"] == q4["ppl"]


def _exact_kld(model_dir, gguf_path, n_windows: int, ctx: int = 512) -> float:
    """Mean KL(bf16 || GGUF) over the scored halves of the first windows (no BOS: SmolLM2 adds none),
    from transformers (float32 forward of the bf16 weights) and llama-cpp-python directly."""
    import llama_cpp
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok(evaluate.default_text().read_text(encoding="utf-8"))["input_ids"][:n_windows * ctx]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False)
    kls = []
    for i in range(n_windows):
        w = ids[i * ctx:(i + 1) * ctx]
        with torch.no_grad():
            p = torch.log_softmax(model(torch.tensor([w])).logits[0, ctx // 2:ctx - 1].double(), -1)
        llm.reset()
        llm.eval(w)
        q = torch.log_softmax(torch.from_numpy(np.array(llm.scores[ctx // 2:ctx - 1])).double(), -1)
        kls.append((p.exp() * (p - q)).sum(-1))
    llm.close()
    return float(torch.cat(kls).mean())


@pytest.mark.parametrize("args,fragment", [
    (["--text", "SHORT", "VAR"], "needs at least 1024"),
    (["--gpus", "rtx9999", "VAR"], "unknown GPU 'rtx9999'"),
    (["NOPE.gguf"], "NOPE.gguf: not a GGUF file or a HF model directory"),
])
def test_bench_bad_input_is_one_line(args, fragment, smollm2_dir, smol_ggufs, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    args = [str(short) if a == "SHORT" else str(smol_ggufs["q4_k_m"]) if a == "VAR" else
            str(tmp_path / a) if a.endswith(".gguf") else a for a in args]
    r = CliRunner().invoke(main, ["bench", "--baseline", str(smollm2_dir), *args, "-o", str(tmp_path / "o"), "-q"])
    assert r.exit_code != 0
    text = (r.stderr or "") + r.output
    assert fragment in text, text
    assert not (tmp_path / "o" / "report.md").exists()


@pytest.mark.gpu
def test_measured_vram_on_the_gpu(smollm2_dir, smol_ggufs):
    for path, kind in ((smol_ggufs["q4_k_m"], "gguf"), (smollm2_dir, "hf")):
        m = vram.measure(Path(path), kind, contexts=(1024, 4096))
        assert m["source"] == "measured" and m["weights_mib"] > 50
        assert m["at_context"]["4096"] >= m["at_context"]["1024"] > 0


def test_bench_without_matplotlib_stops_before_scoring(tiny_model, tmp_path, monkeypatch):
    # the report's plots need matplotlib: a missing extra is named before any variant is scored
    import importlib.util

    from quantkit.bench import suite
    from quantkit.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(suite, "run", lambda *a, **k: pytest.fail("scored without the report's extras"))
    r = CliRunner().invoke(main, ["bench", "--baseline", str(tiny_model), str(tiny_model), "-o", str(tmp_path / "rep")])
    assert r.exit_code == 2, r.output
    assert "matplotlib" in r.output and "quantkit[bench]" in r.output and not (tmp_path / "rep").exists()


def test_bench_refuses_a_baseline_the_cache_disk_cannot_hold(tiny_model, tmp_path, monkeypatch):
    # the whole-vocabulary baseline's size is known before scoring: too little space is one line
    import shutil
    from collections import namedtuple

    from quantkit.bench import suite
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 12, 10 ** 12, 10 ** 9))
    monkeypatch.setattr(evaluate, "score_baseline", lambda *a, **k: pytest.fail("scored without the space"))
    r = CliRunner().invoke(main, ["bench", "--baseline", str(tiny_model), str(tiny_model), "-o", str(tmp_path / "rep"),
                                  "--device", "cpu", "-q"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "GB are free" in lines[0] and "--top-k 128" in lines[0], r.output
    assert not (tmp_path / "rep").exists() and not list((tmp_path / "cache").rglob("baseline-*"))
    # what it asks for is what the file will take
    model = suite.HFModel(tiny_model)
    *_, windows = suite.load_text(tiny_model, None, 512, None)
    vocab = model.config["vocab_size"]
    assert suite.baseline_bytes(model, windows, 0) >= windows.n_scored * 2 * (vocab + 4)
