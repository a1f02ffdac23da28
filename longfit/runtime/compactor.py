"""Compactor: applies compression to a request's paged KV at the end of its prefill, and flushes quantized tails.

For every full-attention layer: read the layer's keys and values from its pages, let each evicting stage of the
spec pick the positions to keep per KV head (``KeepPlan``), then store the survivors back into the first pages of
the same table: as they are, or (storage stage: KIVI, int8, ThinK, KVQuant) as a stream of records followed by the
full-precision tail (``runtime.quant_pages``). ``KVCacheManager.apply_compaction`` then returns the whole pages left
over to the pool. Positions stay logical: kept keys carry their RoPE phase, new tokens are appended after the
survivors. KVQuant stores keys pre-RoPE: ``_store`` rotates each key back from its position (the physical index,
since KVQuant is refused after eviction) before encoding it. Sliding-window layers already hold only their window
and are left as they are.

Everything is rewritten in place: a layer is read completely before it is written, and its new layout never needs
more pages than it had.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from longfit.compression.registry import build_policy
from longfit.compression.spec import parse_spec
from longfit.models.attention import gather_keys_values
from longfit.models.layers import RotaryEmbedding
from longfit.outputs import CompactionResult
from longfit.runtime.quant_pages import ENGINE_QUANT_METHODS, PageQuantFormat

# What the engine applies today. The other kinds (ShadowKV low rank, MiniCache merge) are validated by the spec
# parser but refused at admission until their paged storage lands.
_CACHE_DTYPES = {2: "bfloat16", 4: "float32"}  # cache dtype bytes → PageQuantFormat dtype
ENGINE_METHODS = ("streaming, h2o, snapkv, pyramidkv, tova, knorm, duo_attention (eviction); "
                  + ", ".join(ENGINE_QUANT_METHODS) + " (compressed pages; kvquant without eviction); "
                  "quest (page selection)")


@functools.lru_cache(maxsize=256)
def validate_engine_spec(text: str, block_size: int | None = None, head_dim: int | None = None,
                         dtype_bytes: int | None = None) -> str:
    """Parse a spec (ValueError naming the problem) and check the engine can apply every stage (to pages of
    ``block_size`` tokens, heads of ``head_dim`` channels and a cache dtype of ``dtype_bytes``, when given)."""
    spec = parse_spec(text)
    unsupported = [policy for policy in build_policy(spec)
                   if policy.kind != "evict" and policy.name not in ENGINE_QUANT_METHODS + ("quest",)]
    if unsupported:
        names = ", ".join(sorted({type(p).__name__ for p in unsupported}))
        raise ValueError(f"kv_compression {text!r}: {names} are not applied inside the engine yet; "
                         f"the engine applies {ENGINE_METHODS}")
    quant = spec.stage("quantize")
    flush_unit = {"kivi": "residual", "kvquant": "group"}.get(quant.name) if quant is not None else None
    if flush_unit and block_size and quant.get(flush_unit) % block_size:
        raise ValueError(f"kv_compression {text!r}: {quant.name}:{flush_unit} must be a multiple of the KV block "
                         f"size {block_size} (the full-precision tail is flushed in whole pages)")
    evict = spec.stage("evict")
    if quant is not None and quant.name == "kvquant" and quant.get("bits") != 16 and evict is not None:
        raise ValueError(f"kv_compression {text!r}: kvquant does not combine with an eviction stage ({evict.name}) "
                         "in the engine yet: its pre-RoPE keys would need each kept token's original position per "
                         "KV head stored beside the pages; use kivi or int8 after eviction")
    storage = spec.stage("quantize", "lowrank")
    fmt = None  # one KV head's records (also checks kvquant:group*head_dim against the 16-bit outlier offsets)
    if storage is not None and head_dim:
        fmt = PageQuantFormat.from_stage(storage, 1, head_dim, _CACHE_DTYPES.get(dtype_bytes or 2, "bfloat16"))
    dense = 2 * head_dim * dtype_bytes * fmt.record_tokens if fmt is not None and dtype_bytes else 0
    if dense and fmt.record_bytes > dense:  # the in-place rewrite needs records no larger than their tokens
        hint = {"kivi": "raise kivi:group", "kvquant": "lower kvquant:outliers or kvquant:bits"}.get(storage.name)
        raise ValueError(f"kv_compression {text!r}: a {storage.name} record takes {fmt.record_bytes} bytes per KV "
                         f"head for {fmt.record_tokens} tokens, more than their {dense} bytes in the cache dtype; "
                         f"{hint}")
    select = spec.stage("select")
    if select is not None and block_size and select.get("page") != block_size:
        raise ValueError(f"kv_compression {text!r}: quest:page must equal the KV block size {block_size} "
                         "(the engine's pages are Quest's pages)")
    if select is not None and spec.stage("quantize", "lowrank", "merge") is not None:
        raise ValueError(f"kv_compression {text!r}: quest does not combine with a storage stage in the engine yet")
    return spec.text


class Compactor:
    """Owns the policy objects per spec string and rewrites pages in place."""

    def __init__(self, kv_pool: torch.Tensor, block_size: int, layer_windows: tuple[int | None, ...],
                 attention_scale: float, layer_ropes: Sequence[RotaryEmbedding] = ()) -> None:
        self.kv_pool = kv_pool  # [num_blocks, 2, bs, Hkv, D]
        self.layer_ropes = tuple(layer_ropes)  # each layer's RoPE (pre-RoPE storage: KVQuant)
        self.pool_bytes = kv_pool.view(torch.uint8).view(kv_pool.shape[0], -1)  # [num_blocks, page_bytes]
        self.block_size = block_size
        self.layer_windows = layer_windows
        self.attention_scale = attention_scale
        self._policies: dict[str, list] = {}

    def policies(self, spec: str) -> list:
        if spec not in self._policies:
            # Attention-scored policies must use the model's own softmax scale (Gemma: query_pre_attn_scalar).
            self._policies[spec] = [replace(p, scale=self.attention_scale) if getattr(p, "scale", 0) is None else p
                                    for p in build_policy(spec)]
        return self._policies[spec]

    def window_size(self, spec: str) -> int:
        """Query window the spec's policies need (captured during the last prefill chunk)."""
        return max((p.window_size for p in self.policies(spec)), default=0)

    def selector(self, spec: str):
        """The spec's decode-time page selection policy (Quest), or None."""
        return next((p for p in self.policies(spec) if p.kind == "select"), None)

    def quant_format(self, spec: str) -> PageQuantFormat | None:
        """The record format of the spec's storage stage (quantize, or ThinK), None when it stores plain tokens."""
        stage = parse_spec(spec).stage("quantize", "lowrank")
        if stage is None:
            return None
        dtype = "bfloat16" if self.kv_pool.dtype == torch.bfloat16 else "float32"
        return PageQuantFormat.from_stage(stage, self.kv_pool.shape[3], self.kv_pool.shape[4], dtype)

    # ------------------------------------------------------------------ prefill-end compression
    def compact(self, request_id: str, spec: str, tables: np.ndarray, num_tokens: int,
                queries: dict[int, torch.Tensor], channels: dict[int, torch.Tensor] | None = None) -> CompactionResult:
        """Compress a request whose ``num_tokens`` prompt tokens are all cached (nothing quantized yet).

        Args:
            tables: [L, max_pages] the request's page tables (runner mirror).
            queries: layer → [Hq, W, D] post-RoPE queries of the prompt's last tokens.
            channels: filled with layer → [Hkv, d'] key channels kept (ThinK), which later flushes need.
        Returns:
            tokens kept per layer (physical) and, when quantizing, the stream layout; the manager frees the
            pages beyond them.
        """
        evictors = [p for p in self.policies(spec) if p.kind == "evict"]
        pruner = next((p for p in self.policies(spec) if p.name == "think"), None)
        fmt = self.quant_format(spec)
        channels = channels if channels is not None else {}
        num_layers = len(self.layer_windows)
        kept_counts, q_tokens, q_pages, q_bytes = [], [0] * num_layers, [0] * num_layers, [0] * num_layers
        bs = self.block_size
        for layer, window in enumerate(self.layer_windows):
            if window is not None:
                kept_counts.append(num_tokens)
                continue
            if not evictors and fmt is None:  # page selection only: nothing to rewrite
                kept_counts.append(num_tokens)
                continue
            pages = torch.from_numpy(tables[layer, :-(-num_tokens // bs)]).to(self.kv_pool.device)
            keys, values = gather_keys_values(self.kv_pool, pages)  # [P*bs, Hkv, D]
            keys = keys[:num_tokens].transpose(0, 1)  # [Hkv, T, D]
            values = values[:num_tokens].transpose(0, 1)
            layer_queries = queries.get(layer)
            for policy in evictors:
                plan = policy.plan(layer, num_layers, keys, values, layer_queries)
                if not plan.is_keep_all:
                    keys, values = plan.gather(keys), plan.gather(values)  # [Hkv, K, D]
            kept = keys.shape[1]
            kept_counts.append(kept)
            if fmt is not None:
                if fmt.method == "think":
                    channels[layer] = pruner.prune(keys, layer_queries).channels  # [Hkv, d']
                q_tokens[layer] = self._store(fmt, layer, pages, 0, keys.transpose(0, 1), values.transpose(0, 1),
                                              channels.get(layer))
                q_bytes[layer] = fmt.stream_bytes(q_tokens[layer]) + fmt.side_bytes
                q_pages[layer] = self._stream_pages(fmt, q_tokens[layer])
            elif kept < num_tokens:
                self._write_tokens(pages, 0, keys.transpose(0, 1), values.transpose(0, 1))
        if fmt is None:
            return CompactionResult(request_id=request_id, num_kept_tokens=kept_counts)
        return CompactionResult(request_id, kept_counts, q_tokens, q_pages, q_bytes)

    # ------------------------------------------------------------------ decode-time flush of quantized tails
    def flush(self, request_id: str, fmt: PageQuantFormat, tables: np.ndarray, num_cached: list[int],
              quant_tokens: np.ndarray, quant_pages: np.ndarray, quant_bytes: np.ndarray,
              channels: dict[int, torch.Tensor]) -> CompactionResult | None:
        """Quantize whole flush units of every full layer's tail (``num_cached[l] - quant_tokens[l]`` tokens);
        None when no layer's tail has reached ``fmt.flush_tokens``."""
        bs = self.block_size
        tails = [n - int(q) for n, q in zip(num_cached, quant_tokens)]
        todo = [layer for layer, window in enumerate(self.layer_windows)
                if window is None and fmt.quantizable(tails[layer]) > 0]
        if not todo:
            return None
        q_tokens, q_pages, q_bytes = quant_tokens.tolist(), quant_pages.tolist(), quant_bytes.tolist()
        for layer in todo:
            used = q_pages[layer] + -(-tails[layer] // bs)
            pages = torch.from_numpy(tables[layer, :used]).to(self.kv_pool.device)
            keys, values = gather_keys_values(self.kv_pool, pages[q_pages[layer]:])  # [tail pages * bs, Hkv, D]
            q_tokens[layer] += self._store(fmt, layer, pages, q_tokens[layer], keys[:tails[layer]],
                                           values[:tails[layer]], channels.get(layer))
            q_bytes[layer] = fmt.stream_bytes(q_tokens[layer]) + fmt.side_bytes
            q_pages[layer] = self._stream_pages(fmt, q_tokens[layer])
        return CompactionResult(request_id, list(num_cached), q_tokens, q_pages, q_bytes)

    # ------------------------------------------------------------------ storage
    def _stream_pages(self, fmt: PageQuantFormat, num_tokens: int) -> int:
        return fmt.stream_pages(num_tokens, self.pool_bytes.shape[1])

    def _store(self, fmt: PageQuantFormat, layer: int, pages: torch.Tensor, stream_tokens: int, keys: torch.Tensor,
               values: torch.Tensor, channels: torch.Tensor | None = None) -> int:
        """Append whole flush units of ``keys, values: [T, Hkv, D]`` (post-RoPE, cache dtype) to the layer's stream
        (``stream_tokens`` tokens already on ``pages``) and write the rest after the stream in the cache dtype;
        returns the tokens added to the stream. The caller has read everything it needs from ``pages`` before.
        Pre-RoPE formats (KVQuant) get the quantized keys rotated back from their positions ``stream_tokens + i``,
        rounded to the cache dtype (RoPE is orthogonal: rotating back is exact up to that rounding)."""
        quantized = fmt.quantizable(keys.shape[0])
        if quantized:
            stored_keys = keys[:quantized]
            if fmt.pre_rope:
                positions = torch.arange(stream_tokens, stream_tokens + quantized, device=keys.device)
                stored_keys = self.layer_ropes[layer].rotate(stored_keys, positions, inverse=True)
            records = fmt.encode(stored_keys, values[:quantized], channels)
            fmt.write(self.pool_bytes, pages, stream_tokens // fmt.record_tokens, records)
        if quantized < keys.shape[0]:
            tail_start = self._stream_pages(fmt, stream_tokens + quantized)
            self._write_tokens(pages[tail_start:], 0, keys[quantized:], values[quantized:])
        return quantized

    def _write_tokens(self, pages: torch.Tensor, first_slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``keys, values: [T, Hkv, D]`` to slots ``first_slot ...`` of ``pages`` (cache dtype)."""
        bs = self.block_size
        slots = torch.arange(first_slot, first_slot + keys.shape[0], device=pages.device)
        rows = pages[slots // bs] * (2 * bs) + slots % bs
        flat = self.kv_pool.view(-1, *self.kv_pool.shape[-2:])  # [num_blocks * 2 * bs, Hkv, D]
        flat.index_copy_(0, rows, keys.to(flat.dtype).contiguous())
        flat.index_copy_(0, rows + bs, values.to(flat.dtype).contiguous())
