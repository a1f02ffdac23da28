"""KVCacheSpec: the resolved layout of the paged KV store (a result object, computed once at start-up).

No torch here: the runtime fills it from the model config, the cache config and the memory budget.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Resolved KV layout.

    A page holds ``block_size`` tokens of one layer: keys and values ``[2, block_size, num_kv_heads,
    head_dim]`` in ``dtype`` (``page_bytes`` bytes). ``layer_windows[l]`` is None for full-attention
    layers and the window in tokens for sliding-window layers (they keep only the pages that window needs).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # "bfloat16" | "float32"
    dtype_bytes: int
    num_blocks: int  # including the null page 0
    layer_windows: tuple[int | None, ...]

    @property
    def page_bytes(self) -> int:
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.page_bytes

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token costs in full-attention layers of an uncompressed request (all layers)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def pages_for_tokens(self, num_tokens: int) -> int:
        """Pages an uncompressed request of ``num_tokens`` tokens holds at most, over all layers."""
        total = 0
        for window in self.layer_windows:
            needed = -(-num_tokens // self.block_size)
            if window is not None:
                needed = min(needed, -(-window // self.block_size) + 1)
            total += needed
        return total
