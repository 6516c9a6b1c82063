"""End to end on the real SmolLM2-135M-Instruct checkpoint (the bundled default model).

References, all independent of quantkit:
- llama.cpp's flow: convert_hf_to_gguf.py (vendored in the llama-cpp-python sdist) to bf16/f16, then
  llama_model_quantize (what llama-quantize runs) to Q8_0 / Q5_K_M / Q4_K_M;
- llama.cpp (llama-cpp-python) loading and running our files;
- transformers: the HF tokenizer, the chat template and the model's forward pass.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantkit.bench import gguf_diff
from quantkit.testing import llamacpp_ref
from quantkit.export import export_gguf
from quantkit.plan import VARIANTS

llama_cpp = pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
QUANTIZED = ["q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q4_0"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colours."}],
    [{"role": "user", "content": "Write a haiku about rain."},
     {"role": "assistant", "content": "Soft rain on the roof,\nthe garden drinks it slowly."},
     {"role": "user", "content": "Now one about snow, in   French, with 3 digits: 123."}],
]


@pytest.fixture(scope="module")
def files(smollm2_dir, tmp_path_factory):
    """Our export (one pass, nine types) and llama.cpp's files for the same weights."""
    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    root = tmp_path_factory.mktemp("smollm2")
    ours = export_gguf(smollm2_dir, [VARIANTS[v] for v in QUANTIZED + ["bf16", "f16"]], root / "ours",
                       progress=False).files
    ref = {t: llamacpp_ref.convert_hf_to_gguf(smollm2_dir, root / f"ref-{t}.gguf", t) for t in ("bf16", "f16")}
    for v in QUANTIZED:
        ref[v] = llamacpp_ref.llama_quantize(ref["bf16"], root / f"ref-{v}.gguf", v)
    return ours, ref


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def q8(files):
    return llama_cpp.Llama(model_path=str(files[0]["q8_0"]), n_ctx=512, logits_all=True, verbose=False)


@pytest.mark.parametrize("variant", QUANTIZED)
def test_smollm2_quantized_file_is_byte_identical_to_llama_quantize(files, variant):
    ours, ref = files
    diff = gguf_diff.file_difference(ours[variant], ref[variant])
    assert diff is None, f"{variant}: {diff}"


@pytest.mark.parametrize("outtype", ["bf16", "f16"])
def test_smollm2_float_file_has_the_converters_tensors(files, outtype):
    ours, ref = files
    result = gguf_diff.compare(ours[outtype], ref[outtype], same_order=False)
    assert result["identical_tensors"], f"{outtype}: {result}"


@pytest.mark.parametrize("variant", ["q4_k_m", "q8_0", "f16"])
def test_smollm2_metadata_equals_llama_cpps(files, variant):
    ours, ref = files
    diff = gguf_diff.metadata_differences(ours[variant], ref[variant])
    assert not diff, diff


def test_llama_cpp_tokenizes_wikitext_like_the_hf_tokenizer(files, hf_tokenizer):
    import unicodedata

    lines = (REPO / "quantkit" / "data" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")
    vocab = llama_cpp.Llama(model_path=str(files[0]["q4_k_m"]), vocab_only=True, verbose=False)
    differ = [line for line in lines
              if vocab.tokenize(line.encode(), add_bos=False, special=False)
              != hf_tokenizer(line, add_special_tokens=False)["input_ids"]]
    # llama.cpp's "smollm" pre-tokenizer (the one convert_hf_to_gguf.py names for SmolLM2) splits
    # every \p{N} character; the HF Digits pre-tokenizer only ASCII digits. WikiText-2's test file
    # has one such line ("4 ½ months"): that is llama.cpp's behaviour, the same with its own files.
    explained = [line for line in differ
                 if any(unicodedata.category(c).startswith("N") and not c.isascii() for c in line)]
    assert len(lines) > 4000 and differ == explained, [line[:120] for line in differ if line not in explained][:3]
    assert len(differ) <= 2, len(differ)


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_renders_and_tokenizes_like_hf(files, hf_tokenizer, chat):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    msgs = CHATS[chat]
    vocab = llama_cpp.Llama(model_path=str(files[0]["q8_0"]), vocab_only=True, verbose=False)
    meta = vocab.metadata
    token = lambda key: vocab.detokenize([int(meta[key])], special=True).decode()  # noqa: E731
    fmt = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=token("tokenizer.ggml.eos_token_id"),
                              bos_token=token("tokenizer.ggml.bos_token_id"), add_generation_prompt=True)
    prompt = fmt(messages=msgs).prompt
    expected = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == expected
    ids = vocab.tokenize(prompt.encode(), add_bos=bool(meta.get("tokenizer.ggml.add_bos_token") == "true"),
                         special=True)
    assert ids == hf_tokenizer(expected, add_special_tokens=True)["input_ids"]


def _greedy_llama(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out: list[int] = []
    llm.eval(ids)
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    # the bf16 weights, computed in float32
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def test_q8_0_greedy_output_starts_like_hf_bf16(q8, hf_model, hf_tokenizer):
    n, agree = 12, []
    for msgs in CHATS:
        ids = hf_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        with torch.no_grad():
            hf = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                   pad_token_id=hf_tokenizer.eos_token_id)[0, len(ids):].tolist()
        ll = _greedy_llama(q8, ids, len(hf))
        agree.append(next((i for i, (a, b) in enumerate(zip(hf, ll)) if a != b), len(hf)))
        assert agree[-1] >= 4, (hf_tokenizer.decode(hf), hf_tokenizer.decode(ll))
    assert sum(agree) >= 2 * n, agree      # most continuations agree for most of their length


def test_bf16_gguf_logits_match_transformers(files, hf_model, hf_tokenizer):
    text = (REPO / "quantkit" / "data" / "wiki.test.raw").read_text(encoding="utf-8")[:4000]
    ids = hf_tokenizer(text)["input_ids"][:128]
    llm = llama_cpp.Llama(model_path=str(files[0]["bf16"]), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(ids)
    ours = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].double().numpy()
    # same weights, different kernels: agreement up to float rounding. A wrong q/k permutation,
    # tensor mapping or rope parameter gives differences of several units and a top-1 rate near 0.
    err = np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert np.median(err) < 0.01 and err.max() < 0.05, (np.median(err), err.max())
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("variant", ["q5_k_m", "q4_k_m"])
def test_llama_cpp_runs_the_k_quant_files(files, variant, hf_tokenizer):
    llm = llama_cpp.Llama(model_path=str(files[0][variant]), n_ctx=128, logits_all=True, verbose=False)
    ids = hf_tokenizer("The capital of France is")["input_ids"]
    out = _greedy_llama(llm, ids, 4)
    assert "Paris" in hf_tokenizer.decode(out)
