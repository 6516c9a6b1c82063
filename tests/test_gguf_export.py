"""Whole-file checks: our one-pass export vs llama.cpp's convert_hf_to_gguf.py + llama_model_quantize.

Tiny models of every family (real configs shrunk to 256 wide so the K-quant path is used, the
real tokenizers of each family: byte-level BPE and SentencePiece) are exported by both flows; every tensor must have the same name,
type, shape and bytes, and the metadata must be equal. llama.cpp then loads our files and must
tokenize llama.cpp's own tokenizer test vectors as expected.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantkit import families
from quantkit.bench import gguf_diff
from quantkit.testing import llamacpp_ref, synthetic
from quantkit.export import export_gguf
from quantkit.hfmodel import HFModel
from quantkit.plan import VARIANTS

llama_cpp = pytest.importorskip("llama_cpp")
FIX = Path(__file__).parent / "fixtures" / "tokenizers"
QUANTIZED = ["q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q5_1", "q5_0", "q4_1", "q4_0"]
# with an importance matrix, the files whose tensors reach every weighted search once: Q4_K / Q6_K
# (Q4_K_M), Q5_K, Q5_0 / Q5_1 (Q5_0's imatrix guard), Q4_0 / Q4_1 (kernels: test_kernels_vs_ggml)
WITH_IMATRIX = ["q4_k_m", "q5_k_s", "q5_0", "q4_0", "q4_1"]
ALL = [VARIANTS[v] for v in QUANTIZED + ["bf16", "f16"]]
# IQ4_NL / IQ4_XS take ~15x the K-quants' time here and in llama-quantize: their whole files are
# checked on the families whose tokenizer has 32k tokens, a dense one (Mistral), a tied one (Gemma 3:
# token_embd takes the output's Q6_K) and the 8-expert one (Mixtral: attn_output in Q5_K)
IQ4 = ["iq4_nl", "iq4_xs"]
IQ4_FAMILIES = {"mistral", "gemma3", "mixtral"}
IQ4_ELSEWHERE = "IQ4 files are checked on mistral, gemma3 and mixtral (32k vocabularies): the suite's budget"


def quantized_types(family: str) -> list[str]:
    return QUANTIZED + (IQ4 if family in IQ4_FAMILIES else [])

# every registered family with test fixtures: a tiny random checkpoint of its shrunk preset with its
# real tokenizer, llama.cpp's test vectors for that tokenizer
FAMILIES = {name: f for name, f in families.FAMILIES.items() if f.fixture is not None}
# values per row chunk: 2 heads (128 rows of 256), so that a q/k permute is applied chunk by chunk
CHUNK_VALUES = 1 << 15


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    fam = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = root / f"{request.param}-tiny"
    synthetic.write_checkpoint(model, synthetic.preset_config(tiny_preset(fam), tie_word_embeddings=fam.fixture.tied),
                               FIX / fam.fixture.tokenizer)
    ours = export_gguf(model, [VARIANTS[v] for v in quantized_types(request.param) + ["bf16", "f16"]], root / "ours",
                       progress=False, chunk_values=CHUNK_VALUES)
    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    ref = {"bf16": llamacpp_ref.convert_hf_to_gguf(model, root / "ref-bf16.gguf", "bf16"),
           "f16": llamacpp_ref.convert_hf_to_gguf(model, root / "ref-f16.gguf", "f16")}
    for v in quantized_types(request.param):
        ref[v] = llamacpp_ref.llama_quantize(ref["bf16"], root / f"ref-{v}.gguf", v)
    return request.param, ours, ref


@pytest.mark.parametrize("variant", QUANTIZED + IQ4)
def test_quantized_file_is_byte_identical_to_llama_quantize(exported, variant):
    family, ours, ref = exported
    if variant not in ref:
        pytest.skip(IQ4_ELSEWHERE)
    # the whole file: header, keys in llama-quantize's order, alignment, every tensor's bytes
    diff = gguf_diff.file_difference(ours.files[variant], ref[variant])
    assert diff is None, f"{family} {variant}: {diff}"


@pytest.mark.parametrize("variant", ["bf16", "f16"])
def test_float_file_matches_converter_tensor_for_tensor(exported, variant):
    family, ours, ref = exported
    # the converter writes tensors in checkpoint order; we write llama-quantize's order
    result = gguf_diff.compare(ours.files[variant], ref[variant], same_order=False)
    assert result["identical_tensors"], f"{family} {variant}: {result}"


@pytest.mark.parametrize("variant", ["bf16", "q4_k_m"])
def test_metadata_equals_converter(exported, variant):
    family, ours, ref = exported
    diff = gguf_diff.metadata_differences(ours.files[variant], ref[variant])
    assert not diff, f"{family}: metadata differs: {diff}"


@pytest.fixture(scope="module")
def with_imatrix(exported):
    """The same model with an importance matrix (quantkit's, from a few random token rows): every
    quantized type ours, and llama_model_quantize's with that imatrix."""
    import torch

    from quantkit.imatrix import collect, write

    family, ours, ref = exported
    if not FAMILIES[family].imatrix:
        pytest.skip(f"{family}: no importance matrix yet (MoE experts)")
    root = ours.files["q8_0"].parent.parent
    model = root / f"{family}-tiny"
    vocab = families.hparams_of(HFModel(model)).n_vocab
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    path = write(collect(model, tokens=tokens, progress=False), root / "imatrix.gguf")
    types = WITH_IMATRIX + (IQ4 if family in IQ4_FAMILIES else [])
    ours_im = export_gguf(model, [VARIANTS[v] for v in types], root / "ours-imatrix", progress=False,
                          chunk_values=CHUNK_VALUES, imatrix=path)
    weights, overrides = llamacpp_ref.read_imatrix(path), llamacpp_ref.imatrix_overrides(str(path))
    refs = {v: llamacpp_ref.llama_quantize(ref["bf16"], root / f"ref-imatrix-{v}.gguf", v, imatrix=weights,
                                           kv_overrides=overrides) for v in types}
    return family, ours_im, refs


@pytest.mark.parametrize("variant", WITH_IMATRIX + IQ4)
def test_file_with_an_imatrix_is_byte_identical_to_llama_quantize(with_imatrix, exported, variant):
    family, ours, ref = with_imatrix
    if variant not in ref:
        pytest.skip(IQ4_ELSEWHERE)
    diff = gguf_diff.file_difference(ours.files[variant], ref[variant])
    assert diff is None, f"{family} {variant} with an imatrix: {diff}"
    if variant in ("q4_k_m", "iq4_xs"):     # and the imatrix was used: the tensors differ from the plain file's
        assert not gguf_diff.compare(ours.files[variant], exported[1].files[variant])["identical_tensors"]


def tiny_preset(fam) -> str:
    return next(p for p in fam.presets if p.endswith("-tiny"))


@pytest.mark.parametrize("variant", ["q8_0", "q4_k_m"])
def test_llama_cpp_loads_export_and_tokenizes_test_vectors(exported, variant):
    family, ours, _ = exported
    llm = llama_cpp.Llama(model_path=str(ours.files[variant]), n_ctx=64, verbose=False)
    if FAMILIES[family].fixture.vectors:   # (Mistral's vocabulary has none: tests/test_sentencepiece.py)
        vectors = llamacpp_ref.vocab_test_vectors(FIX / f"{FAMILIES[family].fixture.vectors}.inp")
        assert len(vectors) == 46
        bad = [(text, ids) for text, ids in vectors
               if llm.tokenize(text.encode(), add_bos=False, special=False) != ids]
        assert not bad, f"{len(bad)} of {len(vectors)} test vectors tokenize differently, e.g. {bad[0]!r}"
    # and the model runs: one forward pass gives finite logits
    toks = llm.tokenize(b"Hello world", add_bos=True)
    llm.eval(toks)
    assert np.isfinite(np.asarray(llm.scores[len(toks) - 1])).all()


def test_logits_agree_with_transformers(exported):
    """llama.cpp running our bf16 GGUF and transformers' fp32 forward of the same (bf16) checkpoint see
    the same model: what byte-identity to the converter cannot show on its own (a norm shift, a
    permute, a fused split both could get wrong)."""
    pytest.importorskip("transformers")
    family, ours, _ = exported
    model = ours.files["bf16"].parent.parent / f"{family}-tiny"
    cos, cos_min, same = llamacpp_ref.logits_agreement(model, ours.files["bf16"])
    assert cos >= 0.999 and same >= 0.95, f"{family}: mean cosine {cos:.5f} (min {cos_min:.5f}), same argmax at {same:.0%}"


# --- input dtypes, sharding and Qwen3 with its own output matrix -------------------------------
# llama.cpp's default flow converts with `--outtype auto`: bf16 and fp16 checkpoints stay lossless,
# fp32 ones are rounded to f16 first. quantkit quantizes the values as stored, which for fp32 is
# llama.cpp's `--outtype f32` flow (a deliberate difference: no f16 rounding of fp32 weights).
INPUTS = {
    # name: (preset, tokenizer, dtype, shard bytes, converter --outtype)
    "llama3-fp16-sharded": ("llama3-tiny", "llama3", "float16", 24 << 20, "auto"),
    "llama3-fp32": ("llama3-tiny", "llama3", "float32", 2 << 30, "f32"),
    "qwen3-untied-bf16": ("qwen3-tiny", "qwen3", "bfloat16", 2 << 30, "auto"),
}


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_q4_k_m_of_other_inputs_matches_llama_quantize(name, tmp_path):
    import torch

    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    preset, tok, dtype, shard_bytes, outtype = INPUTS[name]
    cfg = synthetic.preset_config(preset, num_hidden_layers=3, max_window_layers=3, tie_word_embeddings=False)
    model = synthetic.write_checkpoint(tmp_path / name, cfg, FIX / tok, dtype=getattr(torch, dtype),
                                       shard_bytes=shard_bytes)
    assert (len(list(model.glob("*.safetensors"))) > 1) == ("sharded" in name)
    ours = export_gguf(model, [VARIANTS["q4_k_m"]], tmp_path / "ours", progress=False).files["q4_k_m"]
    ref = llamacpp_ref.convert_hf_to_gguf(model, tmp_path / "ref.gguf", outtype)
    ref = llamacpp_ref.llama_quantize(ref, tmp_path / "ref-q4_k_m.gguf", "q4_k_m")
    assert dict((t[0], t[1]) for t in gguf_diff.tensors(ours))["output.weight"] == "Q6_K"
    result = gguf_diff.compare(ours, ref)
    assert result["identical_tensors"], f"{name}: {result}"


def test_iq4_rules_and_fallbacks_match_llama_quantize(tmp_path):
    # what the families' tiny presets (4 heads, 2 KV heads, 256 wide) leave out: attn_v in Q5_K when
    # n_head / n_head_kv >= 4, and the shape fallbacks. Rows of 320 values: IQ4_XS -> IQ4_NL, Q5_K -> Q5_1,
    # the output Q8_0; ffn_down's rows of 528 values fit no 32-block type: F16
    if llamacpp_ref.llamacpp_src() is None:
        pytest.skip("llama.cpp sources (convert_hf_to_gguf.py) not unpacked: run `make install-test`")
    cfg = synthetic.preset_config("mistral-tiny", num_key_value_heads=1, hidden_size=320, intermediate_size=528,
                                  head_dim=64)       # attn_output: rows of 4 x 64 = 256 values, in IQ4_XS
    model = synthetic.write_checkpoint(tmp_path / "gqa4", cfg, FIX / "mistral-v3")
    ours = export_gguf(model, [VARIANTS[v] for v in IQ4], tmp_path / "ours", progress=False).files
    bf16 = llamacpp_ref.convert_hf_to_gguf(model, tmp_path / "ref-bf16.gguf", "bf16")
    for v in IQ4:
        ref = llamacpp_ref.llama_quantize(bf16, tmp_path / f"ref-{v}.gguf", v)
        types = dict((t[0], t[1]) for t in gguf_diff.tensors(ref))
        assert (types["blk.3.attn_v.weight"], types["blk.1.ffn_down.weight"], types["token_embd.weight"],
                types["blk.1.attn_output.weight"], types["output.weight"]) == ("Q5_1", "F16", "IQ4_NL", v.upper(), "Q8_0")
        diff = gguf_diff.file_difference(ours[v], ref)
        assert diff is None, f"{v}: {diff}"
    # and llama.cpp runs our IQ4_XS file
    llm = llama_cpp.Llama(model_path=str(ours["iq4_xs"]), n_ctx=64, verbose=False)
    toks = llm.tokenize(b"Hello world", add_bos=True)
    llm.eval(toks)
    assert np.isfinite(np.asarray(llm.scores[len(toks) - 1])).all()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", QUANTIZED + ["bf16", "f16"] + IQ4)
def test_cuda_export_is_byte_identical_to_the_reference(exported, variant, tmp_path):
    # the GPU path: raw reads pinned, copied on a side stream, permuted and quantized on the GPU,
    # copied back without waiting and written by the writer thread
    family, ours, ref = exported
    if variant not in ours.files:
        pytest.skip(IQ4_ELSEWHERE)
    model = ours.files[variant].parent.parent / f"{family}-tiny"
    cuda = export_gguf(model, [VARIANTS[v] for v in ours.files], tmp_path, progress=False, device="cuda",
                       chunk_values=CHUNK_VALUES).files[variant]
    assert cuda.read_bytes() == ours.files[variant].read_bytes()
    if variant not in ("bf16", "f16"):
        assert cuda.read_bytes() == ref[variant].read_bytes()


@pytest.mark.gpu
def test_cuda_export_refuses_nan_and_leaves_no_file(tmp_path):
    from safetensors.torch import load_file, save_file

    from quantkit.errors import InputError
    model = synthetic.write_checkpoint(tmp_path / "m", synthetic.preset_config("llama3-tiny"), FIX / "llama3")
    (shard,) = model.glob("*.safetensors")
    t = load_file(shard)
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(t, shard, metadata={"format": "pt"})
    with pytest.raises(InputError, match="up_proj.*NaN"):
        export_gguf(model, ALL, tmp_path / "out", progress=False, device="cuda")
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix == ".gguf" or "partial" in p.name]


