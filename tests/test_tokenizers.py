"""The vocabularies of the Llama 2 and Mistral checkpoints: what llama.cpp reads from our GGUF.

SentencePiece (Llama 2, Mistral 7B v0.1 / v0.3): the references are llama.cpp's own SPM test vectors
(Llama 2's vocabulary), the `sentencepiece` library on the tokenizer.model itself (what transformers'
slow LlamaTokenizer wrapped; transformers 5 converts it to a tokenizer.json that handles leading
spaces differently, so it is not the reference here) on WikiText-2, edge strings and a chat prompt,
and convert_hf_to_gguf.py on added tokens and padding. Tekken (Mistral Nemo, Small 3): a byte-level
BPE tokenizer.json, against transformers and the converter. The byte-identity of whole Mistral files
of every type is in test_gguf_export.py.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.bench import gguf_diff
from quantkit.cli import main
from quantkit.export import export_gguf
from quantkit.plan import VARIANTS
from quantkit.testing import llamacpp_ref, synthetic

llama_cpp = pytest.importorskip("llama_cpp")
spm = pytest.importorskip("sentencepiece")
FIX = Path(__file__).parent / "fixtures" / "tokenizers"
WIKI = Path(__file__).resolve().parents[1] / "quantkit" / "data" / "wiki.test.raw"
# one narrow layer: the vocabulary is what is under test
NARROW = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "num_hidden_layers": 1}
EDGE = ["", " ", "  ", "\t", "\n", "\n\n", " Hello", "Hello  world", "trailing  ", "  leading",
        "héllo wörld ñ", "日本語のテキスト", "🦙🚀 👩‍👩‍👧", "\x00\x01\x7f", "a\u200bb", "ﬁ Ａ \u0300",
        "[INST]", "</s>", "<s> hi", "x" * 300, "3.14159 1,000,000", "def f(x):\n\treturn x  # no"]


def checkpoint(dest: Path, preset: str, tokenizer: str, **over) -> Path:
    return synthetic.write_checkpoint(dest, synthetic.preset_config(preset, **{**NARROW, **over}), FIX / tokenizer)


def export_bf16(model: Path, out: Path) -> Path:
    return export_gguf(model, [VARIANTS["bf16"]], out, progress=False).files["bf16"]


def values(path: Path) -> dict:
    return {k: v for k, (_, v) in gguf_diff.metadata(path).items()}


def vocab_only(path: Path):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


# --- Llama 2's vocabulary: llama.cpp's own test vectors --------------------------------------------

def test_llama2_export_passes_llama_cpps_spm_test_vectors(tmp_path):
    model = checkpoint(tmp_path / "llama2", "llama3-tiny", "llama-spm", vocab_size=32000, bos_token_id=1,
                       eos_token_id=2, rope_scaling=None)
    g = export_bf16(model, tmp_path / "out")
    meta = values(g)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    vectors = llamacpp_ref.vocab_test_vectors(FIX / "ggml-vocab-llama-spm.gguf.inp")
    assert len(vectors) == 46
    llm = vocab_only(g)
    bad = [(t, ids) for t, ids in vectors if llm.tokenize(t.encode(), add_bos=False, special=False) != ids]
    assert not bad, f"{len(bad)} of {len(vectors)} test vectors tokenize differently, e.g. {bad[0]!r}"


# --- Mistral: llama.cpp tokenizes as sentencepiece does ------------------------------------------

@pytest.fixture(scope="module", params=["mistral-v3", "mistral-v1"])
def mistral(request, tmp_path_factory):
    tok = request.param
    sp = spm.SentencePieceProcessor(model_file=str(FIX / tok / "tokenizer.model"))
    root = tmp_path_factory.mktemp(tok)
    model = checkpoint(root / tok, "mistral-tiny", tok, vocab_size=sp.vocab_size())
    return tok, sp, export_bf16(model, root / "out")


def test_wikitext_and_edge_strings_tokenize_as_sentencepiece(mistral):
    tok, sp, g = mistral
    llm = vocab_only(g)
    lines = [line for line in WIKI.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert len(lines) > 2000
    bos = [sp.bos_id()]   # tokenizer_config.json: add_bos_token
    bad = [t for t in lines + EDGE if llm.tokenize(t.encode(), add_bos=True, special=False) != bos + sp.encode(t)]
    assert not bad, f"{tok}: {len(bad)} strings tokenize differently, e.g. {bad[0]!r}"
    whole = WIKI.read_text(encoding="utf-8")[:100_000]
    assert llm.tokenize(whole.encode(), add_bos=True, special=False) == bos + sp.encode(whole)


def test_chat_prompt_tokenizes_as_the_slow_tokenizer(mistral):
    """The rendered [INST] prompt: control pieces as themselves, each text between them encoded by
    sentencepiece alone (transformers' legacy LlamaTokenizer)."""
    tok, sp, g = mistral
    cfg = json.loads((FIX / tok / "tokenizer_config.json").read_text())
    if "chat_template" not in cfg:
        pytest.skip(f"{tok} is a base model's tokenizer (no chat template)")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(FIX / tok)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": " What is 2+2?\n"}]
    prompt = hf.apply_chat_template(msgs, tokenize=False)
    assert "[INST]" in prompt and prompt.startswith("<s>")
    specials = {e["content"]: int(i) for i, e in cfg["added_tokens_decoder"].items() if e["special"]}
    expected = []
    for part in re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", prompt):
        expected += [specials[part]] if part in specials else sp.encode(part) if part else []
    llm = vocab_only(g)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == expected
    meta = values(g)
    assert meta["tokenizer.chat_template"] == cfg["chat_template"]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False


# --- added tokens, padding, add_prefix_space: as convert_hf_to_gguf.py writes them -----------------

def test_added_tokens_and_padding_equal_the_converter(tmp_path):
    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    model = checkpoint(tmp_path / "m", "mistral-tiny", "mistral-v1", vocab_size=32010)
    # a fine-tune's ChatML tokens (added_tokens.json: user-defined), tokenizer_config.json entries
    # (special → control, "<|...|>" shaped → control, plain → user-defined with ▁ as space), and
    # ids 32005.. the tokenizer lacks ([PAD<id>], unused)
    (model / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 32000, "<|im_end|>": 32001}))
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["add_prefix_space"] = False
    cfg["added_tokens_decoder"].update({
        "32001": {"content": "<|im_end|>", "special": True},
        "32002": {"content": "<|tool|>", "special": False},
        "32003": {"content": "▁custom", "special": False},
        "32004": {"content": "[MASK]", "special": True}})
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = export_bf16(model, tmp_path / "ours")
    ref = llamacpp_ref.convert_hf_to_gguf(model, tmp_path / "ref.gguf", "bf16")
    assert not gguf_diff.metadata_differences(ours, ref)
    assert gguf_diff.compare(ours, ref, same_order=False)["identical_tensors"]
    meta = values(ours)
    assert meta["tokenizer.ggml.tokens"][32000:32006] == ["<|im_start|>", "<|im_end|>", "<|tool|>", " custom",
                                                          "[MASK]", "[PAD32005]"]


