"""Decode attention per layer: the C kernel (``runtime.native``) against the torch ops, on random pages.

    python scripts/bench_paged_decode.py [--num-threads 1] [--repeats 20]

Two tables (docs/PERFORMANCE.md, "Decode attention in one pass"):
- per call, best of ``--repeats``, one layer's pages in cache: rows x depth at SmolLM2's shapes (9 query / 3 KV
  heads, D 64, pages of 32, bf16) and Gemma-3's (4 / 1, D 256, with and without its 512-token window);
- 30 layers of pages scattered over a 470 MiB pool, read once each (out of cache, as in a real step).
The relative error of the kernel against the torch ops is printed beside each row.
"""

from __future__ import annotations

import argparse

import torch

from longfit.bench.calibrate import _median_seconds
from longfit.models.paged_decode import paged_decode_attention
from longfit.runtime import native


def _pages(batch: int, depth: int, num_blocks: int, bs: int, gen: torch.Generator) -> torch.Tensor:
    pages = -(-depth // bs)
    return (torch.randperm(num_blocks - 1, generator=gen)[:batch * pages] + 1).view(batch, pages).contiguous()


def _best(fn, repeats: int) -> float:
    """Milliseconds of the fastest of ``repeats`` calls after a warm-up call."""
    return min(_median_seconds(fn, repeats)[1]) * 1e3


def in_cache(repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"{'shape':<28}{'rows':>5}{'depth':>7}{'torch ms':>10}{'C ms':>8}{'speed-up':>10}{'rel. error':>12}")
    cases = [("smollm2", 1, d, None) for d in (16, 512, 2048, 4096, 8192)] + [
        ("smollm2", 4, 2048, None), ("smollm2", 16, 128, None), ("smollm2", 16, 500, None),
        ("gemma3", 1, 4096, None), ("gemma3 window 512", 1, 4096, 512)]
    for name, batch, depth, window in cases:
        hkv, group, dim = (3, 3, 64) if name == "smollm2" else (1, 4, 256)
        bs = 32
        num_blocks = batch * -(-depth // bs) + 1
        pool = torch.randn(num_blocks, 2, bs, hkv, dim, generator=gen).to(torch.bfloat16)
        pages = _pages(batch, depth, num_blocks, bs, gen)
        seq_lens = torch.randint(max(1, depth - bs + 1), depth + 1, (batch,), generator=gen)
        seq_lens[0] = depth
        first = torch.zeros(batch, dtype=torch.int64)
        q = torch.randn(batch, hkv * group, dim, generator=gen).to(torch.bfloat16)
        args = (q, pool, pages, first, seq_lens, dim ** -0.5, window)
        ref = paged_decode_attention(*args, native=False)
        got = paged_decode_attention(*args, native=True)
        error = ((got - ref).abs().max() / ref.abs().max()).item()
        slow = _best(lambda: paged_decode_attention(*args, native=False), repeats)
        fast = _best(lambda: paged_decode_attention(*args, native=True), repeats)
        print(f"{name:<28}{batch:>5}{depth:>7}{slow:>10.3f}{fast:>8.3f}{slow / fast:>9.1f}x{error:>12.1e}")


def out_of_cache(repeats: int) -> None:
    gen = torch.Generator().manual_seed(1)
    num_blocks, bs, depth = 20000, 32, 4000
    pool = torch.randn(num_blocks, 2, bs, 3, 64, generator=gen).to(torch.bfloat16)
    layers = [_pages(1, depth, num_blocks, bs, gen) for _ in range(30)]
    q = torch.randn(1, 9, 64, generator=gen).to(torch.bfloat16)
    first, seq_lens = torch.zeros(1, dtype=torch.int64), torch.tensor([depth])

    def step(use_native: bool) -> None:
        for pages in layers:
            paged_decode_attention(q, pool, pages, first, seq_lens, 0.125, None, native=use_native)

    times = {False: [], True: []}
    for _ in range(max(2, repeats // 5)):  # alternated: the machine's speed drifts
        for use_native in (False, True):
            times[use_native].append(_best(lambda: step(use_native), 1))
    slow, fast = min(times[False]), min(times[True])
    print(f"\n30 layers x 1 row x {depth} keys, pages scattered over a {pool.numel() * 2 / 2**20:.0f} MiB pool: "
          f"torch {slow:.1f} ms, C {fast:.1f} ms ({slow / fast:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    if native.library() is None:
        raise SystemExit("the C kernel is not built here (no compiler, or LONGFIT_NATIVE=0)")
    print(f"threads {torch.get_num_threads()}")
    in_cache(args.repeats)
    out_of_cache(args.repeats)


if __name__ == "__main__":
    main()
