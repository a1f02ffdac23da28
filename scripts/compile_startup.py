"""Start-up cost of ``--compile`` and a check that later steps do not recompile (docs/PERFORMANCE.md).

    taskset -c 1 python scripts/compile_startup.py [--model smollm2-135m] [--weights auto] [--num-threads 1]

Builds the engine with ``compile=True`` (it compiles the batch-1 and batch-2+ decode graphs with warm-up requests),
then runs one request alone and three together; prints the start-up and compile seconds, and the compile seconds
and graph steps after each run (unchanged compile seconds: no recompilation).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    from longfit import LLM, SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args()
    started = time.perf_counter()
    llm = LLM(args.model, weights=args.weights, num_threads=args.num_threads, compile=True)
    graph = llm.engine.runner.graph
    print(f"start-up {time.perf_counter() - started:.1f} s, compiling {graph.compile_seconds:.1f} s, "
          f"failed: {graph.failed}")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for prompts in ([list(range(100, 116))], [list(range(100, 116)), list(range(200, 260)), list(range(5, 30))]):
        llm.generate(prompts, params)
        print(f"after {len(prompts)} request(s): compiling {graph.compile_seconds:.1f} s, "
              f"{graph.compiled_steps} graph steps")


if __name__ == "__main__":
    main()
