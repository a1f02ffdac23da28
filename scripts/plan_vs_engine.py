"""Planner vs engine on this machine: predicted decode tok/s, max users and KV bytes against a real engine run.

For each context and spec, one request with a random-token prompt runs alone in longfit's engine: its prefill, then
``--decode-tokens`` timed decode steps (median step time; with ``--rounds N`` the fastest of N such runs, as the
calibration keeps its points; the rounds go over all rows in turn, alternately reversed, so machine drift lands on
different rows each round, and every round's figure is printed). The engine's KV bytes are the pages the request holds
at the end (whole pages, as the pool sees them) and the exact bytes stored; the engine's maximum users is how many
such requests its idle pool holds at once, one of them still prefilling (its whole uncompressed prompt resident:
the pages of the full-cache run's prompt, so ``none`` must come first). The planner gets the same
model, weights, KV budget (the engine's ``CacheConfig.memory_bytes``), context, output tokens and spec, with the
hardware profile given (``this`` = ``longfit plan --calibrate``'s). Prints a markdown table (docs/PLANNING.md §6).

    python scripts/plan_vs_engine.py --model smollm2-135m --contexts 2k,8000 --num-threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from longfit import LLM, SamplingParams
    from longfit.bench.decode import step_until_decoding
    from longfit.bench.peers import random_ids
    from longfit.config import parse_bytes, parse_tokens
    from longfit.engine.output_processor import child_id
    from longfit.plan.hardware import resolve_hardware
    from longfit.plan.planner import plan

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="bf16", help="engine and planner weight form (bf16, int8, int4)")
    parser.add_argument("--contexts", default="2k,8000")
    parser.add_argument("--spec", action="append", default=None,
                        help="spec to compare (repeatable; default: none, snapkv:keep=0.25, kivi:bits=2)")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs per row (each prefills again); the fastest round's median step is kept")
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--hardware", default="this")
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args(argv)

    memory = parse_bytes(args.kv_cache_memory, "--kv-cache-memory")
    llm = LLM(args.model, weights=args.weights, memory_bytes=memory, num_threads=args.num_threads)
    engine = llm.engine
    hardware = resolve_hardware(args.hardware)
    manager = engine.kv_manager
    idle_free = manager.num_free_blocks
    print(f"model {args.model}, weights {args.weights}, KV pool {memory} bytes ({idle_free} free pages), "
          f"{args.decode_tokens} decode tokens, hardware {hardware.name!r}: {hardware.source}")
    specs = args.spec or ["none", "snapkv:keep=0.25", "kivi:bits=2"]
    if specs[0] != "none":
        raise SystemExit("--spec: the first spec must be none (its prompt pages are the prefill peak)")
    contexts = [parse_tokens(c.strip(), "--contexts") for c in args.contexts.split(",")]
    rows = [(context, spec) for context in contexts for spec in specs]
    prompts = {context: random_ids(context, context, engine.model_config.vocab_size) for context in contexts}
    prompt_pages: dict[int, int] = {}
    round_medians: dict[tuple[int, str], list[float]] = {row: [] for row in rows}
    held: dict[tuple[int, str], tuple[int, int]] = {}

    def measure(context: int, spec: str) -> None:
        manager.reset_prefix_cache()
        params = SamplingParams(max_tokens=args.decode_tokens + 1, temperature=0, ignore_eos=True)
        request_id = engine.add_request(None, prompts[context], params, kv_compression=None if spec == "none" else spec)
        engine_id = child_id(request_id, 0)
        step_until_decoding(engine)
        if spec == "none":  # the whole prompt's pages: what a compressing request holds until its policy runs
            prompt_pages[context] = manager.request_bytes(engine_id) // manager.spec.page_bytes
        times = []
        while True:
            start = time.perf_counter()
            engine.step()
            if not engine.has_unfinished_requests():
                break  # the last step also frees the pages: not timed, nothing left to measure
            times.append(time.perf_counter() - start)
            held[context, spec] = manager.request_bytes(engine_id), manager.stored_bytes(engine_id)
        round_medians[context, spec].append(statistics.median(times))

    # Rounds run over all rows in turn, every other round in reverse (as the calibration's points do), so a slow
    # stretch of the machine lands on different rows in different rounds. Round 1 runs in the given order: each
    # context's "none" row first, for its prompt pages.
    for index in range(args.rounds):
        for context, spec in rows if index % 2 == 0 else rows[::-1]:
            measure(context, spec)
            print(f"round {index + 1}/{args.rounds} {context} {spec}: {1 / round_medians[context, spec][-1]:.1f} "
                  "tok/s", file=sys.stderr)

    print("| model / context / spec | predicted tok/s (b=1) | measured | ratio | predicted max users | "
          "engine max users | predicted KV bytes | engine KV bytes (pages held) | engine KV bytes (stored) | "
          "rounds (tok/s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for context, spec in rows:
        # The fastest round's median, as the calibration keeps its points: a foreign process slowing one round
        # does not count.
        measured = 1.0 / min(round_medians[context, spec])
        pages_bytes, stored = held[context, spec]
        pages_per_request = pages_bytes // manager.spec.page_bytes
        # As the planner counts: every request at its steady size, but the one being prefilled holds its whole
        # uncompressed prompt until its policy runs.
        peak = max(pages_per_request, prompt_pages[context])
        engine_users = 1 + (idle_free - peak) // pages_per_request
        result = plan(engine.model_config, context=context, users=1, output_tokens=args.decode_tokens + 1,
                      memory_bytes=None, weights=args.weights, specs=[spec], hardware=hardware,
                      kv_memory_bytes=memory, block_size=manager.spec.block_size)
        sp = result.specs[0]
        predicted = sp.throughput_batch1
        rounds = " / ".join(f"{1 / m:.1f}" for m in round_medians[context, spec])
        print(f"| {args.model} {context} {spec} | {predicted:.1f} | {measured:.1f} | {predicted / measured:.2f} | "
              f"{sp.max_users} | {engine_users} | {sp.kv_bytes_per_request_paged:,} | {pages_bytes:,} | "
              f"{stored:,} | {rounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
