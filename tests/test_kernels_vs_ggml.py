"""Our kernels against ggml's own reference quantizers (llama-cpp-python's libggml-base).

Every quantized type must produce the same bytes as ggml_quantize_chunk(type, ..., imatrix=NULL),
and the same bytes as ggml_quantize_chunk(type, ..., imatrix) with an importance matrix; every type must dequantize to the same float32 bits as ggml's to_float.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from quantkit.testing import ggml_ref, host_searches
from quantkit.kernels import backends, iq4, kquants, legacy, registry, searches_cpu

if not ggml_ref.available():
    pytest.skip("llama-cpp-python (ggml shared libraries) is not installed", allow_module_level=True)

LEGACY = ["q8_0", "q5_0", "q5_1", "q4_0", "q4_1"]
K_QUANTS = ["q4_k", "q5_k", "q6_k"]
IQ4 = ["iq4_nl", "iq4_xs"]
QUANTIZED = LEGACY + K_QUANTS + IQ4
FLOATS = ["f32", "f16", "bf16"]
ALL = QUANTIZED + FLOATS


@pytest.fixture(scope="session")
def cuda_source_on_host(tmp_path_factory):
    """kernels/searches.cu, the GPU's scale searches, compiled for this CPU as NVRTC compiles it
    for the GPU (no multiply-add contraction)."""
    searches = host_searches.compile_searches(tmp_path_factory.mktemp("session-searches_cu"))
    if searches is None:
        pytest.skip("no C++ compiler to build kernels/searches.cu for the host")
    return searches


# every test runs with each implementation of the kernels: numba (the CPU's default where numba is
# installed: Q8_0 and the K-quants whole in legacy_cpu / kquants_cpu, the scale searches of Q5_0/Q5_1
# with an imatrix in searches_cpu), torch (the CPU's without numba, and the GPU's without NVRTC) and
# searches.cu (the GPU's: whole blocks and searches), here compiled for the host and run through the
# GPU's wrappers (searches_cuda) as the backends host-searches and host-blocks. IQ4_NL/IQ4_XS have
# no code in searches.cu (a GPU runs their torch code): their numba and torch runs cover them.
@pytest.fixture(autouse=True, params=["numba", "torch", "cuda-source"])
def search_backend(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if request.param == "cuda-source" and callspec is not None and callspec.params.get("qname") in IQ4:
        pytest.skip("searches.cu has no IQ4 kernels: the torch run is the GPU's code")
    if request.param == "numba":
        if not searches_cpu.available():
            pytest.skip("numba is not installed")
        chosen = ("numba-searches", "numba-blocks")
    elif request.param == "torch":
        chosen = ()
    else:
        request.getfixturevalue("cuda_source_on_host").install(monkeypatch.setattr)
        chosen = ("host-searches", "host-blocks")
    with backends.only(*chosen):
        yield request.param


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _cols(n_blocks_256: int = 4) -> int:
    return 256 * n_blocks_256  # a multiple of every block size


def _assert_bytes_match(x: np.ndarray, qname: str, imatrix: np.ndarray | None = None) -> None:
    qtype = registry.get(qname)
    x = np.ascontiguousarray(x, dtype=np.float32)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    ours = registry.quantize_rows(torch.from_numpy(x.copy()), qtype,
                                  None if im is None else torch.from_numpy(im.copy())).numpy()
    ref = np.frombuffer(ggml_ref.ggml_quantize(x, int(qtype.ggml_type), im), dtype=np.uint8).reshape(ours.shape)
    if not np.array_equal(ours, ref):
        a, b = ours.reshape(-1, qtype.type_size), ref.reshape(-1, qtype.type_size)
        bad = np.nonzero((a != b).any(axis=1))[0]
        cols = np.nonzero(a[bad[0]] != b[bad[0]])[0]
        pytest.fail(f"{qname}: {len(bad)}/{len(a)} blocks differ; block {bad[0]} bytes {cols[:12].tolist()}: "
                    f"ours {a[bad[0], cols[:12]].tolist()} ggml {b[bad[0], cols[:12]].tolist()}; "
                    f"block values {x.reshape(-1, qtype.block_size)[bad[0]][:8].tolist()}...")


@pytest.mark.parametrize("qname", ALL)
def test_bytes_match_ggml_on_random_normal_at_several_scales(qname):
    rng = _rng("normal", qname)
    for scale in (1e-4, 0.02, 1.0, 300.0):
        _assert_bytes_match(rng.standard_normal((16, _cols())) * scale, qname)


@pytest.mark.parametrize("qname", ALL)
def test_bytes_match_ggml_on_all_zero_blocks(qname):
    x = _rng("zero", qname).standard_normal((6, _cols()))
    x[0] = 0.0  # whole rows
    x[1, :256] = 0.0  # one super-block
    x[2, 32:64] = 0.0  # one legacy block / K sub-block
    x[3, 16:32] = 0.0  # one Q6_K sub-block
    x[4, ::2] = 0.0
    x[5] = -0.0
    _assert_bytes_match(x, qname)


@pytest.mark.parametrize("qname", ALL)
def test_bytes_match_ggml_on_constant_blocks(qname):
    rng = _rng("const", qname)
    cols = _cols()
    rows = []
    for width in (16, 32, 256):  # constant over a Q6_K sub-block, a 32-block, a super-block
        v = rng.standard_normal((2, cols // width, 1)) * 3
        rows.append(np.repeat(v, width, axis=2).reshape(2, cols))
    rows.append(np.full((1, cols), 1.0))
    rows.append(np.full((1, cols), -7.25))
    _assert_bytes_match(np.concatenate(rows), qname)


@pytest.mark.parametrize("qname", ALL)
def test_bytes_match_ggml_with_one_huge_outlier_per_block(qname):
    rng = _rng("outlier", qname)
    x = rng.standard_normal((8, _cols())) * 0.02
    block = registry.get(qname).block_size if qname in QUANTIZED else 32
    pos = rng.integers(0, block, size=x.size // block)
    flat = x.reshape(-1, block)
    flat[np.arange(len(flat)), pos] = rng.choice([-1.0, 1.0], size=len(flat)) * rng.uniform(50, 5000, size=len(flat))
    _assert_bytes_match(x, qname)


@pytest.mark.parametrize("qname", ALL)
def test_bytes_match_ggml_on_huge_magnitudes(qname):
    # 1e4 keeps every fp16 scale finite; 1e9 and 1e15 overflow the fp16 d/dmin to inf while
    # all float32 intermediates (sums of squares included) stay finite
    rng = _rng("huge", qname)
    for scale in (1e4, 1e9, 1e15):
        _assert_bytes_match(rng.standard_normal((4, _cols())) * scale, qname)


@pytest.mark.parametrize("with_imatrix", [False, True])
@pytest.mark.parametrize("qname", ["q4_k", "q5_k", "q6_k", "q5_0", "q5_1", "q4_0", "q4_1"])
def test_the_gpus_nan_bits_leave_the_bytes_ggmls(qname, with_imatrix, search_backend, monkeypatch):
    # At 1e15, x^3 overflows and inf * 0 gives NaN scales. On x86 that NaN is 0xFFC00000, on a GPU
    # 0x7FFFFFFF, and what follows (nearest_int of a NaN scale) must not depend on the bits. Here
    # every NaN the searches return is given the GPU's bits, and the bytes must still be ggml's.
    gpu_nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)[0]
    replaced = []

    def with_gpu_nans(search):
        def run(*args, **kwargs):
            out = tuple(o if o.dtype != torch.float32 else torch.where(o != o, gpu_nan, o) for o in search(*args, **kwargs))
            replaced.append(sum(int((o != o).sum()) for o in out if o.dtype == torch.float32))
            return out
        return run

    for module in (kquants, legacy):             # where the quantizers call the searches
        for name in ("make_qkx2_quants", "make_qx_quants_rmse1", "make_qp_quants"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, with_gpu_nans(getattr(module, name)))
    rng = _rng("gpu-nan", qname)
    x = rng.standard_normal((8, _cols())) * 1e15
    # the torch code a GPU runs around the searches: no whole-block kernel
    with backends.only(*(b for b in backends.enabled() if not b.endswith("-blocks"))):
        _assert_bytes_match(x, qname, rng.random(_cols()) ** 4 if with_imatrix else None)
    if qname == "q6_k" and not with_imatrix:
        assert sum(replaced) > 0                  # the case this test is about does occur


@pytest.mark.parametrize("qname", ALL)
def test_bytes_match_ggml_on_tiny_magnitudes(qname):
    # fp16 scales underflow to subnormals (1e-6) or to zero (1e-12, 1e-30); float32 subnormals
    # (1e-40) make the searches' inverse scales infinite, and inf * 0 a NaN that ggml codes as 0
    rng = _rng("tiny", qname)
    for scale in (1e-6, 1e-12, 1e-30, 1e-40):
        _assert_bytes_match(rng.standard_normal((4, _cols())) * scale, qname)


@pytest.mark.parametrize("qname", ALL)
def test_bytes_match_ggml_on_bf16_rounded_inputs(qname):
    x = torch.from_numpy(_rng("bf16", qname).standard_normal((8, _cols())).astype(np.float32) * 0.05)
    _assert_bytes_match(x.bfloat16().float().numpy(), qname)


@pytest.mark.parametrize("qname", ALL)
def test_bytes_match_ggml_on_positive_only_and_negative_only_rows(qname):
    rng = _rng("sign", qname)
    x = np.abs(rng.standard_normal((8, _cols())))
    x[1::2] *= -1
    x[4] += 10.0  # positive and far from zero: Q4_K/Q5_K mins clamp to 0
    x[5] -= 10.0
    _assert_bytes_match(x, qname)


@pytest.mark.parametrize("qname", ALL)
def test_bytes_match_ggml_on_rows_of_several_widths(qname):
    block = registry.get(qname).block_size
    unit = 256 if block == 256 else 32
    for n in (1, 3, 11, 16):
        _assert_bytes_match(_rng("widths", qname, n).standard_normal((3, unit * n)), qname)


@pytest.mark.parametrize("qname", ALL)
def test_bytes_match_ggml_on_rounding_ties(qname):
    # half-integers and small integers hit exact .5 ties in roundf / nearest_int / the
    # (int)(x + 0.5f) truncations, and equal candidates in the K-quant scale searches
    rng = _rng("ties", qname)
    cols = _cols()
    halves = rng.integers(-127, 128, size=(4, cols)) / 2.0
    halves[:, ::32] = 127.0  # Q8_0: d = 1 exactly, so x*id = x
    small = rng.integers(0, 3, size=(4, cols)).astype(np.float64)
    _assert_bytes_match(np.concatenate([halves, small, -small]), qname)


@pytest.mark.parametrize("qname", ALL)
def test_bytes_match_ggml_on_heavy_tailed_sparse_and_mixed_scale_weights(qname):
    rng = _rng("mixed", qname)
    cols = _cols(8)
    laplace = rng.laplace(size=(4, cols)) * 0.02
    sparse = rng.standard_normal((4, cols)) * (rng.random((4, cols)) < 0.2)
    # sub-blocks whose scales differ by orders of magnitude: small sub-blocks get a 6-bit
    # (Q4_K/Q5_K) or int8 (Q6_K) scale of 0 and keep the codes of the search
    mags = np.exp(rng.uniform(-12, 4, size=(4, cols // 16, 1))).repeat(16, axis=2).reshape(4, cols)
    mixed = rng.standard_normal((4, cols)) * mags
    _assert_bytes_match(np.concatenate([laplace, sparse, mixed]), qname)


def _imatrices(rng: np.random.Generator, cols: int) -> dict[str, np.ndarray]:
    """Importance matrices as llama-imatrix makes them (means of squared activations: positive,
    heavy-tailed, a few huge columns), and the edge cases: zero columns, all equal, tiny, huge."""
    act = rng.standard_normal((64, cols)) * rng.lognormal(0, 1.5, cols)
    real = (act * act).mean(0)
    with_zeros = real.copy()
    with_zeros[rng.choice(cols, cols // 8, replace=False)] = 0.0
    with_zeros[256:512] = 0.0                     # a whole super-block of zero weight
    return {"squared_activations": real, "zero_columns": with_zeros, "all_ones": np.ones(cols),
            "tiny": real * 1e-30, "huge": real * 1e20}


@pytest.mark.parametrize("qname", ["q4_k", "q5_k", "q6_k", "q5_0", "q5_1", "q4_0", "q4_1", "iq4_nl", "iq4_xs"])
def test_bytes_match_ggml_with_an_importance_matrix_in_chunks_that_split_rows(qname, monkeypatch):
    # quantize_rows hands each kernel chunk the importance of its own blocks: with chunks of 5
    # blocks, the boundaries fall mid-row and the pattern restarts mid-chunk
    monkeypatch.setitem(registry.CHUNK_VALUES, "cpu", 5 * registry.get(qname).block_size)
    rng = _rng("imatrix-chunks", qname)
    cols = _cols(3)
    _assert_bytes_match(rng.standard_normal((5, cols)) * 0.02, qname, rng.random(cols) ** 4)


@pytest.mark.parametrize("qname", IQ4)
def test_iq4_bytes_match_ggml_when_the_torch_search_runs_in_slices(qname, search_backend, monkeypatch):
    # a GPU chunk holds more groups than the torch search takes at once: here 5 at a time
    if search_backend != "torch":
        pytest.skip("the slices are the torch code's")
    monkeypatch.setattr(iq4, "SEARCH_GROUPS", 5)
    rng = _rng("iq4-slices", qname)
    x = rng.standard_normal((4, _cols())) * 0.02
    _assert_bytes_match(x, qname)
    _assert_bytes_match(x, qname, rng.random(_cols()) ** 4)


@pytest.mark.parametrize("qname", QUANTIZED)
def test_bytes_match_ggml_with_an_importance_matrix(qname):
    """ggml_quantize_chunk(..., imatrix): Q4_K/Q5_K/Q6_K and Q5_0/Q5_1 take the _impl paths
    (weighted searches; make_qp_quants for the K scales; Q5_x weigh by their row's mean square);
    IQ4_NL/IQ4_XS weigh by their super-block's mean square; Q8_0 ignores the weights, as ggml does."""
    rng = _rng("imatrix", qname)
    cols = _cols()
    data = {f"normal x{scale}": rng.standard_normal((8, cols)) * scale for scale in (1e-4, 0.02, 1.0, 300.0)}
    zeros = rng.standard_normal((4, cols))
    zeros[0] = 0.0
    zeros[1, 32:64] = 0.0
    zeros[2, 16:32] = 0.0
    data["zero blocks"] = zeros
    spiky = rng.standard_normal((8, cols)) * 0.02
    spiky[np.arange(8), rng.integers(0, cols, 8)] = 300.0
    data["outliers"] = spiky
    data["positive only"] = np.abs(rng.standard_normal((4, cols)))
    for iname, im in _imatrices(rng, cols).items():
        for dname, x in data.items():
            try:
                _assert_bytes_match(x, qname, im)
            except pytest.fail.Exception as e:
                pytest.fail(f"imatrix {iname}, data {dname}: {e}")


@pytest.mark.parametrize("qname", FLOATS)
def test_float_types_match_ggml_on_special_values(qname):
    bits = np.array([
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # zeros, infinities
        0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF,  # quiet / signalling NaNs
        0x00000001, 0x007FFFFF, 0x33000000, 0x33000001, 0x387FC000, 0x38800000,  # subnormal edges
        0x477FEFFF, 0x477FF000, 0x477FE000, 0x7F7FFFFF, 0xFF7FFFFF,  # fp16 overflow edge, FLT_MAX
        0x3F808000, 0x3F818000, 0x3F80C000, 0x3F800001,  # bf16 ties to even / odd, fp16 tie
    ], dtype=np.uint32)
    random_bits = _rng("bits", qname).integers(0, 2**32, size=4096 - len(bits), dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bits, random_bits]).view(np.float32).reshape(4, 1024)
    _assert_bytes_match(x, qname)
    qtype = registry.get(qname)
    ref = ggml_ref.ggml_quantize(x, int(qtype.ggml_type))
    data = torch.frombuffer(bytearray(ref), dtype=torch.uint8).reshape(4, -1)
    ours = registry.dequantize_rows(data, qtype, 1024).numpy()
    theirs = ggml_ref.ggml_dequantize(ref, int(qtype.ggml_type), 4, 1024)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("qname", ALL)
