"""Packed int8/int4 linears and build_linear against slow references (rtn dequantize, gguf dequantize, loops)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from longfit.models.weights import RawWeight
from longfit.quant import matmul as dense_matmul
from longfit.quant import tiles
from longfit.quant.gguf_repack import unpack_q4_rows
from longfit.quant.linear import (DEQUANTIZE_MIN_ROWS, TILES_DEQUANTIZE_MIN_ROWS, DenseLinear, Int4Linear, Int8Linear,
                                  Linear, build_linear)
from longfit.quant.rtn import dequantize_int4, dequantize_int8, quantize_int4, quantize_int4_min, quantize_int8
from longfit.runtime import native

K = 128
BF16_TOL = 6e-3  # bf16 output rounding (2^-9 relative) + bf16 scale/zero rounding (2^-9); ≤ 4.1e-3 over 8 seeds
FP32_TOL = 1e-5


def make_raw(weight: torch.Tensor, qtype: str, name: str = "w") -> RawWeight:
    """A RawWeight around ``weight`` [N, K] fp32; GGUF types hold real block bytes made by the gguf package."""
    if qtype == "F32":
        return RawWeight(name, tuple(weight.shape), "F32", lambda: weight.clone())
    gtype = gguf.GGMLQuantizationType[qtype]
    rows = gguf_quantize(weight.numpy(), gtype)  # uint8 [N, bytes_per_row]
    return RawWeight(
        name, tuple(weight.shape), qtype, lambda: torch.from_numpy(gguf_dequantize(rows, gtype).copy()), lambda: rows
    )


def random_weight(n_out: int, n_in: int = K, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Per-row offsets and scales, so min/max differ from group to group (asymmetric int4 matters).
    base = torch.randn(n_out, n_in, generator=gen) * 0.05
    return base * torch.rand(n_out, 1, generator=gen) * 2 + torch.randn(n_out, 1, generator=gen) * 0.02


def inputs(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(m, K, generator=gen) for m in (1, 5, 64)] + [torch.randn(2, 3, K, generator=gen)]


def rtn_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """The RTN int4 that build_linear uses with bf16 activations: fp16 (d, m) where it picks the tile layout
    (``tiles.default_layout``), bf16 (scale, zero) for torch's kernel."""
    if tiles.default_layout(None) == "tiles":
        return quantize_int4_min(weight, group)
    return quantize_int4(weight, group, torch.bfloat16)


def expected_weight(raw: list[RawWeight], form: str, dtype: torch.dtype, group: int = 32) -> torch.Tensor:
    """The fp32 [N, K] weight the built layer must multiply by, from the slow references."""
    weight = torch.cat([part.dequantize() for part in raw], dim=0)  # gguf's dequantize for GGUF parts
    qtypes = {part.qtype for part in raw}
    param_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    if form == "int8" or (form == "auto" and qtypes == {"Q8_0"} and dtype == torch.bfloat16):
        return dequantize_int8(*quantize_int8(weight, param_dtype))
    if form == "int4" and not qtypes <= {"Q4_0", "Q4_1"}:
        if dtype == torch.bfloat16:
            return dequantize_int4(*rtn_int4(weight, group), group)
        return dequantize_int4(*quantize_int4(weight, group, param_dtype), group)
    # Dense, and the exact Q4 repack: gguf's weights (the bf16 parameter rounding is inside BF16_TOL).
    return weight.to(dtype).float()


def assert_matches(layer: Linear, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, bias=None) -> None:
    """|y - x·Wᵀ| ≤ tol · (|x|·|W|ᵀ): error relative to the magnitude of the dot products, elementwise."""
    x = x.to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    ref = x.float() @ weight.T
    magnitude = x.float().abs() @ weight.abs().T
    if bias is not None:
        ref = ref + bias.to(dtype).float()
        magnitude = magnitude + bias.float().abs()
    tol = BF16_TOL if dtype == torch.bfloat16 else FP32_TOL
    if bias is not None:
        tol *= 2  # packed layers round twice in bf16: the kernel's output, then after adding the bias
    err = (y.float() - ref).abs() / (magnitude + 1e-6)
    assert err.max().item() < tol, f"max relative error {err.max().item():.3e} >= {tol:.1e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("form", ["bf16", "int8", "int4", "auto"])
