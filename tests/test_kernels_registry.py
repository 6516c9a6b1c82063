"""The kernel registry and hand-checked golden blocks (no llama.cpp needed)."""
from __future__ import annotations

import gguf
import pytest
import torch

from quantkit.errors import UnsupportedError
from quantkit.kernels import registry

NAMES = ["q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "f32", "f16", "bf16"]


def test_every_planned_type_is_registered_with_gguf_sizes():
    assert sorted(registry.QUANT_TYPES) == sorted(NAMES)
    for name, qtype in registry.QUANT_TYPES.items():
        assert qtype.name == name
        assert (qtype.block_size, qtype.type_size) == gguf.GGML_QUANT_SIZES[qtype.ggml_type]


def test_get_accepts_names_in_any_case_and_ggml_types():
    q4k = registry.get("q4_k")
    assert registry.get("Q4_K") is q4k
    assert registry.get(gguf.GGMLQuantizationType.Q4_K) is q4k
    assert registry.get(int(gguf.GGMLQuantizationType.Q4_K)) is q4k


def test_get_rejects_unknown_types_with_the_known_list():
    with pytest.raises(UnsupportedError, match="q8_0"):
        registry.get("q3_k_xl")
    with pytest.raises(UnsupportedError):
        registry.get(gguf.GGMLQuantizationType.IQ2_XXS)
    with pytest.raises(UnsupportedError):
        registry.get(9999)


def test_row_nbytes_rejects_rows_that_are_not_whole_blocks():
    assert registry.row_nbytes(registry.get("q6_k"), 4096) == 16 * 210
    with pytest.raises(UnsupportedError, match="multiple of 256"):
        registry.row_nbytes(registry.get("q4_k"), 4096 + 32)


def test_quantize_rows_rejects_non_float32_input():
    with pytest.raises(AssertionError):
        registry.quantize_rows(torch.zeros(2, 32, dtype=torch.float16), registry.get("q8_0"))


@pytest.mark.parametrize("name", NAMES)
def test_chunked_quantization_equals_one_shot(name, monkeypatch):
    qtype = registry.get(name)
    x = torch.randn(6, 768 if qtype.block_size == 256 else 96, generator=torch.Generator().manual_seed(3))
    whole = registry.quantize_rows(x, qtype)
    # chunks of 5 blocks: the boundaries fall mid-row
    monkeypatch.setitem(registry.CHUNK_VALUES, "cpu", 5 * qtype.block_size)
    chunked = registry.quantize_rows(x, qtype)
    assert torch.equal(whole, chunked)
    assert torch.equal(registry.dequantize_rows(whole, qtype, x.shape[1]),
                       registry.dequantize_rows(chunked, qtype, x.shape[1]))


# relative RMS error of a round trip on N(0, 1) data: a loose ceiling per type
RT_ERROR = {"q8_0": 0.01, "q5_0": 0.05, "q5_1": 0.05, "q4_0": 0.12, "q4_1": 0.1, "q4_k": 0.1, "q5_k": 0.05, "q6_k": 0.025,
            "iq4_nl": 0.1, "iq4_xs": 0.1,
            "f32": 0.0, "f16": 1e-3, "bf16": 5e-3}


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_error_is_small(name):
    qtype = registry.get(name)
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(1))
    y = registry.dequantize_rows(registry.quantize_rows(x, qtype), qtype, 512)
    assert y.shape == x.shape and y.dtype == torch.float32
    rel = ((y - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()
    assert rel <= RT_ERROR[name], rel


def test_q8_0_golden_block_of_0_to_31():
    # amax = 31, d = 31/127 = 0.244094...: as fp16, 1.953125 * 2^-3 = 0x33D0 (mantissa
    # 0.95276 * 1024 = 975.6 -> 976 = 0x3D0, exponent -3 + 15 = 12)
    # qs[j] = roundf(j * 127/31) = roundf(4.0968 * j)
    x = torch.arange(32, dtype=torch.float32)[None]
    expected_qs = [0, 4, 8, 12, 16, 20, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61,
                   66, 70, 74, 78, 82, 86, 90, 94, 98, 102, 107, 111, 115, 119, 123, 127]
    out = registry.quantize_rows(x, registry.get("q8_0"))[0].tolist()
    assert out == [0xD0, 0x33] + expected_qs


def test_q8_0_rounds_half_away_from_zero():
    # with a 127 in the block d = 1 exactly (fp16 0x3C00) and id = 1, so qs = roundf(x):
    # 0.5 -> 1, 1.5 -> 2, 2.5 -> 3, -2.5 -> -3 (round-half-even would give 0, 2, 2, -2)
    x = torch.zeros(1, 32)
    x[0, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5])
    out = registry.quantize_rows(x, registry.get("q8_0"))[0]
    assert out[:2].tolist() == [0x00, 0x3C]
    assert out[2:7].view(torch.int8).tolist() == [127, 1, 2, 3, -3]
    assert out[7:].tolist() == [0] * 27


def test_q5_1_golden_constant_block():
    # min = max = 2: d = 0 -> id = 0, every code is (uint8)(0 + 0.5f) = 0, m = fp16(2) = 0x4000
    x = torch.full((1, 32), 2.0)
    out = registry.quantize_rows(x, registry.get("q5_1"))[0].tolist()
    assert out == [0x00, 0x00, 0x00, 0x40] + [0] * 20


def test_q5_0_golden_block():
    # max (largest magnitude) = -16 -> d = -16/-16 = 1 (fp16 0x3C00), id = 1;
    # code = MIN(31, (int8)(x + 16.5)): -16 -> 0, 0 -> 16, 15 -> 31, 15.4 -> 31
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 16], x[0, 17] = -16.0, 15.0, 15.4, 3.0
    out = registry.quantize_rows(x, registry.get("q5_0"))[0].tolist()
    codes = [16] * 32
    codes[0], codes[1], codes[16], codes[17] = 0, 31, 31, 19
    qh = sum(((c >> 4) & 1) << j for j, c in enumerate(codes))
    qs = [(codes[j] & 0xF) | ((codes[j + 16] & 0xF) << 4) for j in range(16)]
    assert out == [0x00, 0x3C] + list(qh.to_bytes(4, "little")) + qs


