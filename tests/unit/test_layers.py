"""Decoder building blocks against the plain formulas: RMSNorm, RoPE, the gated MLP, the LM head's exact leaders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longfit.config import ModelConfig
from longfit.models.base import _LEAD_ABS, _LEAD_REL, PACKED_HEAD_MAX_ROWS, rescore_leaders
from longfit.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, WeightSource, random_weights
from longfit.models.llama import LlamaForCausalLM
from longfit.quant.linear import DenseLinear, Int8Linear
from longfit.runtime import native


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [False, True])
def test_rms_norm_matches_formula(offset: bool, out_dtype: torch.dtype) -> None:
    x = torch.randn(5, 64, generator=_gen()) * 3
    weight = torch.randn(64, generator=_gen(1))
    norm = RMSNorm(weight, 1e-6, offset=offset, out_dtype=out_dtype)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (weight + 1 if offset else weight)
    got = norm(x)
    assert got.dtype == out_dtype
    torch.testing.assert_close(got.float(), expected.to(out_dtype).float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_rotate_half(dtype: torch.dtype) -> None:
    rope = RotaryEmbedding(16, 10000.0, None, max_positions=64)
    positions = torch.tensor([0, 3, 63, 200])  # 200: the table grows on demand
    x = torch.randn(4, 3, 16, generator=_gen()).to(dtype)
    cos, sin = rope.cos_sin(positions)
    got = RotaryEmbedding.apply(x, cos, sin)
    angles = positions[:, None].double() * rope.inv_freq[None, :]  # [N, D/2]
    c, s = angles.cos().float()[:, None], angles.sin().float()[:, None]
    x1, x2 = x.float()[..., :8], x.float()[..., 8:]
    expected = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), expected.to(dtype).float(), rtol=1e-5, atol=1e-5)


def test_rope_rotate_and_its_inverse() -> None:
    """``rotate`` equals ``apply`` at the positions; ``inverse`` is the rotation by ``-position`` and undoes it
    (leading batch dims broadcast: [R, T, H, D] keys of pre-RoPE streams)."""
    rope = RotaryEmbedding(16, 10000.0, None, max_positions=64)
    positions = torch.arange(40, 80)
    x = torch.randn(2, 40, 3, 16, generator=_gen())
    rotated = rope.rotate(x, positions)
    cos, sin = rope.cos_sin(positions)
    torch.testing.assert_close(rotated[1], RotaryEmbedding.apply(x[1], cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(rope.rotate(rotated, positions, inverse=True), x, rtol=1e-5, atol=1e-5)
    angles = -positions[:, None].double() * rope.inv_freq[None, :]  # [T, D/2]
    c, s = angles.cos().float()[:, None], angles.sin().float()[:, None]
    x1, x2 = x[..., :8], x[..., 8:]
    expected = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    torch.testing.assert_close(rope.rotate(x, positions, inverse=True), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_mlp_matches_formula_and_keeps_input(activation: str) -> None:
    gate, up, down = (torch.randn(32, 16, generator=_gen(1)), torch.randn(32, 16, generator=_gen(2)),
                      torch.randn(16, 32, generator=_gen(3)))
    mlp = GatedMLP(DenseLinear(torch.cat([gate, up])), DenseLinear(down), activation)
    x = torch.randn(3, 16, generator=_gen())
    before = x.clone()
    act = F.silu(x @ gate.T) if activation == "silu" else F.gelu(x @ gate.T, approximate="tanh")
    torch.testing.assert_close(mlp(x), (act * (x @ up.T)) @ down.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, before)


def _tied_model(form: str) -> LlamaForCausalLM:
    config = ModelConfig.tiny(tie_word_embeddings=True, vocab_size=512)
    return LlamaForCausalLM(config, WeightSource(random_weights(config, seed=3), form, torch.bfloat16))


def test_dense_tied_head_shares_the_embedding_table() -> None:
    model = _tied_model("dense")
    assert isinstance(model.lm_head, DenseLinear) and model.embed is model.lm_head.weight


def test_int8_head_leaders_are_exact() -> None:
    """An int8 head tied to the embeddings: every row's top token and its logit are those of the bf16 rows."""
    model = _tied_model("int8")
    assert isinstance(model.lm_head, Int8Linear) and model.exact_rows is model.embed
    # Many rows with close leaders: blends of two embedding rows.
    gen = _gen(7)
    pairs = torch.randint(0, 512, (400, 2), generator=gen)
    mix = torch.rand(400, 1, generator=gen)
    hidden = (model.embed[pairs[:, 0]].float() * mix + model.embed[pairs[:, 1]].float() * (1 - mix)) * 4
    hidden = hidden.bfloat16()
    with torch.inference_mode():
        # A few rows at a time: the int8 kernel; many: the bf16 embedding table (PACKED_HEAD_MAX_ROWS).
        small = torch.cat([model.compute_logits(part) for part in hidden.split(PACKED_HEAD_MAX_ROWS - 1)])
        logits = model.compute_logits(hidden)
    exact = hidden.float() @ model.embed.float().T  # [M, V]
    fast = model.lm_head(hidden).float()
    assert (fast.argmax(-1) != exact.argmax(-1)).any(), "the test needs rows where the int8 head alone is wrong"
    rows, top = torch.arange(400), exact.argmax(-1)
    for got in (small, logits):
        assert torch.equal(got.argmax(-1), top)
        torch.testing.assert_close(got[rows, top], exact[rows, top], rtol=1e-5, atol=1e-4)


