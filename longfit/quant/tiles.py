"""Tile layouts of int4 / int8 weights for the few-row C kernels (``runtime/csrc/qlinear.c``, which documents them).

A tile is 16 output rows: one 512-bit register holds the 16 rows' codes at four (int8) or eight (int4) inputs, one
32-bit lane per row, so each weight is loaded once per call and multiplied by every activation row; pairs of tiles
are stored interleaved so that a kernel work item reads one forward stream. These functions build the layouts from
plain ``[N, K]`` codes and take them apart again (the many-row path dequantizes, the tests compare); they are plain
tensor reshapes, exact both ways. ``default_layout`` / ``choose_layout`` decide which layout a packed layer gets.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

import longfit.runtime.native as native  # the C kernels' loader: stdlib + torch only

TILE_ROWS = 16
LAYOUT_ENV_VAR = "LONGFIT_PACKED_LAYOUT"  # "torch": packed layers keep torch's kernels even where the C ones are built


def default_layout(problem: str | None) -> str:
    """The layout a packed layer gets when none is asked for: "tiles" where the C kernels are built and the shape
    fits (``problem`` is None), unless ``LONGFIT_PACKED_LAYOUT=torch``; else "torch"."""
    wanted = os.environ.get(LAYOUT_ENV_VAR, "").strip() or "tiles"
    if wanted not in ("tiles", "torch"):
        raise ValueError(f"{LAYOUT_ENV_VAR} must be 'tiles' or 'torch', got {wanted!r}")
    return "tiles" if wanted == "tiles" and problem is None and native.library() is not None else "torch"


def choose_layout(layout: str | None, problem: str | None) -> str:
    """Check an asked-for layout ("tiles": the C kernels; "torch": torch's packed kernels), or pick the default."""
    if layout not in (None, "tiles", "torch"):
        raise ValueError(f"layout must be 'tiles', 'torch' or None, got {layout!r}")
    if layout == "tiles" and problem:
        raise ValueError(problem)
    if layout == "tiles" and native.library() is None:
        raise ValueError("layout 'tiles' needs the C kernels, which are not built here (see runtime/native.py)")
    return default_layout(problem) if layout is None else layout


def tile_shape_problem(out_features: int, in_features: int, group_size: int | None = None) -> str | None:
    """Why the tile layouts cannot hold an ``[out, in]`` weight (int4 with ``group_size``), or None if they can."""
    if out_features % TILE_ROWS:
        return f"tiles need out_features % {TILE_ROWS} == 0, got {out_features}"
    if group_size is None:
        return None if in_features % 4 == 0 else f"int8 tiles need in_features % 4 == 0, got {in_features}"
    if group_size % 8 or in_features % group_size:
        return f"int4 tiles need group_size % 8 == 0 and in_features % group_size == 0, got {in_features}, {group_size}"
    return None


def _interleave_pairs(blocks: Tensor, inverse: bool = False) -> Tensor:
    """[T, A, ...] per tile → a new contiguous tensor of that shape, where each pair of tiles (0-1, 2-3, ...; a last
    odd tile stays as it is) is stored a-major: row a of both tiles, then row a + 1 of both. A kernel work item (a
    pair) then reads one forward stream. ``inverse`` undoes it (``blocks`` then contiguous, as stored). ``blocks`` may
    be any view of the weight (a transpose): it is written into the result in one copy, with no temporary of the
    weight's size (a tied head can be 168 MB: Gemma-3's)."""
    num_tiles, rows, *rest = blocks.shape
    even = num_tiles - num_tiles % 2
    out = torch.empty(blocks.shape, dtype=blocks.dtype, device=blocks.device)
    if inverse:  # pair p is stored [A, 2, ...]: read it as such, write [2, A, ...]
        pairs = blocks[:even].reshape(even // 2, rows, 2, *rest).transpose(1, 2)
        out[:even].view(even // 2, 2, rows, *rest).copy_(pairs)
    else:  # [P, 2, A, ...] → stored [P, A, 2, ...]
        out[:even].view(even // 2, rows, 2, *rest).copy_(blocks[:even].unflatten(0, (even // 2, 2)).transpose(1, 2))
    out[even:].copy_(blocks[even:])
    return out


def pack_int4(codes: Tensor) -> Tensor:
    """codes [N, K] integers in 0..15 → tiles [N/16, K/8, 64] uint8: in oct o (inputs 8o..8o+7) of tile t, bytes
    4i..4i+3 are row 16t + i's 32-bit word, whose byte e (e = 0..3) holds the code of input 8o + e in its low 4 bits
    and that of input 8o + 4 + e in its high 4 bits: a mask, or a shift and a mask, leave four inputs' codes as the
    bytes of every 32-bit lane (``qlinear.c``). Pairs of tiles interleaved by oct (``_interleave_pairs``)."""
    n_out, n_in = codes.shape
    c = codes.to(torch.uint8).reshape(n_out // TILE_ROWS, TILE_ROWS, n_in // 8, 2, 4)  # [t, i, o, low|high, e]
    words = c[..., 0, :] | (c[..., 1, :] << 4)  # [t, i, o, 4 bytes]
    packed = _interleave_pairs(words.permute(0, 2, 1, 3))  # [t, o, i, 4]
    return packed.view(n_out // TILE_ROWS, n_in // 8, 4 * TILE_ROWS)


def unpack_int4(tiles: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: tiles [N/16, K/8, 64] → codes [N, K] uint8."""
    num_tiles, octs, _ = tiles.shape
    b = _interleave_pairs(tiles, inverse=True).reshape(num_tiles, octs, TILE_ROWS, 4).transpose(1, 2)  # [t, i, o, e]
    codes = torch.stack([b & 15, b >> 4], dim=3)  # [t, i, o, low|high, e]: input 8o + 4·high + e
    return codes.reshape(num_tiles * TILE_ROWS, octs * 8)


def pack_int8(codes: Tensor) -> Tensor:
    """codes [N, K] int8 (-127..127, K % 4 == 0) → tiles [N/16, K/4, 64] uint8 of code + 128 (vpdpbusd's unsigned
    operand): in quad q (inputs 4q..4q+3) of tile t, bytes 4i..4i+3 are row 16t + i's codes of the four inputs.
    Pairs of tiles interleaved by quad."""
    n_out, n_in = codes.shape
    quads = codes.contiguous().view(torch.uint8).view(n_out // TILE_ROWS, TILE_ROWS, n_in // 4, 4).transpose(1, 2)
    out = _interleave_pairs(quads)  # [t, q, i, 4], one copy
    out ^= 0x80  # the two's complement byte with its top bit flipped is c + 128
    return out.view(n_out // TILE_ROWS, n_in // 4, 4 * TILE_ROWS)


def unpack_int8(tiles: Tensor) -> Tensor:
    """Inverse of :func:`pack_int8`: tiles [N/16, K/4, 64] uint8 → codes [N, K] int8."""
    num_tiles, quads, _ = tiles.shape
    b = _interleave_pairs(tiles, inverse=True).reshape(num_tiles, quads, TILE_ROWS, 4).transpose(1, 2)  # [t, i, q, 4]
    return (b.reshape(num_tiles * TILE_ROWS, quads * 4) ^ 0x80).view(torch.int8)


def pack_lanes(values: Tensor) -> Tensor:
    """Per-output-row values [N, X] (int4 parameters at X = K/G groups) → [N/16, X, 16]: a tile's 16 rows side by
    side, one register's lanes; pairs of tiles interleaved by x."""
    n_out, width = values.shape
    return _interleave_pairs(values.reshape(n_out // TILE_ROWS, TILE_ROWS, width).transpose(1, 2))


def unpack_lanes(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_lanes`: [N/16, X, 16] → [N, X]."""
    num_tiles, width, _ = packed.shape
    return _interleave_pairs(packed, inverse=True).transpose(1, 2).reshape(num_tiles * TILE_ROWS, width)


def int4_params(scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    """The kernels' (d, m) of ``w = code · d + m`` from the ``w = (code - 8) · scale + zero`` form, [N, K/G] each.

    fp16 when both round-trip exactly (GGUF Q4_0/Q4_1 blocks, whose d and m are fp16: ``m = zero - 8·d`` undoes
    the repack exactly), else fp32 (RTN parameters in bf16 whose ``m`` needs more bits than fp16 has): the kernel
    multiplies by exactly the weights it was given either way. fp16 reads 4 bytes less per group of 32 inputs.
    """
    d = scales.float()
    m = zeros.float() - 8 * d
    half_d, half_m = d.to(torch.float16), m.to(torch.float16)
    if torch.equal(half_d.float(), d) and torch.equal(half_m.float(), m):
        return half_d, half_m
    return d, m