def test_comparison_detects_one_changed_byte(tiny_model, tmp_path):
    import gguf

    (path,) = export_gguf(tiny_model, [VARIANTS["q8_0"]], tmp_path, progress=False).files.values()
    assert gguf_diff.compare(path, path)["identical_tensors"]
    t = gguf.GGUFReader(path).tensors[5]
    data = bytearray(path.read_bytes())
    data[t.data_offset + 7] ^= 0x01
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(bytes(data))
    assert gguf_diff.compare(path, changed) == {"identical_tensors": False, "tensors": len(gguf_diff.tensors(path)),
                                                "differing": [t.name]}
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    assert gguf_diff.file_difference(path, copy) is None
    assert t.name in gguf_diff.file_difference(path, changed)


def test_the_dry_runs_sizes_are_the_files_tensor_bytes(exported):
    # the plan's size line against gguf-py's reading of the files written
    from click.testing import CliRunner

    from quantkit.cli import main
    family, ours, _ = exported
    model = next(iter(ours.files.values())).parent.parent / f"{family}-tiny"
    quantized = quantized_types(family)
    r = CliRunner().invoke(main, ["export", str(model), "--gguf", ",".join(quantized), "--dry-run"])
    assert r.exit_code == 0, r.output
    (line,) = [x for x in r.output.splitlines() if x.startswith("tensor data, MB")]
    shown = [int(x.replace(",", "")) for x in line.split()[3:]]
    read = [round(sum(int(t.n_bytes) for t in gguf_diff.reader(ours.files[v]).tensors) / 1e6) for v in quantized]
    assert shown == read