def test_int8_head_leaders_are_rescored_after_the_bias() -> None:
    """Structured output (-inf for forbidden tokens) and logit_bias enter ``compute_logits`` as one additive bias:
    the rescored leaders must be the best tokens *as biased*. Biasing after the rescoring would leave the winners at
    their int8 values (off by up to ~0.5) and greedy could pick another token than the exact weights. Here every
    row's two exact leaders are forbidden and a few other tokens get +0.3 to +1."""
    model = _tied_model("int8")
    gen = _gen(11)
    pairs = torch.randint(0, 512, (400, 2), generator=gen)
    mix = torch.rand(400, 1, generator=gen)
    hidden = ((model.embed[pairs[:, 0]].float() * mix + model.embed[pairs[:, 1]].float() * (1 - mix)) * 4).bfloat16()
    exact = hidden.float() @ model.embed.float().T  # [M, V]
    allowed = torch.rand(exact.shape, generator=gen) < 0.3
    allowed[torch.arange(400)[:, None], exact.topk(2, dim=-1).indices] = False
    bias = torch.where(allowed, 0.0, float("-inf"))
    boosted = torch.randint(0, 512, (400, 4), generator=gen)
    bias.scatter_add_(1, boosted, 0.3 + 0.7 * torch.rand(400, 4, generator=gen))
    best = (exact + bias).argmax(-1)
    with torch.inference_mode():
        naive = model.compute_logits(hidden) + bias
        small = torch.cat([model.compute_logits(h, b) for h, b in zip(hidden.split(PACKED_HEAD_MAX_ROWS - 1),
                                                                        bias.split(PACKED_HEAD_MAX_ROWS - 1))])
        logits = model.compute_logits(hidden, bias)
    assert (naive.argmax(-1) != best).any(), "the test needs rows where biasing after the rescoring is wrong"
    rows = torch.arange(400)
    for got in (small, logits):
        assert torch.isinf(got[~allowed]).all() and torch.isfinite(got[allowed]).all()
        assert torch.equal(got.argmax(-1), best)
        torch.testing.assert_close(got[rows, best], (exact + bias)[rows, best], rtol=1e-5, atol=1e-4)

@pytest.mark.parametrize("with_error", [False, True])
def test_head_leaders_in_c_equal_the_torch_rule(with_error: bool) -> None:
    """``native.head_leaders`` (the C rescoring ``compute_logits`` uses on CPU) against ``rescore_leaders``: the same
    logits recomputed, the same values to fp32 summation order; a row holding a NaN is left alone by both."""
    if native.library() is None:
        pytest.skip("the C kernels are not built here")
    model = _tied_model("int8")
    gen = _gen(5)
    pairs = torch.randint(0, 512, (64, 2), generator=gen)
    mix = torch.rand(64, 1, generator=gen)
    hidden = ((model.embed[pairs[:, 0]].float() * mix + model.embed[pairs[:, 1]].float() * (1 - mix)) * 4).bfloat16()
    row_error = model.head_row_error if with_error else None
    with torch.inference_mode():
        fast = model.lm_head(hidden).float()
    fast = fast.clone()
    fast[3, 7] = float("nan")
    in_torch, in_c = fast.clone(), fast.clone()
    rescore_leaders(in_torch, hidden, model.embed, row_error)
    count = native.head_leaders(in_c, hidden, model.embed, row_error, _LEAD_REL, _LEAD_ABS)
    changed = in_c != fast
    assert count >= 63 and torch.equal(changed, in_torch != fast)
    assert torch.equal(in_c[3].nan_to_num(), fast[3].nan_to_num())
    torch.testing.assert_close(in_c, in_torch, rtol=1e-6, atol=1e-5, equal_nan=True)
