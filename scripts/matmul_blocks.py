"""Times one bf16 weight's product on this CPU, weights out of cache (``longfit/quant/matmul.py``'s table).

    taskset -c 1 python scripts/matmul_blocks.py

For the LM head (49152×576) and two SmolLM2 layer shapes, at 1-16 rows, 1 thread: the bf16 product, the fp32 product
by cache-sized blocks (``matmul.fp32_linear``), the int8 kernel and, where oneDNN has it, the bf16 product over the
prepacked weight (``matmul.packed_linear``, docs/PERFORMANCE.md "Prepacked bf16 weights"). A 256 MiB buffer is read
before every timed call so each one starts from DRAM; each figure is the median of 9 calls, in ms.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from longfit.quant import matmul


def main() -> None:
    torch.set_num_threads(1)
    flush = torch.ones(64 << 20)

    def median_ms(fn, repeats: int = 9) -> float:
        fn()
        times = []
        for _ in range(repeats):
            flush.sum()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    prepacked = matmul.prepack_available()
    print("| weight | rows | bf16 product | fp32 by blocks | int8 kernel | prepacked bf16 |\n|---|---|---|---|---|---|")
    for out_features, in_features in ((49152, 576), (3072, 576), (576, 1536)):
        weight = (torch.randn(out_features, in_features) * 0.05).bfloat16()
        codes = torch.randint(-127, 127, (out_features, in_features), dtype=torch.int8)
        scales = torch.rand(out_features).bfloat16()
        packed = matmul.prepack(weight) if prepacked else None
        for rows in (1, 2, 4, 8, 16):
            x = torch.randn(rows, in_features).bfloat16()
            packed_ms = f"{median_ms(lambda: matmul.packed_linear(x, packed)):.2f}" if prepacked else "-"
            print(f"| {out_features}x{in_features} | {rows} | {median_ms(lambda: F.linear(x, weight)):.2f} | "
                  f"{median_ms(lambda: matmul.fp32_linear(x, weight)):.2f} | "
                  f"{median_ms(lambda: torch._weight_int8pack_mm(x, codes, scales)):.2f} | {packed_ms} |", flush=True)


if __name__ == "__main__":
    main()
