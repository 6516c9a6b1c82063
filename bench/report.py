"""The report: report.json (everything), report.md (tables a person reads at a glance, and a model-card
section ready to paste), quality.png (perplexity and KL divergence against file size) and vram.png
(VRAM per variant at 4k/8k/32k context against the GPU tiers).

Everything here is computed from the results dict, so a report can be rebuilt from report.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from quantkit.errors import UnsupportedError
from quantkit.outputs import write_text_atomic

from . import vram
from .decode import NEW as NEW_TOKENS

# what the model-card notes call a variant
NEAR_LOSSLESS_KLD = 0.005       # mean KLD below this: indistinguishable in practice (Q8_0 territory)
RECOMMENDED_KLD = 0.1           # the smallest variant below this and within RECOMMENDED_PPL_RATIO
RECOMMENDED_PPL_RATIO = 1.05
CARD_CONTEXT = 8192             # "runs on" in the model card: fits with this much context


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def notes(results: dict) -> dict[str, str]:
    """variant name -> "near-lossless" / "recommended" / "" (by the thresholds above)."""
    out = {v["name"]: "" for v in results["variants"]}
    for v in results["variants"]:
        if v["kld_mean"] < NEAR_LOSSLESS_KLD:
            out[v["name"]] = "near-lossless"
    ok = [v for v in results["variants"] if v["kld_mean"] < RECOMMENDED_KLD and v["ppl_ratio"] < RECOMMENDED_PPL_RATIO]
    if ok:
        best = min(ok, key=lambda v: v["file_bytes"])
        out[best["name"]] = "recommended" + (", near-lossless" if out[best["name"]] else "")
    return out


def pareto(results: dict) -> set[str]:
    """The variants no other variant beats on both size and mean KLD (smaller or equal on both,
    smaller on one): the size/quality front."""
    vs = results["variants"]
    return {v["name"] for v in vs
            if not any(o["file_bytes"] <= v["file_bytes"] and o["kld_mean"] <= v["kld_mean"]
                       and (o["file_bytes"] < v["file_bytes"] or o["kld_mean"] < v["kld_mean"]) for o in vs)}


def best_fits(results: dict, context: int = CARD_CONTEXT) -> dict[str, str | None]:
    """GPU -> the row (name) closest to bf16 whose weights and `context` tokens fit on it: the
    baseline where it fits, else the variant of lowest mean KLD; None where nothing fits."""
    rows = _all_rows(results)
    kld = {r["name"]: (0.0 if r is rows[0] else r["kld_mean"]) for r in rows}
    out = {}
    for g, per in results["fits"].items():
        ok = [r["name"] for r in rows if per[r["name"]] >= min(context, results["arch"].get("max_ctx") or context)]
        out[g] = min(ok, key=lambda n: kld[n]) if ok else None
    return out


def _within(results: dict, ctx: int | str) -> bool:
    """Whether the model can use this context at all (its max_position_embeddings)."""
    m = results["arch"].get("max_ctx") or 0
    return not m or int(ctx) <= m


def _label(v: dict) -> str:
    return v.get("label") or v["name"]


def _all_rows(results: dict) -> list[dict]:
    """The baseline as a row beside the variants (for the VRAM and GPU tables)."""
    b = dict(results["baseline"], label=results["baseline"].get("label", "BF16"))
    return [b] + results["variants"]


def markdown(results: dict) -> str:
    base, variants = results["baseline"], results["variants"]
    n = notes(results)
    est = any(r.get("vram", {}).get("source") == "estimated" for r in _all_rows(results))
    front = pareto(results)
    lines = [f"# Quantization report: {results['model']}", "",
             f"{results['date']} · {results['machine'].get('gpu') or results['machine'].get('cpu', 'CPU')} · "
             f"text `{results['text']['name']}` ({results['scored_tokens']:,} scored tokens, ctx {results['ctx']}, "
             f"{results['chunks']} windows) · baseline `{base['name']}` via {base['backend']}", "",
             "## Quality", "",
             "| Variant | Size | PPL | ΔPPL | Mean KLD | KLD 99% | Top-1 agreement | Tokens/s | Note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
             f"| {_label(base)} (baseline) | {_size(base['file_bytes'])} | {base['ppl']:.4f} ± {base['ppl_err']:.4f} "
             f"| — | — | — | — | {base.get('tokens_per_s', 0):,.0f} | |"]
    for v in variants:
        lines.append(f"| {_label(v)} | {_size(v['file_bytes'])} | {v['ppl']:.4f} ± {v['ppl_err']:.4f} | "
                     f"{v['ppl_diff']:+.4f} ± {v['ppl_diff_err']:.4f} ({100 * (v['ppl_ratio'] - 1):+.2f}%) | "
                     f"{v['kld_mean']:.5f} ± {v['kld_mean_err']:.5f} | {v['kld_p99']:.4f} | "
                     f"{100 * v['same_top']:.2f} ± {100 * v['same_top_err']:.2f}% | {v['tokens_per_s']:,.0f} | "
                     f"{', '.join(x for x in (n[v['name']], 'Pareto' if v['name'] in front else '') if x)} |")
    k = results.get("top_k", 128)
    lines += ["", "Pareto: no other variant is both smaller and closer to the baseline (mean KLD)."]
    over = ("the whole vocabulary, as llama-perplexity --kl-divergence computes it" if k == 0 else
            f"the baseline's top {k} tokens plus the remaining mass, which reads low")
    lines += ["", "PPL ± its standard error as llama-perplexity computes it; ΔPPL and KLD against the baseline on the "
              f"same tokens (KLD over {over}).", ""]

    ctxs = [str(c) for c in results["contexts"]]
    lines += ["## VRAM" + (" (estimated)" if est else ""), "",
              "| Variant | Weights | " + " | ".join(f"{vram.human_ctx(int(c))} context" for c in ctxs) + " | Source |",
              "| --- | ---: | " + " | ".join("---:" for _ in ctxs) + " | --- |"]
    for r in _all_rows(results):
        d = r["vram"]
        lines.append(f"| {_label(r)} | {vram.gib(d['weights_mib'])} | "
                     + " | ".join(vram.gib(d["at_context"][c]) if _within(results, c) else "beyond max context"
                                  for c in ctxs) + f" | {d['source']} |")
    lines += ["", f"Estimated: weights + fp16 KV cache ({results['arch']['kv_mib_per_1k_tokens']} MiB per 1k tokens) + "
              f"compute buffers; measured: device memory from the driver in a fresh process per variant.", ""]

    rows = _all_rows(results)
    best = best_fits(results)
    label = {r["name"]: _label(r) for r in rows}
    lines += [f"## Which GPU runs which variant (longest context, {vram.HEADROOM_MIB} MiB kept free)", "",
              "| GPU | " + " | ".join(_label(r) for r in rows) + f" | Best at {vram.human_ctx(CARD_CONTEXT)} |",
              "| --- | " + " | ".join("---:" for _ in rows) + " | --- |"]
    for g, per in results["fits"].items():
        lines.append(f"| {g} | " + " | ".join(vram.human_ctx(per[r["name"]]) for r in rows)
                     + f" | {label[best[g]] if best[g] else '—'} |")
    lines += ["", "— : the weights do not fit. Contexts are capped at the model's own maximum. Best: the variant "
              f"closest to the baseline (lowest mean KLD; the baseline itself where it fits) that runs "
              f"{vram.human_ctx(CARD_CONTEXT)} tokens of context on that GPU.", "",
              *decode_table(results), "![quality](quality.png)", "", "![vram](vram.png)", "", model_card(results)]
    return "\n".join(lines) + "\n"


def decode_table(results: dict) -> list[str]:
    """Decode speed per GPU and variant, measured (m) where a GPU type ran it, estimated (e) from
    memory bandwidth elsewhere; then who measured what."""
    d = results.get("decode")
    if not d:
        return []
    rows = _all_rows(results)
    cal = (f"calibrated on {', '.join(d['calibrated_on'])}: {100 * d['efficiency']:.0f}% of the bandwidth reached"
           if d["calibrated_on"] else f"uncalibrated: no GPU measured here, {100 * d['efficiency']:.0f}% of the "
           "bandwidth assumed")
    lines = [f"## Decode speed (tokens/s at {d['context']} tokens of context)", "",
             "| GPU | " + " | ".join(_label(r) for r in rows) + " |", "| --- | " + " | ".join("---:" for _ in rows) + " |"]
    for g, per in d["per_gpu"].items():
        cells = []
        for r in rows:
            e = per.get(r["name"])
            cells.append("—" if e is None else f"{e['tokens_per_s']:,.0f} " + ("(e)" if e["source"] == "estimated" else
                                                                               "(m)" if e["source"] == "measured" else "(cpu)"))
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += ["", f"(m) measured: {NEW_TOKENS} tokens decoded one at a time; (e) estimated: bandwidth × efficiency / bytes "
              f"read per token (the active weights and the KV cache; {cal}); (cpu) measured on a node that has no "
              "CUDA device, on its CPU. — : no bandwidth known.", ""]
    who = results.get("measurements") or []
    if who:
        lines += ["| Measured | On | Node | Host | Device |", "| --- | --- | --- | --- | --- |"]
        label = {r["name"]: _label(r) for r in rows}
        for m in who:
            device = f"failed: {m['error']}" if m.get("error") else m.get("gpu_name") or m["device"]
            lines.append(f"| {label.get(m['row'], m['row'])} | {m['gpu_type']} | {(m.get('node') or '')[:12]} | "
                         f"{m.get('host') or ''} | {device} |")
        lines.append("")
    return lines


def model_card(results: dict) -> str:
    """The paste-ready section, in the style of the model cards people publish."""
    n = notes(results)
    rows = _all_rows(results)
    gpus = results["gpus"]
    lines = ["## Model card section", "", "```markdown", "## Inference Requirements", "",
             f"| Variant | VRAM ({vram.human_ctx(CARD_CONTEXT)} context) | Runs on |", "| --- | ---: | --- |"]
    for r in rows:
        at = r["vram"]["at_context"].get(str(CARD_CONTEXT)) or max(r["vram"]["at_context"].values())
        fit = sorted((g for g, per in results["fits"].items() if per[r["name"]] >= CARD_CONTEXT), key=lambda g: gpus[g])
        lines.append(f"| {_label(r)} | ~{vram.gib(at)} | {', '.join(fit[:5]) + (' …' if len(fit) > 5 else '') or '—'} |")
    lines += ["", "## Available Files", "", "| File | Quant | Size | PPL (WikiText-2) | Notes |", "| --- | --- | ---: | ---: | --- |"]
    for v in results["variants"]:
        lines.append(f"| `{Path(v['path']).name}` | {_label(v)} | {_size(v['file_bytes'])} | {v['ppl']:.3f} | "
                     f"{n[v['name']]} |")
    b = results["baseline"]
    lines += [f"| `{Path(b['path']).name}/` | {_label(b)} | {_size(b['file_bytes'])} | {b['ppl']:.3f} | original |",
              "```", ""]
    return "\n".join(lines)


def _label_offsets(xs: list[float]) -> list[tuple[int, int]]:
    """Point-label offsets: labels of points closer than 3% of the x range alternate above and below."""
    span = (max(xs) - min(xs)) or 1.0
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [(6, 4)] * len(xs)
    for prev, i in zip(order, order[1:]):
        if xs[i] - xs[prev] < 0.03 * span and out[prev] == (6, 4):
            out[i] = (6, -14)
    return out


def plots(results: dict, out_dir: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise UnsupportedError("the report's plots need matplotlib: pip install 'quantkit[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, variants = results["baseline"], results["variants"]
    pts = [base] + variants
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    offsets = _label_offsets([v["file_bytes"] for v in pts])
    for v, off in zip(pts, offsets):
        x = v["file_bytes"] / 1e9
        a1.errorbar(x, v["ppl"], yerr=v["ppl_err"], fmt="o", capsize=3, color="k" if v is base else "C0")
        a1.annotate(_label(v), (x, v["ppl"]), textcoords="offset points", xytext=off, fontsize=9)
    a1.axhline(base["ppl"], ls="--", lw=0.8, color="gray")
    a1.set(xlabel="file size (GB)", ylabel=f"perplexity ({results['text']['name']}, ctx {results['ctx']})",
           title="Perplexity vs size")
    for v, off in zip(variants, _label_offsets([v["file_bytes"] for v in variants])):
        x = v["file_bytes"] / 1e9
        a2.errorbar(x, v["kld_mean"], yerr=[[0], [max(0.0, v["kld_p99"] - v["kld_mean"])]], fmt="o", capsize=3,
                    color="C1")
        a2.annotate(_label(v), (x, v["kld_mean"]), textcoords="offset points", xytext=off, fontsize=9)
    front = sorted((v for v in variants if v["name"] in pareto(results)), key=lambda v: v["file_bytes"])
    if len(front) > 1:
        a2.plot([v["file_bytes"] / 1e9 for v in front], [v["kld_mean"] for v in front], "-", color="C2", lw=1,
                label="Pareto front")
        a2.legend(fontsize=8)
    if variants and min(v["kld_mean"] for v in variants) > 0:
        a2.set_yscale("log")
    a2.set(xlabel="file size (GB)", ylabel="mean KLD vs baseline (bar: 99th percentile)", title="KL divergence vs size")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.margins(x=0.15)          # room for the point labels
    fig.tight_layout()
    q = out_dir / "quality.png"
    fig.savefig(q, dpi=120)
    plt.close(fig)

    rows = _all_rows(results)
    ctxs = [str(c) for c in results["contexts"] if _within(results, c)]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(ctxs)
    for j, c in enumerate(ctxs):
        ax.bar([i + (j - (len(ctxs) - 1) / 2) * width for i in range(len(rows))],
               [r["vram"]["at_context"][c] / 1024 for r in rows], width, label=f"{vram.human_ctx(int(c))} context")
    tiers: dict[int, list[str]] = {}
    for g, mib in results["gpus"].items():
        tiers.setdefault(round(mib / 1024), []).append(g.rsplit(" ", 1)[0])
    top = max(r["vram"]["at_context"][ctxs[-1]] for r in rows) / 1024
    for gb, names in sorted(tiers.items()):
        usable = gb - vram.HEADROOM_MIB / 1024
        if usable > top * 1.6 and gb != min(t for t in tiers if t - vram.HEADROOM_MIB / 1024 > top):
            continue                # tiers far above every bar add nothing; keep the first one that clears all
        ax.axhline(usable, ls="--", lw=0.8, color="gray")
        ax.text(len(rows) - 0.5, usable, f" {gb} GB: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}",
                va="bottom", ha="right", fontsize=8, color="dimgray")
    est = any(r["vram"]["source"] == "estimated" for r in rows)
    ax.set(xticks=range(len(rows)), xticklabels=[_label(r) for r in rows], ylabel="GB",
           title="VRAM per variant" + (" (estimated)" if est else " (measured)") + " against GPU tiers (usable memory)")
    ax.legend(loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    v = out_dir / "vram.png"
    fig.savefig(v, dpi=120)
    plt.close(fig)
    return [q, v]


def write(results: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in (("report.json", json.dumps(results, indent=2) + "\n"), ("report.md", markdown(results))):
        write_text_atomic(out_dir / name, text)
        files.append(out_dir / name)
    return files + plots(results, out_dir)
