"""Packed int4 / int8 products: the tile layout's C kernels against torch's packed kernels, at SmolLM2's shapes.

    python scripts/bench_qlinear.py [--num-threads 1] [--repeats 20] [--rows 1,4,16]

Two tables (docs/PERFORMANCE.md, "Packed products in C"):
- per call, median of ``--repeats``, one weight in cache: the four layer shapes of SmolLM2-135M (fused q/k/v
  960x576, o 576x576, fused gate/up 3072x576, down 576x1536; int4, groups of 32) and its tied LM head (49152x576,
  int8), at 1, 4 and 16 rows (``--rows``; from 512 rows on an int4 layer dequantizes, from 160 an int8 one);
- the tied LM head as the int8 tile kernel against one bf16 matmul over the embedding table, at the same row
  counts (``DecoderModel.compute_logits`` switches to the matmul from ``TILED_HEAD_MAX_ROWS`` rows on);
- one decode step's worth, out of cache: the 120 int4 layers of 30 layers in order, then the LM head, 1 row,
  each weight read once per pass (the pass is ~80 MiB, more than the last-level cache).
Weights are random codes with random parameters (the time does not depend on the values); the relative difference
between the two layouts' outputs is printed (the torch layout rounds scale and zero to bf16).
"""

from __future__ import annotations

import argparse

import torch

from longfit.bench.calibrate import _median_seconds
from longfit.quant import matmul
from longfit.quant.linear import Int4Linear, Int8Linear
from longfit.runtime import native

LAYERS = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [out, in]
HEAD = (49152, 576)


def _int4(n_out: int, n_in: int, layout: str, gen: torch.Generator) -> Int4Linear:
    codes = torch.randint(0, 16, (n_out, n_in), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n_out, n_in // 32, generator=gen) * 0.01 + 1e-3).half().float()
    zeros = (torch.randn(n_out, n_in // 32, generator=gen) * 0.01).half().float() + 8 * scales
    return Int4Linear(codes, scales, zeros, 32, layout=layout)


def _int8(n_out: int, n_in: int, layout: str, gen: torch.Generator) -> Int8Linear:
    codes = torch.randint(-127, 128, (n_out, n_in), generator=gen, dtype=torch.int8)
    return Int8Linear(codes, torch.rand(n_out, generator=gen) * 0.01, layout=layout)


def _pair(make, shape: tuple[int, int], seed: int):
    """The same weight in both layouts."""
    return [make(*shape, layout, torch.Generator().manual_seed(seed)) for layout in ("torch", "tiles")]


def _ms(fn, repeats: int) -> float:
    return _median_seconds(fn, repeats)[0] * 1e3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def in_cache(repeats: int, row_counts: list[int]) -> None:
    print(f"{'weight':<22}{'rows':>5}{'torch ms':>10}{'tiles ms':>10}{'speed-up':>10}{'GB/s (tiles)':>14}"
          f"{'rel. diff':>11}")
    cases = [("int4", shape) for shape in LAYERS] + [("int8", HEAD)]
    for form, shape in cases:
        torch_layer, tile_layer = _pair(_int4 if form == "int4" else _int8, shape, seed=shape[0] + shape[1])
        nbytes = tile_layer.weight_nbytes()
        for rows in row_counts:
            x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows)).bfloat16()
            a, b = _ms(lambda: torch_layer(x), repeats), _ms(lambda: tile_layer(x), repeats)
            label = f"{form} {shape[0]}x{shape[1]}"
            print(f"{label:<22}{rows:>5}{a:>10.3f}{b:>10.3f}{a / b:>9.2f}x{nbytes / b / 1e6:>14.1f}"
                  f"{_rel(tile_layer(x), torch_layer(x)):>11.1e}")


def head_switch(repeats: int, row_counts: list[int]) -> None:
    """The int8 tile head against the bf16 matmul ``compute_logits`` uses from ``TILED_HEAD_MAX_ROWS`` rows on."""
    head = _int8(*HEAD, "tiles", torch.Generator().manual_seed(2))
    table = head.plain_codes().float().mul(head.scales.float()[:, None]).bfloat16()  # [V, d], as the embedding
    print(f"\n{'LM head':<22}{'rows':>5}{'tiles ms':>10}{'bf16 ms':>10}")
    for rows in row_counts:
        x = torch.randn(rows, HEAD[1], generator=torch.Generator().manual_seed(rows)).bfloat16()
        a, b = _ms(lambda: head(x), repeats), _ms(lambda: matmul.linear(x, table), repeats)
        print(f"{'int8 tiles vs bf16':<22}{rows:>5}{a:>10.3f}{b:>10.3f}")


def one_step(repeats: int) -> None:
    """SmolLM2's 120 int4 layers in order, then the head, one row: every weight comes from DRAM."""
    layouts = {"torch": [], "tiles": []}
    for layer in range(30):
        for shape in LAYERS:
            for layout, module in zip(("torch", "tiles"), _pair(_int4, shape, seed=layer * 7 + shape[0])):
                layouts[layout].append(module)
    heads = dict(zip(("torch", "tiles"), _pair(_int8, HEAD, seed=1)))
    inputs = {shape[1]: torch.randn(1, shape[1]).bfloat16() for shape in LAYERS}
    nbytes = sum(m.weight_nbytes() for m in layouts["tiles"])
    print(f"\n{'one step, out of cache':<28}{'torch ms':>10}{'tiles ms':>10}{'speed-up':>10}{'GB/s (tiles)':>14}")
    for name, fns in (
            (f"120 int4 layers ({nbytes / 2**20:.0f} MiB)",
             {k: (lambda ms=ms: [m(inputs[m.in_features]) for m in ms]) for k, ms in layouts.items()}),
            (f"int8 LM head ({heads['tiles'].weight_nbytes() / 2**20:.0f} MiB)",
             {k: (lambda h=h: h(inputs[HEAD[1]])) for k, h in heads.items()})):
        a, b = _ms(fns["torch"], repeats), _ms(fns["tiles"], repeats)
        size = nbytes if "layers" in name else heads["tiles"].weight_nbytes()
        print(f"{name:<28}{a:>10.2f}{b:>10.2f}{a / b:>9.2f}x{size / b / 1e6:>14.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rows", default="1,4,16", help="comma-separated activation row counts of the first table")
    args = parser.parse_args()
    row_counts = [int(v) for v in args.rows.split(",")]
    if not row_counts or min(row_counts) < 1:
        raise SystemExit(f"--rows must be positive integers, got {args.rows!r}")
    if native.library() is None:
        raise SystemExit("the C kernels are not built here (no compiler, or LONGFIT_NATIVE=0): nothing to compare")
    torch.set_num_threads(args.num_threads)
    with torch.inference_mode():
        in_cache(args.repeats, row_counts)
        head_switch(args.repeats, row_counts)
        one_step(args.repeats)


if __name__ == "__main__":
    main()
