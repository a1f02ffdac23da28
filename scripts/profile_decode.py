"""Torch-profiler table of longfit decode steps at a context depth (docs/PERFORMANCE.md, "What bounds it").

    python scripts/profile_decode.py --depth 8000 --weights auto --num-threads 1 [--kv-compression SPEC] [--batch N]
        [--compile]

``--batch`` requests (default 1) with random-token prompts of ``--depth`` tokens are prefilled, three decode steps
warm up, then ``--steps`` decode steps run under the profiler; prints ms per step and the ops by self CPU time.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    from longfit import LLM, SamplingParams
    from longfit.bench.decode import step_until_decoding
    from longfit.bench.peers import random_ids

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--depth", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--kv-compression", default=None)
    parser.add_argument("--batch", type=int, default=1, help="requests decoding together")
    parser.add_argument("--rows", type=int, default=18, help="ops shown")
    parser.add_argument("--compile", action="store_true", help="compiled decode steps (RuntimeConfig.compile)")
    args = parser.parse_args()

    llm = LLM(args.model, weights=args.weights, num_threads=args.num_threads, max_num_seqs=max(args.batch, 1),
              compile=args.compile)
    engine = llm.engine
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0, ignore_eos=True)
    for seed in range(1, args.batch + 1):
        engine.add_request(None, random_ids(seed, args.depth, engine.model_config.vocab_size), params,
                           kv_compression=args.kv_compression)
    step_until_decoding(engine)
    for _ in range(3):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        elapsed = time.perf_counter() - started
    print(f"{elapsed / args.steps * 1e3:.1f} ms per decode step under the profiler (depth {args.depth})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
