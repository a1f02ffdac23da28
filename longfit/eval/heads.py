"""``longfit profile-heads``: find a model's retrieval heads with synthetic passkey prompts, for DuoAttention.

For each sample (the seeded passkey task of ``eval.tasks``), the whole prompt runs through the engine; at the end of
its prefill the last ``window`` queries of every full-attention layer attend, in float32, over the layer's cached
keys, and the share of their attention that lands on the passkey line's tokens is recorded per query head. A KV
head's score is the mean share of its query heads over the window and the samples, divided by the largest score of
the model, so it lies in [0, 1] and higher means the head retrieves from far back. The file written is the one
``duo_attention:heads=PATH`` loads (``compression.head_scores.write_head_scores``).

Paper: "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads". Deliberate
difference: DuoAttention learns a gate per head by distillation on passkey data (hours on a GPU); longfit scores
heads by their attention on the passkey, as RazorAttention's retrieval-head test does — a few seconds per sample on
a CPU. Sliding-window layers (Gemma 3) are never evicted and get score 1.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from longfit.compression.base import KeepPlan
from longfit.compression.head_scores import write_head_scores
from longfit.eval import tasks as task_registry
from longfit.sampling_params import SamplingParams

PROBE_SPEC = "snapkv:keep=1.0,window={window}"  # a spec whose compaction step captures the queries


@dataclass(frozen=True, slots=True)
class _NeedleProbe:
    """Stands in for the spec's policy during profiling: records attention shares, keeps every token."""

    name: ClassVar[str] = "profile"
    kind: ClassVar[str] = "evict"
    window: int
    scale: float
    span: tuple[int, int]  # needle tokens [start, end)
    shares: dict  # layer → [Hkv] float64 tensor, accumulated

    @property
    def window_size(self) -> int:
        return self.window

    def plan(self, layer: int, num_layers: int, keys: torch.Tensor, values: torch.Tensor,
             queries: torch.Tensor | None) -> KeepPlan:
        """keys: [Hkv, T, D]; queries: [Hq, W, D] of the prompt's last W tokens (post-RoPE)."""
        num_kv_heads, num_tokens, _ = keys.shape
        q = queries[:, -self.window:].float()  # [Hq, W, D]
        groups = q.shape[0] // num_kv_heads
        k = keys.float().repeat_interleave(groups, dim=0)  # [Hq, T, D]
        scores = torch.einsum("hwd,htd->hwt", q, k) * self.scale
        query_pos = torch.arange(num_tokens - q.shape[1], num_tokens).unsqueeze(1)
        scores = scores.masked_fill(torch.arange(num_tokens).unsqueeze(0) > query_pos, float("-inf"))
        share = scores.softmax(-1)[..., self.span[0]:self.span[1]].sum(-1).mean(-1)  # [Hq]
        per_kv = share.view(num_kv_heads, groups).mean(-1).double()
        self.shares[layer] = self.shares.get(layer, 0) + per_kv
        return KeepPlan.keep_all(num_kv_heads, num_tokens)


def profile_heads(llm: Any, samples: int = 8, length: int = 1024, window: int = 16,
                  seed: int = 0) -> list[list[float]]:
    """Scores ``[L][Hkv]`` in [0, 1] (see the module docstring)."""
    if samples < 1 or window < 1:
        raise ValueError(f"samples and window must be >= 1, got samples={samples}, window={window}")
    engine = llm.engine
    config = engine.model_config
    tokenizer = llm.get_tokenizer()
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    generated = task_registry.generate("passkey", samples, length - len(bos), lambda t: len(encode(t)), seed)
    compactor = engine.runner.compactor
    spec = PROBE_SPEC.format(window=window)
    shares: dict[int, torch.Tensor] = {}
    try:
        for sample in generated:
            start, end = sample.meta["needle_offsets"][0]
            span = (len(bos + encode(sample.context[:start])), len(bos + encode(sample.context[:end])))
            compactor._policies[spec] = [_NeedleProbe(window, compactor.attention_scale, span, shares)]
            ids = bos + encode(sample.context) + encode(sample.question + sample.answer_prefix)
            llm.generate([ids], SamplingParams(max_tokens=1, temperature=0), kv_compression=spec, use_tqdm=False)
    finally:
        compactor._policies.pop(spec, None)
    scores = [[1.0] * config.num_kv_heads for _ in range(config.num_layers)]
    if shares:
        top = max(float(s.max()) for s in shares.values()) or 1.0
        for layer, share in shares.items():
            scores[layer] = [float(s) / top for s in share]
    return scores


def default_heads_path(model: str) -> Path:
    root = Path(os.environ.get("LONGFIT_CACHE_DIR", Path.home() / ".cache" / "longfit"))
    return root / "heads" / f"{Path(model).name}.json"


def add_profile_heads_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=8, help="passkey prompts to profile with")
    parser.add_argument("--length", default="1k", help="prompt length in tokens, e.g. 1k")
    parser.add_argument("--window", type=int, default=16, help="last prompt queries whose attention is measured")
    parser.add_argument("--seed", type=int, default=0, help="seed of the passkey generator")
    parser.add_argument("--output", default=None, help="head-score JSON to write (default: "
                        "$LONGFIT_CACHE_DIR or ~/.cache/longfit, heads/<model>.json)")


def run_profile_heads(args: argparse.Namespace, llm: Any) -> int:
    from longfit.config import parse_tokens

    length = parse_tokens(args.length)
    scores = profile_heads(llm, samples=args.samples, length=length, window=args.window, seed=args.seed)
    path = Path(args.output) if args.output else default_heads_path(args.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_head_scores(path, scores, str(args.model), method="passkey-attention-share", samples=args.samples,
                      length=length, window=args.window, seed=args.seed)
    flat = sorted(((s, layer, head) for layer, row in enumerate(scores) for head, s in enumerate(row)), reverse=True)
    print(f"wrote {path}: {len(scores)} layers x {len(scores[0])} KV heads")
    print("top retrieval heads (layer, head, score): "
          + ", ".join(f"({layer}, {head}, {s:.2f})" for s, layer, head in flat[:8]))
    print(f"use it with: --kv-compression duo_attention:heads={path},sparsity=0.5")
    return 0