# --- Tekken (Mistral Nemo, Small 3): byte-level BPE, pre-tokenizer "tekken" -------------------------

@pytest.fixture(scope="module")
def nemo(tmp_path_factory):
    root = tmp_path_factory.mktemp("nemo")
    # Nemo's own head_dim (128, not hidden / heads) kept
    model = checkpoint(root / "nemo", "mistral-nemo-12b", "tekken", **{**NARROW, "hidden_size": 256, "head_dim": 128})
    return model, export_gguf(model, [VARIANTS["bf16"], VARIANTS["q8_0"]], root / "out", progress=False).files


# llama_model_quantize logs a piece of a multi-byte token, which llama-cpp-python's log callback fails to decode
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_tekken_export_equals_the_converter(nemo, tmp_path):
    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    model, ours = nemo
    ref = llamacpp_ref.convert_hf_to_gguf(model, tmp_path / "ref.gguf", "bf16")
    assert not gguf_diff.metadata_differences(ours["bf16"], ref)
    assert gguf_diff.compare(ours["bf16"], ref, same_order=False)["identical_tensors"]
    q8 = llamacpp_ref.llama_quantize(ref, tmp_path / "ref-q8_0.gguf", "q8_0")
    assert gguf_diff.file_difference(ours["q8_0"], q8) is None
    meta = values(ours["bf16"])
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "tekken")
    assert meta["llama.attention.key_length"] == 128


