"""Times one bf16 weight's product on this CPU, weights out of cache (``longfit/quant/matmul.py``'s table).

    taskset -c 1 python scripts/matmul_blocks.py [--shapes 49152x576,3072x576,576x1536] [--rows 1,2,4,8,16]

For the LM head (49152×576) and two SmolLM2 layer shapes (or ``--shapes``, out x in), at 1-16 rows (or ``--rows``),
1 thread: the bf16 product, the fp32 product by cache-sized blocks (``matmul.fp32_linear``), torch's int8 kernel and,
where oneDNN has it, the bf16 product over the prepacked weight (``matmul.packed_linear``, docs/PERFORMANCE.md
"Prepacked bf16 weights"), and where longfit's C kernels are built, their product over the plain bf16 weight
(``native.bf16_linear``, ``runtime/csrc/dense.c``; K % 32 == 0). A 256 MiB buffer is read before every timed call so each one starts from DRAM; each figure
is the median of 9 calls, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from longfit.quant import matmul
from longfit.runtime import native


def _pairs(text: str, name: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"{name} must be OUTxIN[,OUTxIN...], got {text!r}") from None
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit(f"{name} must be OUTxIN[,OUTxIN...] of positive integers, got {text!r}")
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="49152x576,3072x576,576x1536", help="weights, OUTxIN, comma-separated")
    parser.add_argument("--rows", default="1,2,4,8,16", help="activation row counts, comma-separated")
    args = parser.parse_args()
    shapes = _pairs(args.shapes, "--shapes")
    row_counts = [int(v) for v in args.rows.split(",")]
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
    kernel = native.library() is not None
    print("| weight | rows | bf16 product | fp32 by blocks | int8 kernel | prepacked bf16 | C kernel, plain bf16 |\n"
          "|---|---|---|---|---|---|---|")
    for out_features, in_features in shapes:
        weight = (torch.randn(out_features, in_features) * 0.05).bfloat16()
        codes = torch.randint(-127, 127, (out_features, in_features), dtype=torch.int8)
        scales = torch.rand(out_features).bfloat16()
        packed = matmul.prepack(weight) if prepacked else None
        for rows in row_counts:
            x = torch.randn(rows, in_features).bfloat16()
            packed_ms = f"{median_ms(lambda: matmul.packed_linear(x, packed)):.2f}" if prepacked else "-"
            kernel_ms = (f"{median_ms(lambda: native.bf16_linear(x, weight)):.2f}"
                         if kernel and in_features % 32 == 0 else "-")
            print(f"| {out_features}x{in_features} | {rows} | {median_ms(lambda: F.linear(x, weight)):.2f} | "
                  f"{median_ms(lambda: matmul.fp32_linear(x, weight)):.2f} | "
                  f"{median_ms(lambda: torch._weight_int8pack_mm(x, codes, scales)):.2f} | {packed_ms} | "
                  f"{kernel_ms} |", flush=True)


if __name__ == "__main__":
    main()
