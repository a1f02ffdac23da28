"""RawWeight: one checkpoint tensor, still in its file format, dequantized on demand.

Loaders return weights under Hugging Face names in Hugging Face conventions (``[out, in]`` rows, Llama
q/k rows in HF's rotate-half order, Gemma norm weights without the +1), whatever the file stores.
``quant/`` repacks GGUF 4/8-bit rows directly into packed kernels' formats through ``quant_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


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

    def dequantize(self) -> torch.Tensor:
        """fp32 tensor of ``shape``."""
        out = self._dequantize()
        assert tuple(out.shape) == tuple(self.shape), (self.name, out.shape, self.shape)
        return out

    def quant_rows(self) -> np.ndarray | None:
        """uint8 ``[out, bytes_per_row]`` of GGUF blocks for quantized types (rows already in HF order)."""
        return None if self._quant_rows is None else self._quant_rows()

    @property
    def is_quantized(self) -> bool:
        return self._quant_rows is not None
