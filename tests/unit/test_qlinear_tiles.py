"""The tile layouts and the few-row C kernels (runtime/csrc/qlinear.c) against fp64 products and torch's kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longfit.quant import tiles
from longfit.quant.gguf_repack import unpack_q4_rows
from longfit.quant.linear import Int4Linear, Int8Linear
from longfit.quant.rtn import dequantize_int4, quantize_int4, quantize_int4_min
from longfit.runtime import native

needs_kernels = pytest.mark.skipif(native.library() is None, reason="C kernels not built (no compiler)")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int4_case(n_out: int, n_in: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [N, K] uint8, d and m [N, K/G] fp16 with mixed signs and magnitudes."""
    gen = _gen(seed)
    codes = torch.randint(0, 16, (n_out, n_in), generator=gen, dtype=torch.uint8)
    d = (torch.rand(n_out, n_in // group, generator=gen) * 0.02 + 1e-4).half()
    m = (torch.randn(n_out, n_in // group, generator=gen) * 0.1).half()
    return codes, d, m


def _reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.double() @ weight.double().T).float()


def _bound(x: torch.Tensor, weight: torch.Tensor, block: int) -> torch.Tensor:
    """The kernels' documented error bound (qlinear.c): per block of ``block`` inputs, each input is within
    max|x| / 64516 of what the kernel multiplies, so the product moves by ≤ that · Σ|w| over the block; plus fp32
    rounding (1e-6 of the magnitude Σ|x||w|, and 1e-6 absolute)."""
    rows, n_in = x.shape
    top = x.float().abs().view(rows, n_in // block, block).amax(-1).double() / 64516  # [M, K/B]
    w_l1 = weight.double().abs().view(weight.shape[0], n_in // block, block).sum(-1)  # [N, K/B]
    magnitude = x.double().abs() @ weight.double().abs().T
    return (top @ w_l1.T + 1e-6 * magnitude + 1e-6).float()


def test_layouts_round_trip() -> None:
    gen = _gen(1)
    codes4 = torch.randint(0, 16, (48, 64), generator=gen, dtype=torch.uint8)
    assert torch.equal(tiles.unpack_int4(tiles.pack_int4(codes4)), codes4)
    codes8 = torch.randint(-127, 128, (48, 40), generator=gen, dtype=torch.int8)
    assert torch.equal(tiles.unpack_int8(tiles.pack_int8(codes8)), codes8)
    for source in (codes8.clone(), codes8[:16, :4].clone()):  # packing (an in-place flip) leaves its input alone
        kept = source.clone()
        tiles.pack_int8(source)
        assert torch.equal(source, kept)
    params = torch.randn(48, 3, generator=gen)
    assert torch.equal(tiles.unpack_lanes(tiles.pack_lanes(params)), params)
    # the documented words, where the kernels read them (tiles 0-1 a pair interleaved by oct or quad, tile 2 alone):
    # int4, row 16t + i: input 8o + e at bits 8e, 8o + 4 + e at bits 8e + 4; int8: input 4q + e at byte e, + 128
    flat4, flat8 = tiles.pack_int4(codes4).flatten(), tiles.pack_int8(codes8).flatten()
    for t, tt in ((1, 2), (2, 1)):
        for i, o in ((5, 3), (15, 0), (0, 7)):
            start = (t - t % 2) * 8 * 64 + (o * tt + t % 2) * 64 + 4 * i
            word = int.from_bytes(bytes(flat4[start:start + 4].tolist()), "little")
            for e in range(4):
                assert (word >> 8 * e) & 15 == codes4[16 * t + i, 8 * o + e]
                assert (word >> 8 * e + 4) & 15 == codes4[16 * t + i, 8 * o + 4 + e]
            start = (t - t % 2) * 10 * 64 + (o * tt + t % 2) * 64 + 4 * i
            for e in range(4):
                assert int(flat8[start + e]) - 128 == codes8[16 * t + i, 4 * o + e]


def test_shape_problems_name_the_constraint() -> None:
    assert "out_features % 16" in tiles.tile_shape_problem(24, 64, 32)
    assert "group_size" in tiles.tile_shape_problem(32, 96, 64)
    assert "% 4" in tiles.tile_shape_problem(32, 34)
    assert tiles.tile_shape_problem(32, 96, 32) is None and tiles.tile_shape_problem(32, 96) is None


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 17])
@pytest.mark.parametrize("n_out,n_in,group", [(48, 64, 32), (32, 256, 64), (64, 128, 128), (16, 96, 32)])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_int4_kernel_matches_fp64(rows: int, n_out: int, n_in: int, group: int, param_dtype: torch.dtype) -> None:
    codes, d, m = _int4_case(n_out, n_in, group, seed=rows)
    d, m = d.to(param_dtype), m.to(param_dtype)
    weight = codes.float().view(n_out, -1, group).mul(d.float()[..., None]).add(m.float()[..., None]).view(n_out, -1)
    x = torch.randn(rows, n_in, generator=_gen(rows + 7)).bfloat16()
    ref = _reference(x, weight)
    packed, dt, mt = tiles.pack_int4(codes), tiles.pack_lanes(d), tiles.pack_lanes(m)
    out = native.q4_linear(x, packed, dt, mt, group, torch.float32)
    assert ((out - ref).abs() <= _bound(x, weight, group)).all()
    out_bf16 = native.q4_linear(x, packed, dt, mt, group)
    assert out_bf16.dtype == torch.bfloat16 and torch.equal(out_bf16, out.bfloat16())


@needs_kernels
@pytest.mark.parametrize("n_out,n_in,group", [(48, 64, 32), (32, 256, 64), (16, 96, 32), (80, 128, 128)])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_c_dequantize_equals_the_torch_expression(n_out: int, n_in: int, group: int, param_dtype: torch.dtype,
                                                  dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Int4Linear.dequantized_t`` (the many-row path's weight) from C equals its torch expression bit for bit."""
    codes, d, m = _int4_case(n_out, n_in, group, seed=n_out)
    layer = Int4Linear(codes, d.to(param_dtype).float(), m.to(param_dtype).float(), group, layout="tiles")
    fast = layer.dequantized_t(dtype)
    monkeypatch.setattr(native, "library", lambda: None)  # the torch expression
    slow = layer.dequantized_t(dtype)
    assert fast.shape == slow.shape == (n_in, n_out) and fast.dtype == slow.dtype == dtype
    assert torch.equal(fast, slow)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 17])
@pytest.mark.parametrize("n_out,n_in", [(48, 64), (32, 576), (16, 36), (16, 1536)])
def test_int8_kernel_matches_fp64(rows: int, n_out: int, n_in: int) -> None:
    gen = _gen(rows)
    codes = torch.randint(-127, 128, (n_out, n_in), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n_out, generator=gen) * 0.01).bfloat16()
    weight = codes.float() * scales.float()[:, None]
    x = torch.randn(rows, n_in, generator=gen).bfloat16()
    out = native.q8_linear(x, tiles.pack_int8(codes), scales, torch.float32)
    assert ((out - _reference(x, weight)).abs() <= _bound(x, weight, n_in)).all()


@needs_kernels
def test_portable_build_matches_native_build() -> None:
    """The plain C loops (CPUs without AVX512-VNNI, or a build without -march=native) compute the same products:
    exactly (fp32 rounding), where the VNNI kernels are within their bound."""
    import ctypes

    portable = ctypes.CDLL(str(native._build(native._compiler(), [])))
    portable.longfit_q4_linear.argtypes = native.library().longfit_q4_linear.argtypes
    portable.longfit_q8_linear.argtypes = native.library().longfit_q8_linear.argtypes
    codes, d, m = _int4_case(48, 128, 32, seed=3)
    x = torch.randn(5, 128, generator=_gen(4)).bfloat16()
    packed, dt, mt = tiles.pack_int4(codes), tiles.pack_lanes(d), tiles.pack_lanes(m)
    fast = native.q4_linear(x, packed, dt, mt, 32, torch.float32)
    slow = torch.empty_like(fast)
    assert portable.longfit_q4_linear(x.data_ptr(), 5, 128, packed.data_ptr(), dt.data_ptr(), mt.data_ptr(), 1, 48,
                                      32, 1, slow.data_ptr(), 0) == 0
    weight = codes.float().view(48, -1, 32).mul(d.float()[..., None]).add(m.float()[..., None]).view(48, -1)
    magnitude = (x.double().abs() @ weight.double().abs().T).float()
    assert ((slow - _reference(x, weight)).abs() <= 1e-6 * magnitude + 1e-6).all()
    assert ((slow - fast).abs() <= _bound(x, weight, 32)).all()
    codes8 = torch.randint(-127, 128, (48, 128), generator=_gen(5), dtype=torch.int8)
    scales = torch.rand(48, generator=_gen(6)).bfloat16()
    fast8 = native.q8_linear(x, tiles.pack_int8(codes8), scales, torch.float32)
    slow8 = torch.empty_like(fast8)
    packed8 = tiles.pack_int8(codes8)
    assert portable.longfit_q8_linear(x.data_ptr(), 5, 128, packed8.data_ptr(), scales.data_ptr(), 48, 1,
                                      slow8.data_ptr(), 0) == 0
    weight8 = codes8.float() * scales.float()[:, None]
    magnitude8 = (x.double().abs() @ weight8.double().abs().T).float()
    assert ((slow8 - _reference(x, weight8)).abs() <= 1e-6 * magnitude8 + 1e-6).all()
    assert ((slow8 - fast8).abs() <= _bound(x, weight8, 128)).all()
    portable.longfit_bf16_linear.argtypes = native.library().longfit_bf16_linear.argtypes
    dense = torch.randn(48, 128, generator=_gen(7)).bfloat16()
    fast16 = native.bf16_linear(x, dense, torch.float32)
    slow16 = torch.empty_like(fast16)
    assert portable.longfit_bf16_linear(x.data_ptr(), 5, 128, dense.data_ptr(), 48, 1, slow16.data_ptr(), 0) == 0
    torch.testing.assert_close(slow16, fast16, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_threads_split_tiles_not_results(threads: int) -> None:
    codes, d, m = _int4_case(80, 64, 32, seed=8)  # 5 tiles: two pairs and a single one
    x = torch.randn(3, 64, generator=_gen(9)).bfloat16()
    args = (x, tiles.pack_int4(codes), tiles.pack_lanes(d), tiles.pack_lanes(m), 32, torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.q4_linear(*args)
        torch.set_num_threads(threads)
        assert torch.equal(native.q4_linear(*args), one)
    finally:
        torch.set_num_threads(previous)


@needs_kernels
def test_gguf_q4_1_tiles_keep_the_files_values() -> None:
    """Q4_1 blocks → (code, d, m) in fp16 without a single rounding: the tile layer's weight is gguf's."""
    import gguf
    from gguf.quants import dequantize, quantize

    weight = (torch.randn(32, 128, generator=_gen(10)) * 0.05).numpy()
    rows = quantize(weight, gguf.GGMLQuantizationType.Q4_1)
    codes, scales, zeros = unpack_q4_rows(rows, "Q4_1", 128)
    layer = Int4Linear(codes, scales, zeros, 32, layout="tiles")
    assert layer.d.dtype == torch.float16 and layer.m.dtype == torch.float16
    exact = torch.from_numpy(dequantize(rows, gguf.GGMLQuantizationType.Q4_1).astype(np.float32))
    assert torch.equal(layer.dequantized_t(torch.float32).T, exact)
    torch_layer = Int4Linear(codes, scales, zeros, 32, layout="torch")
    x = torch.randn(3, 128, generator=_gen(11)).bfloat16()
    magnitude = x.float().abs() @ exact.abs().T
    # the torch layout rounds scale and zero to bf16: the two agree to that rounding
    assert ((layer(x).float() - torch_layer(x).float()).abs() <= 6e-3 * magnitude + 1e-5).all()


def test_quantize_int4_min_error_within_half_a_step() -> None:
    weight = torch.randn(16, 256, generator=_gen(12)) * 0.05 + 0.01
    weight[3, :32] = 0.25  # a constant group
    for group in (32, 64, 128):
        codes, scales, zeros = quantize_int4_min(weight, group)
        d, m = tiles.int4_params(scales, zeros)
        assert d.dtype == torch.float16  # the fp16 parameters round-trip: the tile layout reads 2 bytes each
        step = scales.repeat_interleave(group, dim=1)
        error = (dequantize_int4(codes, scales, zeros, group) - weight).abs()
        assert bool((error <= step / 2 * (1 + 1e-3)).all())
    with pytest.raises(ValueError, match="fp16"):
        quantize_int4_min(torch.full((16, 32), 1e7), 32)


def test_bf16_rtn_parameters_fall_back_to_fp32() -> None:
    """(scale, zero) in bf16 whose m = zero - 8·scale needs more bits than fp16 keep fp32 (d, m): exact weights."""
    weight = torch.randn(16, 64, generator=_gen(13)) * 0.05 + 3.0
    codes, scales, zeros = quantize_int4(weight, 32, torch.bfloat16)
    d, m = tiles.int4_params(scales, zeros)
    exact = dequantize_int4(codes, scales, zeros, 32).view(16, 2, 32)
    assert torch.equal(codes.float().view(16, 2, 32) * d.float()[..., None] + m.float()[..., None], exact)


@needs_kernels
def test_layers_pick_tiles_and_accept_a_forced_layout() -> None:
    codes, d, m = _int4_case(32, 64, 32)
    assert Int4Linear(codes, d.float(), m.float() + 8 * d.float(), 32).layout == "tiles"
    assert Int4Linear(codes, d.float(), m.float() + 8 * d.float(), 32, layout="torch").layout == "torch"
    codes8 = torch.randint(-127, 128, (24, 64), generator=_gen(14), dtype=torch.int8)
    assert Int8Linear(codes8, torch.ones(24)).layout == "torch"  # 24 rows: not whole tiles
    with pytest.raises(ValueError, match="out_features % 16"):
        Int8Linear(codes8, torch.ones(24), layout="tiles")
    with pytest.raises(ValueError, match="layout"):
        Int8Linear(codes8, torch.ones(24), layout="packed")


@needs_kernels
def test_compiled_graph_calls_the_kernels() -> None:
    codes, d, m = _int4_case(32, 64, 32)
    int4 = Int4Linear(codes, d.float(), m.float() + 8 * d.float(), 32)
    int8 = Int8Linear(torch.randint(-127, 128, (32, 32), generator=_gen(15), dtype=torch.int8), torch.rand(32))
    x = torch.randn(2, 64, generator=_gen(16)).bfloat16()

    def step(inp: torch.Tensor) -> torch.Tensor:
        return int8(int4(inp))

    compiled = torch.compile(step, fullgraph=True)  # fullgraph: a graph break (the ctypes call) would raise
    torch.testing.assert_close(compiled(x), step(x), rtol=0, atol=0)


@needs_kernels
def test_layout_env_var_keeps_torchs_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    from longfit.quant.linear import build_linear
    from tests.unit.test_quant_linear import make_raw, random_weight

    raw = [make_raw(random_weight(32), "F32")]
    monkeypatch.setenv(tiles.LAYOUT_ENV_VAR, "torch")
    assert build_linear(raw, None, "int4", torch.bfloat16).layout == "torch"
    assert build_linear(raw, None, "int8", torch.bfloat16).layout == "torch"
    monkeypatch.setenv(tiles.LAYOUT_ENV_VAR, "tiles")
    assert build_linear(raw, None, "int4", torch.bfloat16).layout == "tiles"
    monkeypatch.setenv(tiles.LAYOUT_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="LONGFIT_PACKED_LAYOUT must be"):
        build_linear(raw, None, "int8", torch.bfloat16)


@needs_kernels
def test_a_nan_or_an_infinity_gives_nan_in_its_row_only() -> None:
    """The integer split of x would turn a NaN into a finite number: the kernels give NaN instead, as an exact
    product would, in the rows that hold one."""
    codes, d, m = _int4_case(32, 64, 32, seed=11)
    codes8 = torch.randint(-127, 128, (32, 64), generator=_gen(12), dtype=torch.int8)
    scales = torch.rand(32, generator=_gen(13)).bfloat16()
    for bad in (float("nan"), float("inf")):
        x = torch.randn(3, 64, generator=_gen(14)).bfloat16()
        x[1, 40] = bad
        out4 = native.q4_linear(x, tiles.pack_int4(codes), tiles.pack_lanes(d), tiles.pack_lanes(m), 32,
                                torch.float32)
        out8 = native.q8_linear(x, tiles.pack_int8(codes8), scales, torch.float32)
        for out in (out4, out8):
            assert out[1].isnan().all() and out[[0, 2]].isfinite().all()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 17])
@pytest.mark.parametrize("n_out,n_in", [(16, 32), (30, 64), (256, 640), (7, 96)])
def test_dense_bf16_kernel_matches_fp64(rows: int, n_out: int, n_in: int) -> None:
    """Plain row-major bf16 weights (csrc/dense.c): exact bf16 products, fp32 sums; N not a multiple of the
    4-row block takes the plain C loop for its last rows."""
    gen = _gen(rows * 100 + n_out)
    weight = torch.randn(n_out, n_in, generator=gen).bfloat16()
    x = torch.randn(rows, n_in, generator=gen).bfloat16()
    magnitude = (x.double().abs() @ weight.double().abs().T).float()
    out = native.bf16_linear(x, weight, torch.float32)
    assert ((out - _reference(x, weight)).abs() <= 1e-6 * magnitude + 1e-6).all()
    assert torch.equal(native.bf16_linear(x, weight), out.bfloat16())


@needs_kernels
def test_dense_bf16_kernel_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(RuntimeError, match="bf16 kernel refused"):
        native.bf16_linear(torch.zeros(1, 40).bfloat16(), torch.zeros(16, 40).bfloat16())


@needs_kernels
def test_no_rows_is_an_empty_product() -> None:
    codes, d, m = _int4_case(32, 64, 32, seed=15)
    x = torch.zeros(0, 64).bfloat16()
    assert native.q4_linear(x, tiles.pack_int4(codes), tiles.pack_lanes(d), tiles.pack_lanes(m), 32).shape == (0, 32)
    codes8 = torch.randint(-127, 128, (32, 64), generator=_gen(16), dtype=torch.int8)
    assert native.q8_linear(x, tiles.pack_int8(codes8), torch.ones(32).bfloat16()).shape == (0, 32)
    assert native.bf16_linear(x, torch.zeros(32, 64).bfloat16()).shape == (0, 32)
