"""Which part of a quantized KV cache costs perplexity: keys or values, sinks, group sizes, pre-RoPE keys, outliers
(docs/FIDELITY.md, "Where KIVI-2's cost comes from").

    python scripts/kv_quant_ablation.py --length 2048 --windows 2 [--variants kivi2,k4v2,...]

Fake quantization (quantize, dequantize) inside the slow reference forward of ``tests/model/reference.py``, so each
variant is a few lines and not an engine format. The schedule is the engine's KIVI schedule: each window of
``--length`` tokens of standard-library docstrings (``eval.corpus.long_text``) is split into a context of
``length - 256`` tokens and a 256-token teacher-forced tail; query ``t`` of the tail reads the first
``t - t % 128`` tokens quantized (the residual window of 128 stays exact) and every prompt query reads exact KV. The
perplexity is over the tail's predictions, as ``longfit eval --perplexity`` scores them.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longfit import LLM
from longfit.compression.kv_quant import (
    KVQuantPolicy,
    dequantize,
    quantize_keys_per_channel,
    quantize_values_per_token,
)
from longfit.eval.corpus import long_text
from tests.model.reference import apply_rope, reference_logits

TAIL, RESIDUAL = 256, 128


def _schedule(n: int, context: int) -> torch.Tensor:
    """use [T, T]: query t reads key j from the quantized copy (tail queries, keys before their last flush)."""
    t = torch.arange(n)
    quantized = torch.where(t >= context, t - t % RESIDUAL, 0)
    return t[None, :] < quantized[:, None]


def kivi_view(context: int, key_bits: int, value_bits: int, key_group: int = 32, value_group: int = 32,
              sinks: int = 0) -> Callable:
    """Post-RoPE KIVI: keys per channel over ``key_group`` tokens, values per token over ``value_group`` channels;
    16 bits leaves that side exact; ``sinks`` first tokens stay exact."""
    def view(layer, q, k, v):
        whole = k.shape[0] - k.shape[0] % RESIDUAL
        sk, sv = k.float().clone(), v.float().clone()
        kk, vv = k[:whole].float().transpose(0, 1), v[:whole].float().transpose(0, 1)  # [Hkv, T, D]
        if key_bits < 16:
            sk[:whole] = dequantize(quantize_keys_per_channel(kk, key_bits, key_group)).transpose(0, 1)
        if value_bits < 16:
            sv[:whole] = dequantize(quantize_values_per_token(vv, value_bits, value_group)).transpose(0, 1)
        sk[:sinks], sv[:sinks] = k[:sinks].float(), v[:sinks].float()
        return sk, sv, _schedule(k.shape[0], context)
    return view


def kvquant_view(model, context: int, bits: int, outliers: float, group: int = 32) -> Callable:
    """KVQuant-style: pre-RoPE keys (rotated back with the model's inv_freq), dense-and-sparse outliers."""
    def view(layer, q, k, v):
        whole = k.shape[0] - k.shape[0] % RESIDUAL
        inv_freq = model.layers[layer].attn.rope.inv_freq
        positions = torch.arange(whole)
        pre_rope = apply_rope(k[:whole].float(), -positions, inv_freq).transpose(0, 1)
        policy = KVQuantPolicy(bits=bits, group=group, outliers=outliers)
        keys, values = policy.dequantize(policy.quantize(pre_rope, v[:whole].float().transpose(0, 1)))
        sk, sv = k.float().clone(), v.float().clone()
        sk[:whole] = apply_rope(keys.transpose(0, 1), positions, inv_freq)
        sv[:whole] = values.transpose(0, 1)
        return sk, sv, _schedule(k.shape[0], context)
    return view


def variants(model, context: int) -> dict[str, Callable | None]:
    return {
        "full": None,
        "kivi4": kivi_view(context, 4, 4),
        "kivi2": kivi_view(context, 2, 2),
        "k2v16": kivi_view(context, 2, 16),
        "k16v2": kivi_view(context, 16, 2),
        "k4v2": kivi_view(context, 4, 2),
        "k2v4": kivi_view(context, 2, 4),
        "kivi2-sinks1": kivi_view(context, 2, 2, sinks=1),
        "kivi2-sinks4": kivi_view(context, 2, 2, sinks=4),
        "kivi2-kgroup16": kivi_view(context, 2, 2, key_group=16),
        "kivi2-vgroup16": kivi_view(context, 2, 2, value_group=16),
        "kvquant2": kvquant_view(model, context, 2, 0.0),
        "kvquant2-o1%": kvquant_view(model, context, 2, 0.01),
        "kvquant2-o5%": kvquant_view(model, context, 2, 0.05),
        "kvquant2-o1%-g16": kvquant_view(model, context, 2, 0.01, group=16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--variants", default="", help="comma-separated names (default: all)")
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    llm = LLM(args.model, dtype="float32")
    model, tokenizer = llm.engine.runner.model, llm.get_tokenizer()
    context = args.length - TAIL
    bos_id = getattr(tokenizer, "bos_token_id", None)  # as longfit eval builds its windows
    bos = [bos_id] if bos_id is not None and getattr(tokenizer, "add_bos_token", False) else []
    ids = tokenizer.encode(long_text(6 * args.length * (args.windows + 1)))
    body = args.length - len(bos)
    windows = [bos + ids[i * body:(i + 1) * body] for i in range(args.windows)]
    table = variants(model, context)
    names = args.variants.split(",") if args.variants else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(table)}")
    full = None
    for name in ["full"] + [n for n in names if n != "full"]:
        nll, count, start = 0.0, 0, time.time()
        for window in windows:
            logprobs = reference_logits(model, window, table[name])[context:-1].log_softmax(-1)
            targets = torch.tensor(window[context + 1:])
            nll -= logprobs[torch.arange(len(targets)), targets].sum().item()
            count += len(targets)
        ppl = math.exp(nll / count)
        full = full or ppl
        print(f"{name:18s} ppl {ppl:8.3f}  {100 * (ppl / full - 1):+6.1f}%  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
