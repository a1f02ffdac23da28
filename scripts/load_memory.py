"""Resident memory of loading a model: after ``import torch``, after the load, and the peak (docs/PERFORMANCE.md,
"Peak memory").

    python scripts/load_memory.py --model smollm2-135m --weights auto [--generate 8]

Prints RSS (MiB) once torch and longfit are imported, once ``LLM(...)`` returns, the process's peak (``VmHWM``, the
load's when nothing else ran) and the load's seconds; with ``--generate N``, the same after N greedy tokens.
Linux only (``/proc/self/status``).
"""

from __future__ import annotations

import argparse
import time


def status_mib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) // 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--generate", type=int, default=0, help="greedy tokens to decode after the load")
    args = parser.parse_args()

    import torch  # noqa: F401  (its own resident memory is the floor every figure below includes)

    from longfit import LLM, SamplingParams

    imported = status_mib("VmRSS")
    start = time.perf_counter()
    llm = LLM(args.model, weights=args.weights, num_threads=args.num_threads)
    seconds = time.perf_counter() - start
    print(f"model {args.model}, weights {args.weights}")
    print(f"RSS after import MiB      {imported}")
    print(f"RSS after load MiB        {status_mib('VmRSS')}")
    print(f"peak RSS of the load MiB  {status_mib('VmHWM')}")
    print(f"load seconds              {seconds:.1f}")
    if args.generate:
        llm.generate(["The capital of France is"], SamplingParams(max_tokens=args.generate, temperature=0))
        print(f"RSS after generate MiB    {status_mib('VmRSS')}")
        print(f"peak RSS MiB              {status_mib('VmHWM')}")


if __name__ == "__main__":
    main()
