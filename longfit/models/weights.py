"""RawWeight: one checkpoint tensor, still in its file format, dequantized on demand.

Loaders return weights under Hugging Face names in Hugging Face conventions (``[out, in]`` rows, Llama
q/k rows in HF's rotate-half order, Gemma norm weights without the +1), whatever the file stores.
``quant/`` repacks GGUF 4/8-bit rows directly into packed kernels' formats through ``quant_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

# Rows per block when a matrix is dequantized piecewise (``RawWeight.row_blocks``): 2048 rows of SmolLM2's 576
# channels are 4.5 MiB in fp32 (32 MiB at Llama-3-8B's 4096), so its 49,152-row embedding (113 MiB in fp32) never
# exists whole in fp32 on its way to bf16 or int8. Loading was the process's peak: it held that fp32 table, then
# two more of its size as the int8 requantization's temporaries.
DEQUANT_BLOCK_ROWS = 2048


@dataclass(slots=True)
class RawWeight:
    """A tensor as stored: ``qtype`` is the GGUF type name ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1",
    "Q5_0", "Q4_K", "Q6_K", ...) or "F32"/"BF16"/"F16" for safetensors.

    shape: HF shape, ``(out, in)`` for matrices, ``(n,)`` for vectors.
    """

    name: str
    shape: tuple[int, ...]
    qtype: str
    _dequantize: Callable[[], torch.Tensor]
    # Raw quantized bytes, one row per output channel: uint8 [out, bytes_per_row]; None for float types.
    _quant_rows: Callable[[], np.ndarray] | None = None
    # fp32 rows [start, stop) of a matrix without dequantizing the rest; None where the source reads only whole.
    _dequantize_rows: Callable[[int, int], torch.Tensor] | None = None
    # Drops the stored bytes from the process's resident set (a memory-mapped file's pages); None: nothing to drop.
    _release: Callable[[], None] | None = None

    def dequantize(self) -> torch.Tensor:
        """fp32 tensor of ``shape``."""
        out = self._dequantize()
        assert tuple(out.shape) == tuple(self.shape), (self.name, out.shape, self.shape)
        return out

    def row_blocks(self, block_rows: int | None = None) -> Iterator[torch.Tensor]:
        """The fp32 tensor as consecutive row blocks ``[<= block_rows, *shape[1:]]`` (default
        ``DEQUANT_BLOCK_ROWS``), in order; one block, the whole tensor, for vectors and for sources that cannot read
        rows separately."""
        block_rows = DEQUANT_BLOCK_ROWS if block_rows is None else block_rows
        if block_rows <= 0:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        if self._dequantize_rows is None or len(self.shape) < 2 or self.shape[0] <= block_rows:
            yield self.dequantize()
            return
        for start in range(0, self.shape[0], block_rows):
            stop = min(start + block_rows, self.shape[0])
            block = self._dequantize_rows(start, stop)
            assert tuple(block.shape) == (stop - start, *self.shape[1:]), (self.name, block.shape, start, stop)
            yield block

    def release(self) -> None:
        """Done with this tensor for now: its stored bytes may leave the resident set (reading it again still
        works)."""
        if self._release is not None:
            self._release()

    def quant_rows(self) -> np.ndarray | None:
        """uint8 ``[out, bytes_per_row]`` of GGUF blocks for quantized types (rows already in HF order)."""
        return None if self._quant_rows is None else self._quant_rows()

    @property
    def is_quantized(self) -> bool:
        return self._quant_rows is not None