def test_tekken_tokenizes_as_transformers(nemo):
    transformers = pytest.importorskip("transformers")
    model, ours = nemo
    hf = transformers.AutoTokenizer.from_pretrained(model)
    llm = vocab_only(ours["bf16"])
    lines = [line for line in WIKI.read_text(encoding="utf-8").split("\n") if line.strip()]
    plain = [e for e in EDGE if not re.search(r"\[INST\]|</?s>", e)]      # transformers splits special tokens out
    bad = [t for t in lines + plain if llm.tokenize(t.encode(), add_bos=True, special=False) != hf(t).input_ids]
    assert not bad, f"{len(bad)} strings tokenize differently, e.g. {bad[0]!r}"
    for t in ["[INST]", "</s>", "<s> hi", "a[INST]b[/INST]c</s>"]:
        assert llm.tokenize(t.encode(), add_bos=True, special=True) == hf(t).input_ids, t
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": " What is 2+2?\n"}]
    prompt = hf.apply_chat_template(msgs, tokenize=False)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == hf(prompt, add_special_tokens=False).input_ids


def test_tekken_modelfile_has_the_inst_template(nemo, tmp_path):
    from quantkit.ollama import modelfile

    model, _ = nemo
    text = modelfile("nemo.gguf", model)
    assert "[INST]{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}" in text
    assert re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M)[-1] == "</s>"


# --- bad input -----------------------------------------------------------------------------------

def _one_line_error(model: Path, out: Path, fragments: list[str]) -> None:
    r = CliRunner().invoke(main, ["export", str(model), "--gguf", "q8_0", "-o", str(out), "-q"])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("quantkit: error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert not out.exists()


def test_vocab_larger_than_the_config_is_refused(tmp_path):
    model = checkpoint(tmp_path / "m", "mistral-tiny", "mistral-v3", vocab_size=32000)   # v0.3 has 32768
    _one_line_error(model, tmp_path / "out", ["tokenizer.model", "32768 pieces", "vocab_size is 32000"])


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "empty"])
def test_a_damaged_tokenizer_model_is_refused(tmp_path, damage):
    model = checkpoint(tmp_path / "m", "mistral-tiny", "mistral-v1", vocab_size=32000)
    f = model / "tokenizer.model"
    f.write_bytes({"corrupt": b"\x0a\xff\xff\xff\x0fnot a model", "truncated": f.read_bytes()[:1000],
                   "empty": b""}[damage])
    _one_line_error(model, tmp_path / "out", [str(f), "not a SentencePiece model"])


def test_an_added_token_beyond_the_vocab_is_refused(tmp_path):
    model = checkpoint(tmp_path / "m", "mistral-tiny", "mistral-v1", vocab_size=32000)
    (model / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 32000}))
    _one_line_error(model, tmp_path / "out", ["added_tokens.json", "32000", "vocab_size 32000"])


def test_a_sentencepiece_tokenizer_json_without_its_model_is_refused(tmp_path):
    model = checkpoint(tmp_path / "m", "mistral-tiny", "mistral-v3", vocab_size=32768)
    (model / "tokenizer.model").unlink()
    _one_line_error(model, tmp_path / "out", ["tokenizer.json", "tokenizer.model"])
    shutil.rmtree(model)
