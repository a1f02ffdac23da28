"""Exact repacking of GGUF 4-bit blocks (Q4_0, Q4_1) into the int4 kernel's (codes, scale, zero) form.

GGUF (llama.cpp's ``ggml-quants.c``; the ``gguf`` Python package's ``quants.py`` decodes the same layout) stores a row
of K weights as K / 32 blocks of 32 weights:

- Q4_0, 18 bytes: ``d`` fp16, then 16 bytes of nibbles; ``w = d · (q - 8)``.
- Q4_1, 20 bytes: ``d`` fp16, ``m`` fp16, then 16 bytes of nibbles; ``w = d · q + m``.

In both, byte ``j`` of the nibbles holds element ``j`` in its low nibble and element ``j + 16`` in its high nibble.
The int4 CPU kernel computes ``w = (q - 8) · scale + zero`` per group, so with group size 32 both types map without
touching a single code: Q4_0 → ``scale = d, zero = 0``; Q4_1 → ``scale = d, zero = m + 8·d``. The only loss is the
kernel's parameter dtype (bf16 with bf16 activations), which ``quant/linear.py`` documents and the tests measure.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

GGUF_BLOCK_SIZE = 32  # weights per block in Q4_0 / Q4_1 / Q8_0
GGUF_INT4_TYPES = ("Q4_0", "Q4_1")
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
_HEADER_BYTES = {"Q4_0": 2, "Q4_1": 4}  # d, or d and m, each fp16


def unpack_q4_rows(rows: np.ndarray, qtype: str, in_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """Decode GGUF Q4_0 / Q4_1 rows into the int4 kernel's form, losslessly (all arithmetic exact in fp32).

    Args:
        rows: uint8 [N, (K / 32) · block_bytes], one output channel per row (``RawWeight.quant_rows()``).
        qtype: "Q4_0" or "Q4_1".
        in_features: K, a multiple of 32.

    Returns:
        codes: [N, K] uint8 in 0..15; scales, zeros: [N, K / 32] fp32, with ``w = (codes - 8) · scale + zero``
        equal to ``gguf.quants.dequantize`` of the same bytes (to fp32 rounding of ``m + 8·d``, in practice exact).

    Raises:
        ValueError: unknown qtype, K not a multiple of 32, or rows of the wrong width.
    """
    if qtype not in _BLOCK_BYTES:
        raise ValueError(f"qtype must be one of {GGUF_INT4_TYPES}, got {qtype!r}")
    if in_features <= 0 or in_features % GGUF_BLOCK_SIZE:
        raise ValueError(f"in_features must be a positive multiple of {GGUF_BLOCK_SIZE}, got {in_features}")
    num_blocks = in_features // GGUF_BLOCK_SIZE
    block_bytes = _BLOCK_BYTES[qtype]
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != num_blocks * block_bytes:
        raise ValueError(
            f"rows must be uint8 [out, {num_blocks * block_bytes}] for {qtype} with in_features={in_features}, "
            f"got {rows.dtype} {rows.shape}"
        )
    n_out = rows.shape[0]
    blocks = rows.reshape(n_out, num_blocks, block_bytes)  # [N, K/32, bytes]
    # fp16 fields are little-endian in the file, as numpy's native float16 on the machines we run on.
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    nibbles = blocks[..., _HEADER_BYTES[qtype] :]  # [N, K/32, 16]
    # NOTE: low nibbles are elements 0..15 of the block, high nibbles 16..31 (not interleaved).
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n_out, in_features)  # [N, K]
    if qtype == "Q4_0":
        zeros = np.zeros_like(d)
    else:
        m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
        zeros = m + np.float32(8.0) * d  # d·q + m = d·(q - 8) + (m + 8·d)
    return torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(d), torch.from_numpy(zeros)