def test_iq4_golden_all_zero_blocks():
    # quantize_row_iq4_nl_impl: every group below GROUP_MAX_EPS gets scale 0, so id = 0 and each code is
    # best_index_int8(0): 0 lies between kvalues -10 (index 7) and 1 (index 8), nearer 1 -> 8 (0x88 a byte).
    # IQ4_NL writes d = fp16(0); IQ4_XS d = fp16(-max_scale/32) = fp16(-0.0) = 0x8000, each 6-bit scale
    # nearest_int(0) + 32 = 32: low nibbles 0, high bits 0b10 per group (scales_h 0xAAAA)
    nl = registry.quantize_rows(torch.zeros(1, 32), registry.get("iq4_nl"))[0].tolist()
    assert nl == [0x00, 0x00] + [0x88] * 16
    xs = registry.quantize_rows(torch.zeros(1, 256), registry.get("iq4_xs"))[0].tolist()
    assert xs == [0x00, 0x80, 0xAA, 0xAA] + [0x00] * 4 + [0x88] * 128


def test_iq4_nl_golden_block():
    # x = the table, twice: max = -127 (the first value of largest magnitude). The try itry = 0,
    # id = (0 - 127)/max = 1, codes every value to itself with the least-squares scale 1, an exact fit
    # that no other try beats: d = fp16(1) = 0x3C00, codes 0..15 in order (value t in byte t % 16, the
    # low nibble for t < 16)
    from quantkit.kernels.iq4 import KVALUES_IQ4NL
    x = torch.tensor([list(KVALUES_IQ4NL) * 2], dtype=torch.float32)
    out = registry.quantize_rows(x, registry.get("iq4_nl"))[0].tolist()
    assert out == [0x00, 0x3C] + [c | (c << 4) for c in range(16)]


@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q6_k"])
def test_k_quants_write_all_zero_super_blocks_as_zero_bytes(name):
    qtype = registry.get(name)
    out = registry.quantize_rows(torch.zeros(1, 256), qtype)
    assert out.tolist() == [[0] * qtype.type_size]


def test_bf16_rounds_to_nearest_even_and_keeps_nan_quiet():
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x7F800001, 0xFF800000], dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)[:, None]
    out = registry.quantize_rows(x, registry.get("bf16")).view(torch.int16).to(torch.int32) & 0xFFFF
    # tie to even (stays), tie to odd (rounds up), above the tie, sNaN forced quiet, -inf
    assert out[:, 0].tolist() == [0x3F80, 0x3F82, 0x3F81, 0x7FC0, 0xFF80]


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_cuda_bytes_equal_cpu_bytes(name):
    # the CPU bytes are checked against ggml in test_kernels_vs_ggml.py
    qtype = registry.get(name)
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(8, 1024, generator=g) * s for s in (1e-6, 0.02, 1.0, 1e4)])
    x[0, :256] = 0.0
    x[1, :512] = 3.0
    cpu = registry.quantize_rows(x, qtype)
    cuda = registry.quantize_rows(x.cuda(), qtype)
    assert torch.equal(cpu, cuda.cpu())
    assert torch.equal(registry.dequantize_rows(cpu, qtype, 1024),
                       registry.dequantize_rows(cuda, qtype, 1024).cpu())


