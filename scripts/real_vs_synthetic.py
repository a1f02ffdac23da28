"""The real SmolLM2 against the calibration's random-weight model of the same shape: decode step times in one
process, alternated (docs/PLANNING.md §6, run D).

    taskset -c 1 python scripts/real_vs_synthetic.py [--depth 2048] [--rounds 3] [--profile] [--flush]

Both engines use bf16 weights, 1 thread and a 1 GiB KV pool; each round times one request of ``--depth`` random
tokens on each (median of 12 decode steps, timed by the calibration's own ``_time_decode``). ``--profile`` adds a
torch-profiler table of 6 steps for each; ``--flush`` also times both with the calibration's cache flush.
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    import torch

    from longfit import LLM, SamplingParams
    from longfit.bench.calibrate import ENGINE_FLUSH_BYTES, ENGINE_MODEL, _time_decode, _with_layers
    from longfit.bench.decode import step_until_decoding
    from longfit.bench.peers import prompt_ids
    from longfit.models.loader import synthetic_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--flush", action="store_true",
                        help="also time each engine with the calibration's cache flush before every step")
    args = parser.parse_args()

    config = _with_layers(ENGINE_MODEL, 30)
    with synthetic_config("tiny-llama", config) as name:
        synthetic = LLM(name, dtype="bfloat16", weights="bf16", block_size=32, memory_bytes=1 << 30, num_threads=1)
    real = LLM("smollm2-135m", weights="bf16", memory_bytes=1 << 30, num_threads=1)
    prompt = prompt_ids(0, 1, args.depth, config.vocab_size)[0]

    def start(llm, steps: int):
        engine = llm.engine
        engine.kv_manager.reset_prefix_cache()
        engine.add_request(None, prompt, SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True))
        step_until_decoding(engine)
        return engine

    flush = torch.ones(ENGINE_FLUSH_BYTES // 4, dtype=torch.float32) if args.flush else None

    def step_ms(llm, steps: int = 12, flush=None) -> float:  # timed as the calibration times its points
        return statistics.median(_time_decode(llm.engine, 1, args.depth, steps, config.vocab_size, flush)) * 1e3

    for _ in range(args.rounds):
        line = f"depth {args.depth}: synthetic {step_ms(synthetic):.1f} ms, real {step_ms(real):.1f} ms per step"
        if flush is not None:
            line += (f"; with the flush: synthetic {step_ms(synthetic, flush=flush):.1f} ms, "
                     f"real {step_ms(real, flush=flush):.1f} ms")
        print(line, flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for label, llm in (("synthetic", synthetic), ("real", real)):
            engine = start(llm, 8)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(6):
                    engine.step()
            print(label)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
            while engine.has_unfinished_requests():
                engine.step()


if __name__ == "__main__":
    main()