def test_dequantize_of_our_bytes_matches_ggml_to_float(qname):
    qtype = registry.get(qname)
    rng = _rng("deq", qname)
    cols = _cols()
    x = np.concatenate([rng.standard_normal((6, cols)) * s for s in (1e-3, 1.0, 1e3)]).astype(np.float32)
    x[0, :256] = 0.0
    data = registry.quantize_rows(torch.from_numpy(x), qtype)
    ours = registry.dequantize_rows(data, qtype, cols).numpy()
    theirs = ggml_ref.ggml_dequantize(data.numpy().tobytes(), int(qtype.ggml_type), x.shape[0], cols)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("qname", QUANTIZED)
def test_dequantize_matches_ggml_on_arbitrary_block_bytes(qname):
    # random bytes exercise every code, scale and sign bit the decoder reads (fp16 fields are
    # kept finite: NaN payloads are not part of the contract)
    qtype = registry.get(qname)
    rng = _rng("rawbytes", qname)
    raw = rng.integers(0, 256, size=(64, qtype.type_size), dtype=np.uint8)
    fp16_fields = {"q8_0": [0], "q5_0": [0], "q5_1": [0, 2], "q4_0": [0], "q4_1": [0, 2], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208],
                   "iq4_nl": [0], "iq4_xs": [0]}
    for off in fp16_fields[qname]:
        raw[:, off:off + 2] = np.frombuffer(
            rng.standard_normal(64).astype(np.float16).tobytes(), dtype=np.uint8).reshape(64, 2)
    cols = 4 * qtype.block_size
    data = raw.reshape(16, -1)
    ours = registry.dequantize_rows(torch.from_numpy(data.copy()), qtype, cols).numpy()
    theirs = ggml_ref.ggml_dequantize(data.tobytes(), int(qtype.ggml_type), 16, cols)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_ggml_row_sizes_agree_with_the_registry():
    for qname in ALL:
        qtype = registry.get(qname)
        for cols in (256, 4096):
            assert registry.row_nbytes(qtype, cols) == ggml_ref.row_size(int(qtype.ggml_type), cols)


# real weights: SmolLM2's embedding, attention and MLP matrices, laid out in rows of a width every
# block size divides (the values, not the shapes, are what the kernels see)
REAL_TENSORS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.layers.7.self_attn.k_proj.weight", "model.layers.15.mlp.down_proj.weight",
                "model.layers.29.mlp.gate_proj.weight", "model.layers.3.input_layernorm.weight"]


@pytest.mark.slow
@pytest.mark.parametrize("qname", ALL)
def test_bytes_match_ggml_on_real_smollm2_tensors(qname, smollm2_dir):
    from quantkit.hfmodel import HFModel

    model = HFModel(smollm2_dir)
    for name in REAL_TENSORS:
        x = model.read(name).float().reshape(-1)[: 256 * 2304]   # up to 590k values of each
        x = x[: x.numel() // 2304 * 2304] if x.numel() >= 2304 else x[: x.numel() // 256 * 256]
        _assert_bytes_match(x.reshape(-1, 2304 if x.numel() % 2304 == 0 else 256).numpy(), qname)