def _hard_rows(g: torch.Generator) -> torch.Tensor:
    """Rows at the edges of the searches: huge, tiny and float32-subnormal magnitudes (infinite
    inverse scales, inf * 0 = NaN coded as 0), zero and constant blocks, one outlier per block."""
    x = torch.cat([torch.randn(4, 1024, generator=g) * s for s in (1e-40, 1e-30, 1e-6, 0.02, 1.0, 1e4, 1e15)])
    x[0, :256] = 0.0
    x[1, :512] = 3.0
    x[2, 256:512] = -1e-44
    x[8].view(-1, 32)[:, 5] *= 1e3
    return x


@pytest.mark.gpu
def test_cuda_uses_the_compiled_searches():
    # without them the GPU falls back to the torch searches (same bytes, ~2000 launches a chunk):
    # a broken compile must not pass unseen
    from quantkit.kernels import searches_cuda
    device = torch.device("cuda")
    assert searches_cuda.available(device), searches_cuda._kernels(device)   # the compiler's log
    for kernel in searches_cuda.KERNELS:
        assert searches_cuda.available(device, kernel), kernel


@pytest.mark.gpu
@pytest.mark.parametrize("search", ["blocks", "compiled", "torch"])
@pytest.mark.parametrize("name", ["q8_0", "q4_k", "q5_k", "q6_k", "q5_0", "q5_1", "q4_0", "q4_1", "iq4_nl", "iq4_xs"])
def test_cuda_searched_bytes_equal_cpu_bytes_at_the_edges_and_with_an_imatrix(name, search, monkeypatch):
    # the CPU bytes are checked against ggml in test_kernels_vs_ggml.py, on these cases too. blocks:
    # the whole-block kernels (the default); compiled: the torch code around the compiled searches;
    # torch: all torch. IQ4_NL/IQ4_XS have only torch on a GPU (the same code all three ways), against
    # the CPU's numba kernels
    from quantkit.kernels import backends
    on = {"torch": (), "compiled": ("numba", "cuda-searches"), "blocks": ("numba", "cuda")}[search]
    qtype = registry.get(name)
    g = torch.Generator().manual_seed(11)
    x = _hard_rows(g)
    imatrix = torch.rand(1024, generator=g) ** 4
    for im in (None, imatrix):
        cpu = registry.quantize_rows(x, qtype, im)
        with backends.only(*on):
            cuda = registry.quantize_rows(x.cuda(), qtype, None if im is None else im.cuda())
        assert torch.equal(cpu, cuda.cpu()), f"{name}, imatrix={im is not None}, {search} searches"


def test_the_gpu_block_kernels_refuse_shapes_they_would_read_past():
    # checked before any launch (so here, without a GPU): a kernel reading past its buffer would
    # leave the CUDA context unusable for the rest of the process
    from quantkit.kernels import kquants, searches_cuda
    with pytest.raises(ValueError, match=r"\[n, 256\]"):
        searches_cuda.quantize_k_with_min(torch.zeros(2, 128), None, kquants.k_search(15, False))
    with pytest.raises(ValueError, match="importance"):
        searches_cuda.quantize_q6_k(torch.zeros(2, 256), torch.zeros(256))
    with pytest.raises(ValueError, match=r"\[n, 32\]"):
        searches_cuda.quantize_q8_0(torch.zeros(64))


def test_the_kernel_backend_is_picked_through_the_registry(monkeypatch):
    from quantkit.errors import UnsupportedError
    from quantkit.kernels import backends, searches_cpu
    x = torch.randn(4, 256)
    numba = "numba-blocks" if searches_cpu.available() else "torch"
    assert backends.choose("q8_0_blocks", x).backend == numba                  # the default: all on
    monkeypatch.setenv("QUANTKIT_KERNELS", "torch")
    assert backends.choose("q8_0_blocks", x).backend == "torch"
    assert registry.quantize_rows(x, registry.get("q4_k")).shape == (4, 144)    # the torch K-quants run
    monkeypatch.setenv("QUANTKIT_KERNELS", "numba")                             # both numba backends
    assert backends.choose("k_with_min_blocks", x, None, None, None).backend == numba
    with backends.only("numba-searches"):                                       # wins over the variable
        assert backends.choose("k_with_min_blocks", x, None, None, None).backend == "torch"
    monkeypatch.setenv("QUANTKIT_KERNELS", "numbaa")
    with pytest.raises(UnsupportedError, match="unknown kernel backend 'numbaa'"):
        registry.quantize_rows(x, registry.get("q8_0"))

