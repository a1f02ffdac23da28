"""Where a decode step's time goes: wall clocks around the engine's parts, batch 1, greedy.

    python scripts/step_breakdown.py [--depth 1] [--steps 300] [--num-threads 1] [--decode-steps 4]

One request with a ``--depth``-token random prompt is prefilled, 10 decode steps warm up, then ``--steps`` steps are
timed (per token: with ``--decode-steps`` above 1 an engine step makes several). Each part's time is inclusive (``DecoderModel.forward`` holds ``FusedDecode.__call__``, ``compute_logits``
holds the LM head's product ``Int8Linear.forward``); what a step spends outside the named parts is the engine's own
Python; "outside the kernels" is the token's time less the fused layers' and the LM head's product calls (and the
greedy multi-step loops run wholly in C, ``FusedDecode.greedy``).
docs/PERFORMANCE.md ("Batch-1 step overhead", "Multi-step decoding") quotes it.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from longfit import LLM, SamplingParams
from longfit.bench.decode import step_until_decoding
from longfit.bench.peers import random_ids
from longfit.engine.llm_engine import LLMEngine
from longfit.engine.scheduler import Scheduler
from longfit.models.base import DecoderModel
from longfit.models.fused_decode import FusedDecode
from longfit.quant.linear import Int8Linear
from longfit.runtime.model_runner import ModelRunner

PARTS = ((LLMEngine, "step"), (Scheduler, "schedule"), (Scheduler, "update_from_output"), (ModelRunner, "execute"),
         (ModelRunner, "_flat_inputs"), (ModelRunner, "_decode_metadata"), (ModelRunner, "_sample"),
         (DecoderModel, "forward"), (FusedDecode, "__call__"), (DecoderModel, "compute_logits"),
         (Int8Linear, "forward"), (FusedDecode, "greedy"))


def _timed(seconds: dict[str, float], label: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - start
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=1, help="SchedulerConfig.decode_steps (multi-step)")
    args = parser.parse_args()
    seconds: dict[str, float] = collections.defaultdict(float)
    for cls, name in PARTS:
        setattr(cls, name, _timed(seconds, f"{cls.__name__}.{name}", getattr(cls, name)))
    llm = LLM(args.model, num_threads=args.num_threads, decode_steps=args.decode_steps)
    engine = llm.engine
    warm = 10 * args.decode_steps  # tokens of the 10 warm-up steps, at most
    params = SamplingParams(max_tokens=args.steps + warm + 10, temperature=0, ignore_eos=True)
    engine.add_request(None, random_ids(1, max(args.depth, 1), engine.model_config.vocab_size), params)
    step_until_decoding(engine)
    for _ in range(10):
        engine.step()
    seconds.clear()
    produced = engine.stats["generation_tokens"]
    start = time.perf_counter()
    while engine.stats["generation_tokens"] - produced < args.steps and engine.has_unfinished_requests():
        engine.step()
    wall = time.perf_counter() - start
    tokens = engine.stats["generation_tokens"] - produced
    print(f"{tokens / wall:.1f} tok/s, {wall / tokens * 1e3:.3f} ms a token ({torch.get_num_threads()} threads, "
          f"decode_steps {args.decode_steps}, {tokens} tokens after depth {args.depth} + warm-up)")
    for label, total in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"  {label:<34}{total / tokens * 1e3:8.3f} ms")
    kernels = seconds["FusedDecode.__call__"] + seconds["Int8Linear.forward"] + seconds["FusedDecode.greedy"]
    print(f"  {'outside the kernels':<34}{(wall - kernels) / tokens * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
