"""``models.quant_decode.kivi_decode_attention`` (attention from KIVI codes) against the slow path: dequantize the
records, then fp64 softmax attention over stream + tail, with padding records of garbage bytes (NaN scales)."""

from __future__ import annotations

import pytest
import torch

from longfit.compression.spec import make_stage
from longfit.models.quant_decode import kivi_decode_attention
from longfit.runtime.quant_pages import PageQuantFormat


@pytest.mark.parametrize("bits,key_bits,group,dim", [(2, None, 8, 64), (4, None, 16, 64), (2, None, 32, 64),
                                                     (4, None, 8, 32), (2, 4, 32, 64), (4, 2, 8, 32)])
def test_attention_from_codes_equals_dequantized_attention(bits: int, key_bits: int | None, group: int,
                                                           dim: int) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + group)
    hkv, hq, batch, tail = 2, 6, 3, 5
    stage = make_stage("kivi", bits=bits, key_bits=key_bits, group=group, residual=2 * group)
    fmt = PageQuantFormat.from_stage(stage, hkv, dim)
    records_per_row = [4, 1, 3]
    n = max(records_per_row)
    rows = []
    for count in records_per_row:
        keys = torch.randn(count * group, hkv, dim, generator=gen) * 2
        values = torch.randn(count * group, hkv, dim, generator=gen)
        encoded = fmt.encode(keys, values)  # [count, record_bytes]
        garbage = torch.full((n - count, fmt.record_bytes), 0xFF, dtype=torch.uint8)  # fp16 NaN scales
        rows.append(torch.cat([encoded, garbage]))
    records = torch.stack(rows)  # [B, n, record_bytes]
    stream_valid = torch.arange(n * group) < torch.tensor(records_per_row).unsqueeze(1) * group
    tail_keys = torch.randn(batch, hkv, tail, dim, generator=gen)
    tail_values = torch.randn(batch, hkv, tail, dim, generator=gen)
    tail_valid = torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [True] * 4 + [False]])
    q = torch.randn(batch, hq, dim, generator=gen).bfloat16()
    scale = dim ** -0.5

    out = kivi_decode_attention(q, records, fmt, stream_valid, tail_keys, tail_values, tail_valid, scale)

    keys, values = fmt.decode(records)  # [B, n*G, Hkv, D] fp32 (padding: garbage)
    keys = torch.cat([keys.transpose(1, 2), tail_keys], dim=2).double()  # [B, Hkv, T + S, D]
    values = torch.cat([values.transpose(1, 2), tail_values], dim=2).double()
    valid = torch.cat([stream_valid, tail_valid], dim=1)
    keys, values = keys.masked_fill(~valid[:, None, :, None], 0.0), values.masked_fill(~valid[:, None, :, None], 0.0)
    qd = q.double().view(batch, hkv, hq // hkv, dim)
    scores = (qd @ keys.transpose(-1, -2) * scale).masked_fill(~valid[:, None, None, :], float("-inf"))
    expected = (torch.softmax(scores, dim=-1) @ values).view(batch, hq, dim)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5 * expected.abs().max().item())


def test_engine_generations_equal_the_dequantizing_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of KIVI requests of unequal lengths: greedy tokens and their logprobs are the same whether decode
    attends from the codes or from the dequantized stream (``attention.FUSED_KIVI_DECODE``)."""
    from longfit import SamplingParams
    from longfit.models import attention
    from tests.conftest import make_tiny_llm

    llm = make_tiny_llm(max_num_batched_tokens=512)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    text = "the quick brown fox jumps over the lazy dog; " * 6
    prompts = [text, text[:90], text[20:200]]

    def run() -> list[tuple[list[int], list[float]]]:
        outs = llm.generate(prompts, params, kv_compression="kivi:bits=2,group=8,residual=16")
        return [(o.outputs[0].token_ids, [pos[t].logprob for t, pos in zip(o.outputs[0].token_ids,
                                                                             o.outputs[0].logprobs)]) for o in outs]

    fused = run()
    monkeypatch.setattr(attention, "FUSED_KIVI_DECODE", False)
    general = run()
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(fused, general):
        assert tokens == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=1e-3)
