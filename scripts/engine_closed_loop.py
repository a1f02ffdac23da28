"""`longfit bench serve`'s workload run straight through the engine, without HTTP: where serving time goes.

    taskset -c 1 python scripts/engine_closed_loop.py [--weights bf16] [--max-num-batched-tokens 512]

The same requests as ``longfit bench serve --num-requests 48 --concurrency 16 --prompt-len 128:512 --output-len 128``
(same generator, seed and split: the first 2 are the warm-up), kept 16 at a time in one ``LLMEngine`` like the
closed-loop load generator keeps 16 HTTP requests in flight, greedy with ``ignore_eos``. Prints the wall time,
output tokens/s, and the steps split into those that prefilled prompt tokens ("mixed": decodes plus a prompt chunk)
and pure decode steps, with their mean time. Compared with the server's figure for the same workload, the
difference is what HTTP, SSE and the asyncio side cost (docs/SERVING.md, "Where the time goes").
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    from longfit import LLM, SamplingParams
    from longfit.bench.serve import LengthDist, build_workload

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="bf16")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    llm = LLM(args.model, weights=args.weights, memory_bytes=2 << 30, num_threads=1, max_num_seqs=args.concurrency,
              max_num_batched_tokens=args.max_num_batched_tokens)
    engine = llm.engine
    prompts, outputs = LengthDist.parse("128:512", "--prompt-len"), LengthDist.parse("128", "--output-len")

    def run(specs) -> None:
        pending, active, generated, prompt_tokens = list(specs), 0, 0, 0
        steps = {"mixed": [0, 0.0], "decode": [0, 0.0]}
        started = time.perf_counter()
        while pending or engine.has_unfinished_requests():
            while pending and active < args.concurrency:
                ids = engine.tokenizer.encode(pending[0].prompt)
                params = SamplingParams(max_tokens=pending.pop(0).max_tokens, temperature=0, ignore_eos=True)
                engine.add_request(None, ids, params)
                prompt_tokens += len(ids)
                active += 1
            before = engine.stats["prompt_tokens"]
            step_started = time.perf_counter()
            finished = [o for o in engine.step() if o.finished]
            kind = steps["mixed" if engine.stats["prompt_tokens"] != before else "decode"]
            kind[0] += 1
            kind[1] += time.perf_counter() - step_started
            active -= len(finished)
            generated += sum(len(o.outputs[0].token_ids) for o in finished)
        wall = time.perf_counter() - started
        print(f"{len(specs)} requests, {prompt_tokens} prompt tokens, {generated} output tokens in {wall:.1f} s: "
              f"{generated / wall:.1f} output tok/s; "
              + ", ".join(f"{n} {name} steps ({t:.1f} s, {1e3 * t / max(1, n):.1f} ms each)"
                          for name, (n, t) in steps.items()), flush=True)

    specs = build_workload(args.num_requests + 2, prompts, outputs, seed=0)  # as bench serve: 2 warm-up first
    run(specs[:2])
    run(specs[2:])


if __name__ == "__main__":
    main()