def test_a_shapes_only_checkpoint_plans_as_the_real_one(tmp_path):
    # the sparse, header-only checkpoint that plans 8B models without 16 GB of disk
    from click.testing import CliRunner

    from quantkit.cli import main
    cfg = synthetic.preset_config("qwen3-tiny", num_hidden_layers=3, max_window_layers=3)
    real = synthetic.write_checkpoint(tmp_path / "real", cfg, FIX / "qwen3", shard_bytes=24 << 20)
    sparse = synthetic.write_checkpoint(tmp_path / "sparse", cfg, FIX / "qwen3", shard_bytes=24 << 20, shapes_only=True)
    from safetensors import safe_open

    def tensors(m):
        out = {}
        for f in sorted(m.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                out.update({k: (f.name, st.get_slice(k).get_shape(), st.get_slice(k).get_dtype()) for k in st.keys()})
        return out
    assert tensors(sparse) == tensors(real)
    assert (sparse / "model.safetensors.index.json").read_text() == (real / "model.safetensors.index.json").read_text()
    plans = [CliRunner().invoke(main, ["export", str(m), "--gguf", "q4_k_m,q4_0", "--dry-run"]).output
             for m in (real, sparse)]
    assert plans[0] == plans[1] and "tensor data, MB" in plans[0]