@pytest.mark.parametrize("qtype", ["F32", "Q4_0", "Q4_1", "Q8_0"])
def test_build_linear_matches_reference(qtype: str, form: str, dtype: torch.dtype) -> None:
    raw = [make_raw(random_weight(48), qtype)]
    layer = build_linear(raw, None, form, dtype)
    packed = {"int8": Int8Linear, "int4": Int4Linear}
    auto = {"F32": DenseLinear, "Q4_0": Int4Linear, "Q4_1": Int4Linear, "Q8_0": Int8Linear}
    expected_type = packed.get(form, auto[qtype] if form == "auto" else DenseLinear)
    if dtype == torch.float32:
        expected_type = DenseLinear  # quantized forms are dequantized once into fp32
    assert type(layer) is expected_type
    assert layer.in_features == K and layer.out_features == 48
    weight = expected_weight(raw, form, dtype)
    for x in inputs():
        assert_matches(layer, x, weight, dtype)


@pytest.mark.parametrize("form", ["bf16", "int8", "int4", "auto"])
@pytest.mark.parametrize("qtype", ["F32", "Q4_1", "Q8_0"])
def test_fused_parts_and_bias(qtype: str, form: str) -> None:
    raw = [make_raw(random_weight(n, seed=i), qtype, f"p{i}") for i, n in enumerate((32, 16, 16))]
    bias = torch.randn(64)
    fused = build_linear(raw, bias, form, torch.bfloat16)
    assert fused.out_features == 64
    for x in inputs():
        assert_matches(fused, x, expected_weight(raw, form, torch.bfloat16), torch.bfloat16, bias)
        if x.shape[:-1].numel() >= getattr(fused, "dequantize_min_rows", DEQUANTIZE_MIN_ROWS):
            continue  # the 64-row fused layer dequantizes there, the 32/16-row parts keep the kernel (both checked)
        # Fused output == concatenation of the parts' outputs (per-row quantization is unchanged by fusion).
        pieces = [
            build_linear([part], b, form, torch.bfloat16)(x.bfloat16())
            for part, b in zip(raw, bias.split([32, 16, 16]))
        ]
        torch.testing.assert_close(fused(x.bfloat16()), torch.cat(pieces, dim=-1), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("form", ["bf16", "int8", "int4", "auto"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_layers_built_from_row_blocks_equal_whole_matrix_builds(qtype: str, form: str, monkeypatch) -> None:
    """The loader quantizes and converts large matrices block by block (``RawWeight.row_blocks``, never the whole
    fp32 matrix): the layer's buffers must be bit-identical to a build from the whole matrix."""
    import longfit.models.weights as weights_module

    def by_rows(raw: RawWeight) -> RawWeight:
        whole = raw.dequantize()
        return RawWeight(raw.name, raw.shape, raw.qtype, raw._dequantize, raw._quant_rows,
                         _dequantize_rows=lambda start, stop: whole[start:stop].clone())

    raw = [make_raw(random_weight(n, seed=i), qtype, f"p{i}") for i, n in enumerate((40, 24))]
    expected = build_linear(raw, None, form, torch.bfloat16)
    monkeypatch.setattr(weights_module, "DEQUANT_BLOCK_ROWS", 7)  # 6 + 4 blocks, the last ones partial
    blocked = build_linear([by_rows(part) for part in raw], None, form, torch.bfloat16)
    assert type(blocked) is type(expected)
    state, want = blocked.state_dict(), expected.state_dict()
    assert state.keys() == want.keys() and state
    for key in want:
        torch.testing.assert_close(state[key], want[key], rtol=0, atol=0, msg=key)
    x = torch.randn(3, K).bfloat16()
    torch.testing.assert_close(blocked(x), expected(x), rtol=0, atol=0)


def test_mixed_gguf_types_fall_back() -> None:
    raw = [make_raw(random_weight(32, seed=0), "Q4_1", "a"), make_raw(random_weight(16, seed=1), "Q8_0", "b")]
    auto = build_linear(raw, None, "auto", torch.bfloat16)
    assert type(auto) is DenseLinear and "Q4_1/Q8_0" in auto.fallback_reason
    int4 = build_linear(raw, None, "int4", torch.bfloat16)  # mixed: dequantize, then RTN
    assert type(int4) is Int4Linear
    for x in inputs():
        assert_matches(auto, x, expected_weight(raw, "auto", torch.bfloat16), torch.bfloat16)
        assert_matches(int4, x, expected_weight(raw, "int4", torch.bfloat16), torch.bfloat16)


def test_shape_fallbacks() -> None:
    odd_n = build_linear([make_raw(random_weight(24), "F32")], None, "int4", torch.bfloat16)  # N % 16 != 0
    assert type(odd_n) is Int8Linear and "out_features % 16" in odd_n.fallback_reason
    q4_odd_n = build_linear([make_raw(random_weight(24), "Q4_1")], None, "auto", torch.bfloat16)
    assert type(q4_odd_n) is DenseLinear and "out_features" in q4_odd_n.fallback_reason
    k96 = [make_raw(random_weight(32, 96), "F32")]
    finer = build_linear(k96, None, "int4", torch.bfloat16, group_size=128)  # 96 % 128, 96 % 64 ≠ 0 → 32
    assert type(finer) is Int4Linear and finer.group_size == 32 and "used 32" in finer.fallback_reason
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 96, generator=gen)
    assert_matches(
        finer, x, dequantize_int4(*rtn_int4(k96[0].dequantize(), 32), 32), torch.bfloat16
    )
    k40 = build_linear([make_raw(random_weight(32, 40), "F32")], None, "int8", torch.bfloat16)  # K % 16 != 0
    assert type(k40) is DenseLinear and "in_features % 16" in k40.fallback_reason
    assert build_linear([make_raw(random_weight(48), "Q4_0")], None, "int4", torch.bfloat16, 64).group_size == 32


def test_fp32_input_to_packed_layer_is_cast() -> None:
    raw = [make_raw(random_weight(48), "F32")]
    for form in ("int8", "int4"):
        layer = build_linear(raw, None, form, torch.bfloat16)
        x = inputs()[1]
        y = layer(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, layer(x.bfloat16()).float())


def test_rtn_int8_matches_loop() -> None:
    weight = random_weight(6, 32)
    weight[3] = 0.0  # an all-zero row must not divide by zero
    codes, scales = quantize_int8(weight)
    for n in range(weight.shape[0]):
        scale = max(weight[n].abs().max().item() / 127, 1e-12)
        assert scales[n].item() == pytest.approx(scale, rel=1e-6)
        for k in range(weight.shape[1]):
            assert codes[n, k].item() == max(-127, min(127, round(weight[n, k].item() / scales[n].item())))
    codes_bf, scales_bf = quantize_int8(weight, torch.bfloat16)
    assert scales_bf.dtype == torch.bfloat16 and codes_bf.dtype == torch.int8
    assert bool((scales_bf.float() >= weight.abs().amax(1) / 127).all())  # rounded up: the max still fits
    error = (dequantize_int8(codes_bf, scales_bf) - weight).abs()
    assert bool((error <= scales_bf.float()[:, None] / 2 * (1 + 1e-5)).all())


def test_rtn_int4_matches_loop() -> None:
    weight = random_weight(3, 64)
    weight[1, :32] = 0.7  # a constant group
    codes, scales, zeros = quantize_int4(weight, 32)
    for n in range(3):
        for g in range(2):
            group = weight[n, g * 32 : (g + 1) * 32].tolist()
            scale = max((max(group) - min(group)) / 15, 1e-12)
            assert scales[n, g].item() == pytest.approx(scale, rel=1e-5)
            assert zeros[n, g].item() == pytest.approx(min(group) + 8 * scale, rel=1e-5, abs=1e-7)
            for j, value in enumerate(group):
                q = max(0, min(15, round((value - zeros[n, g].item()) / scales[n, g].item()) + 8))
                assert codes[n, g * 32 + j].item() == q
    assert torch.isfinite(dequantize_int4(codes, scales, zeros, 32)).all()
    big = random_weight(16, 256, seed=3)
    for group_size in (32, 64, 128, 256):
        for param_dtype in (torch.float32, torch.bfloat16):
            codes, scales, zeros = quantize_int4(big, group_size, param_dtype)
            assert int(codes.max()) <= 15 and scales.dtype == param_dtype
            step = scales.float().repeat_interleave(group_size, dim=1)
            slack = zeros.float().abs().repeat_interleave(group_size, dim=1) * 2.0**-8  # bf16 rounding of zero
            error = (dequantize_int4(codes, scales, zeros, group_size) - big).abs()
            assert bool((error <= step / 2 * (1 + 1e-5) + slack).all())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_unpack_q4_rows_is_exact(qtype: str) -> None:
    raw = make_raw(random_weight(16), qtype)
    codes, scales, zeros = unpack_q4_rows(raw.quant_rows(), qtype, K)
    assert codes.shape == (16, K) and scales.shape == (16, K // 32)
    torch.testing.assert_close(dequantize_int4(codes, scales, zeros, 32), raw.dequantize(), rtol=0, atol=1e-7)


def test_unpack_q4_nibble_order() -> None:
    # One Q4_0 block, d = 1: byte j holds element j (low nibble) and element j + 16 (high nibble).
    qs = np.arange(16, dtype=np.uint8) | ((15 - np.arange(16, dtype=np.uint8)) << 4)
    row = np.concatenate([np.array([1.0], dtype=np.float16).view(np.uint8), qs])[None, :]  # [1, 18]
    codes, scales, zeros = unpack_q4_rows(row, "Q4_0", 32)
    assert codes[0].tolist() == list(range(16)) + list(range(15, -1, -1))
    assert scales.item() == 1.0 and zeros.item() == 0.0


def test_weight_nbytes_is_analytic() -> None:
    raw = [make_raw(random_weight(48), "F32")]
    assert build_linear(raw, None, "bf16", torch.bfloat16).weight_nbytes() == 48 * K * 2
    assert build_linear(raw, None, "int8", torch.bfloat16).weight_nbytes() == 48 * K + 48 * 2
    int4 = build_linear(raw, torch.zeros(48), "int4", torch.bfloat16, group_size=64)
    assert int4.weight_nbytes() == 48 * K // 2 + (K // 64) * 48 * 2 * 2 + 48 * 2


def test_bad_arguments_name_the_field() -> None:
    raw = [make_raw(random_weight(48), "F32")]
    with pytest.raises(ValueError, match="form"):
        build_linear(raw, None, "int3", torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        build_linear(raw, None, "int8", torch.float16)
    with pytest.raises(ValueError, match="group_size"):
        build_linear(raw, None, "int4", torch.bfloat16, group_size=16)
    with pytest.raises(ValueError, match="parts"):
        build_linear([], None, "int8", torch.bfloat16)
    with pytest.raises(ValueError, match="parts"):
        build_linear([*raw, make_raw(random_weight(16, 64), "F32")], None, "int8", torch.bfloat16)
    with pytest.raises(ValueError, match="bias"):
        build_linear(raw, torch.zeros(47), "int8", torch.bfloat16)
    with pytest.raises(ValueError, match="in_features"):
        Int8Linear(torch.zeros(16, 40, dtype=torch.int8), torch.ones(16))  # the kernel would return garbage
    with pytest.raises(ValueError, match="out_features"):
        Int4Linear(torch.zeros(24, 64, dtype=torch.uint8), torch.ones(24, 2), torch.zeros(24, 2), 32)


@pytest.mark.parametrize("form", ["int4", "int8"])
def test_many_rows_dequantize_like_the_kernel(form: str, bf16_mode: str) -> None:
    """From dequantize_min_rows rows on, packed layers run dequantize + bf16 matmul: the kernel's result to bf16."""
    raw = [make_raw(random_weight(128), "F32")]
    layer = build_linear(raw, None, form, torch.bfloat16)
    assert layer.form == form
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(layer.dequantize_min_rows + 3, K, generator=gen).bfloat16()
    kernel = torch.cat([layer(part) for part in x.split(layer.dequantize_min_rows - 1)])  # below the threshold
    dense = layer(x)
    magnitude = x.float().abs() @ expected_weight(raw, form, torch.bfloat16).abs().T
    err = (dense.float() - kernel.float()).abs() / (magnitude + 1e-6)
    assert err.max().item() < 2 * 2**-9, err.max().item()  # the weight's and the output's bf16 roundings
    if form == "int4":
        codes, scales, zeros = rtn_int4(raw[0].dequantize(), 32)
        torch.testing.assert_close(layer.dequantized_t().float(),
                                   dequantize_int4(codes, scales, zeros, 32).T.bfloat16().float(), rtol=0, atol=0)


@pytest.fixture(params=["fast", "slow"])
def bf16_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Both answers of ``matmul.bf16_matmul_fast`` (the probe decides per machine; each path must be right)."""
    from longfit.quant import matmul

    monkeypatch.setenv(matmul.ENV_VAR, request.param)
    matmul.reset_probe()
    yield request.param
    matmul.reset_probe()


@pytest.mark.parametrize("rows", [1, 3, 5, 16, DEQUANTIZE_MIN_ROWS + 3, TILES_DEQUANTIZE_MIN_ROWS["int8"] + 3])
def test_dense_matmul_either_bf16_mode_matches_fp32(bf16_mode: str, rows: int) -> None:
    """``matmul.linear`` over a bf16 weight: the fp32 product (slow-bf16 CPUs, FP32_MIN_ROWS rows on) or the bf16 one;
    either is within the bf16 product's rounding of an fp64 reference, in the activations' dtype."""
    from longfit.quant import matmul

    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, K, generator=gen).bfloat16()
    bias = torch.randn(48, generator=gen).bfloat16()
    x = torch.randn(rows, K, generator=gen).bfloat16()
    assert matmul.uses_fp32(weight, rows) == (bf16_mode == "slow" and rows >= matmul.FP32_MIN_ROWS)
    out = matmul.linear(x, weight, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 48)
    exact = x.double() @ weight.double().T + bias.double()
    scale = x.double().abs() @ weight.double().abs().T + bias.double().abs()
    assert ((out.double() - exact).abs() / scale).max().item() < 2 * 2**-8
    layer = build_linear([make_raw(weight.float(), "F32")], bias, "int8", torch.bfloat16)
    kernel = torch.cat([layer(part) for part in x.split(layer.dequantize_min_rows - 1)])  # rows below the threshold
    err = (layer(x).float() - kernel.float()).abs() / (x.float().abs() @ weight.float().abs().T + 1e-6)
    assert err.max().item() < 2 * 2**-8


def test_bf16_matmul_mode_rejects_unknown_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from longfit.quant import matmul

    monkeypatch.setenv(matmul.ENV_VAR, "sometimes")
    matmul.reset_probe()
    with pytest.raises(ValueError, match="LONGFIT_BF16_MATMUL"):
        matmul.bf16_matmul_fast()
    monkeypatch.delenv(matmul.ENV_VAR)
    matmul.reset_probe()
    assert matmul.bf16_matmul_fast() in (True, False)  # the probe answers


@pytest.mark.parametrize("block_bytes", [4 * K * 16, 4 * K * 40, 1 << 30])
def test_fp32_linear_by_blocks_equals_one_product(block_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``matmul.fp32_linear`` converts a bf16 weight a block of rows at a time (16 rows, 40 rows with a last partial
    block, or whole): every split gives the fp32 product of the whole weight, bias included."""
    from longfit.quant import matmul

    monkeypatch.setattr(matmul, "CONVERT_BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(100, K, generator=gen).bfloat16()
    bias = torch.randn(100, generator=gen).bfloat16()
    x = torch.randn(7, K, generator=gen).bfloat16()
    out = matmul.fp32_linear(x, weight, bias)
    assert out.dtype == torch.float32 and out.shape == (7, 100) and out.is_contiguous()
    exact = x.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


def test_large_weights_switch_to_fp32_at_fewer_rows(bf16_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight larger than the last-level cache takes the fp32 path from FP32_MIN_ROWS_LARGE rows, others from
    FP32_MIN_ROWS; only where bf16 is slow, and never for one row."""
    from longfit.quant import matmul

    small = torch.zeros(48, K, dtype=torch.bfloat16)
    large = torch.zeros(96, K, dtype=torch.bfloat16)
    monkeypatch.setattr(matmul, "LARGE_WEIGHT_BYTES", large.numel() * 2)
    slow = bf16_mode == "slow"
    assert [matmul.uses_fp32(large, rows) for rows in (1, matmul.FP32_MIN_ROWS_LARGE)] == [False, slow]
    assert [matmul.uses_fp32(small, rows) for rows in (matmul.FP32_MIN_ROWS_LARGE, matmul.FP32_MIN_ROWS)] == [
        False, slow]
    assert not matmul.uses_fp32(large.float(), 64)


prepack_ops = pytest.mark.skipif(not dense_matmul.prepack_available(),
                                 reason="this torch or CPU has no oneDNN prepacked bf16 linear")


@prepack_ops
def test_prepacked_dense_layer_equals_plain_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prepacked bf16 layer (oneDNN's blocked weight, no per-call reorder) gives exactly ``F.linear``'s result for
    every input shape and dtype the model feeds it, frees its plain weight and can rebuild it."""
    monkeypatch.setenv(dense_matmul.PREPACK_ENV_VAR, "force")  # also on CPUs where the bf16 GEMM is slow
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, K, generator=gen).bfloat16()
    bias = torch.randn(96, generator=gen).bfloat16()
    packed, plain = DenseLinear(weight.clone(), bias), DenseLinear(weight.clone(), bias)
    nbytes = plain.weight_nbytes()
    assert packed.prepack() and packed.weight is None and packed.packed is not None
    assert packed.prepack()  # idempotent
    assert torch.equal(packed.dense_weight(), weight)
    assert packed.weight_nbytes() >= nbytes and packed.read_nbytes() == packed.weight_nbytes()
    head = DenseLinear(weight.clone())
    assert head.prepack(keep_plain=True) and head.weight is not None  # both forms held, one read
    assert head.weight_nbytes() >= 2 * head.read_nbytes() > 0
    for x in (torch.randn(1, K, generator=gen), torch.randn(7, K, generator=gen), torch.randn(2, 3, K, generator=gen),
              torch.randn(K, 5, generator=gen).T, torch.randn(0, K, generator=gen)):
        for dtype in (torch.bfloat16, torch.float32):
            xd = x.to(dtype)
            out = packed(xd)
            expected = F.linear(xd.bfloat16(), weight, bias).to(dtype)
            assert out.dtype == dtype and out.shape == expected.shape
            assert torch.equal(out, expected)


@pytest.mark.parametrize("bf16_mode", ["slow"], indirect=True)
def test_prepack_declines_what_it_cannot_speed_up(bf16_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 weights, ``LONGFIT_PREPACK=0`` and, without ``force``, CPUs whose bf16 GEMM is slow keep plain weights;
    an unknown value of the variable is a clear error."""
    weight = torch.randn(32, K).bfloat16()
    assert not DenseLinear(weight.float()).prepack()
    monkeypatch.setenv(dense_matmul.PREPACK_ENV_VAR, "0")
    assert not DenseLinear(weight).prepack()
    monkeypatch.setenv(dense_matmul.PREPACK_ENV_VAR, "1")  # bf16 slow here (the fixture): not worth it
    layer = DenseLinear(weight)
    assert not layer.prepack() and layer.weight is not None
    monkeypatch.setenv(dense_matmul.PREPACK_ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="LONGFIT_PREPACK"):
        dense_matmul.should_prepack(weight)


@pytest.mark.skipif(native.library() is None, reason="C kernels not built (no compiler)")
def test_dense_bf16_layer_keeps_its_plain_weight_for_the_few_row_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the C kernel takes a bf16 weight (K % 32 == 0), ``prepack`` leaves it plain: fewer than
    ``DENSE_KERNEL_MAX_ROWS`` rows go through ``native.bf16_linear`` (within fp32 rounding of F.linear's exact bf16
    products), more through F.linear; the LM head (``keep_plain``) still holds both forms; K % 32 != 0 prepacks."""
    from longfit.quant.linear import DENSE_KERNEL_MAX_ROWS

    monkeypatch.delenv(dense_matmul.PREPACK_ENV_VAR, raising=False)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(40, K, generator=gen).bfloat16()
    bias = torch.randn(40, generator=gen).bfloat16()
    layer = DenseLinear(weight.clone(), bias)
    assert not layer.prepack() and layer.weight is not None and layer.packed is None
    calls = []
    kernel = native.bf16_linear
    monkeypatch.setattr(native, "bf16_linear", lambda x, w: calls.append(x.shape[0]) or kernel(x, w))
    assert layer(torch.zeros(0, K).bfloat16()).shape == (0, 40)  # no rows: nothing to do
    assert layer(torch.randn(3, K, generator=gen)).dtype == torch.float32  # fp32 in, fp32 out (torch's product)
    for rows in (1, 3, DENSE_KERNEL_MAX_ROWS - 1, DENSE_KERNEL_MAX_ROWS, DENSE_KERNEL_MAX_ROWS + 5):
        x = torch.randn(rows, K, generator=gen).bfloat16()
        exact = (x.double() @ weight.double().T + bias.double()).float()
        out = layer(x)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 40)
        assert ((out.float() - exact).abs() <= 2**-7 * exact.abs() + 1e-2).all()
    assert calls == [0, 1, 3, DENSE_KERNEL_MAX_ROWS - 1]
    if dense_matmul.should_prepack(weight):
        head = DenseLinear(weight.clone())
        assert head.prepack(keep_plain=True) and head.weight is not None and head.packed is not None
        odd = DenseLinear(torch.randn(32, 48, generator=gen).bfloat16())
        assert odd.prepack() and odd.weight is None


@pytest.mark.parametrize("layout", ["tiles", "torch"])
def test_code_abs_sums_by_blocks_equal_the_whole_sum(layout: str) -> None:
    if layout == "tiles" and native.library() is None:
        pytest.skip("C kernels not built (no compiler)")
    gen = torch.Generator().manual_seed(9)
    codes = torch.randint(-127, 128, (16 * 7, 64), generator=gen, dtype=torch.int8)  # 7 tiles: a last odd one
    layer = Int8Linear(codes, torch.rand(16 * 7, generator=gen), layout=layout)
    expected = codes.float().abs().sum(1)
    for block_rows in (32, 64, 4096):
        assert torch.equal(layer.code_abs_sums(block_rows), expected)
