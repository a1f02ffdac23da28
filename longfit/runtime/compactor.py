"""Compactor: applies compression to a request's paged KV at the end of its prefill, evicts again during decode
(an eviction stage's ``every``), and flushes quantized tails.

For every full-attention layer: read the layer's keys and values from its pages, let each evicting stage of the
spec pick the positions to keep per KV head (``KeepPlan``), then store the survivors back into the first pages of
the same table: as they are, or (storage stage: KIVI, int8, ThinK, KVQuant, ShadowKV, MiniCache) as a stream of records
followed by the full-precision tail (``runtime.quant_pages``). ``KVCacheManager.apply_compaction`` then returns the
whole pages left over to the pool. Positions stay logical: kept keys carry their RoPE phase, new tokens are appended
after the survivors. KVQuant and ShadowKV store keys pre-RoPE: ``_store`` rotates each key back from its position
(the physical index, since both are refused after eviction) before encoding it; ShadowKV's basis is the SVD of those
un-rotated prompt keys. MiniCache stores each merged pair (a, b) together once both layers are read: a's pages get
the shared directions (as many bytes as the dense tokens), b's the norms and retained tokens, whole groups at a time
(``_store_pair``); the tail of both layers stays dense until it fills a group. Sliding-window layers already hold
only their window and are left as they are.

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
from longfit.compression.shadowkv import key_basis
from longfit.compression.spec import parse_spec
from longfit.models.attention import gather_keys_values
from longfit.models.layers import RotaryEmbedding
from longfit.outputs import CompactionResult
from longfit.runtime.quant_pages import PageQuantFormat, encode_pair, minicache_formats

_CACHE_DTYPES = {2: "bfloat16", 4: "float32"}  # cache dtype bytes → PageQuantFormat dtype


@functools.lru_cache(maxsize=256)
def validate_engine_spec(text: str, block_size: int | None = None, head_dim: int | None = None,
                         dtype_bytes: int | None = None, num_kv_heads: int = 1) -> str:
    """Parse a spec (ValueError naming the problem) and check the engine can apply every stage (to pages of
    ``block_size`` tokens, ``num_kv_heads`` heads of ``head_dim`` channels and a cache dtype of ``dtype_bytes``, when
    given)."""
    spec = parse_spec(text)
    quant = spec.stage("quantize", "merge")
    flush_unit = {"kivi": "residual", "kvquant": "group", "minicache": "group"}.get(quant.name) if quant else None
    if flush_unit and block_size and quant.get(flush_unit) % block_size:
        raise ValueError(f"kv_compression {text!r}: {quant.name}:{flush_unit} must be a multiple of the KV block "
                         f"size {block_size} (the full-precision tail is flushed in whole pages)")
    evict = spec.stage("evict")
    storage = spec.stage("quantize", "lowrank")
    pre_rope = storage is not None and (storage.name == "shadowkv" or storage.name == "kvquant"
                                        and storage.get("bits") != 16)
    if pre_rope and evict is not None:
        raise ValueError(f"kv_compression {text!r}: {storage.name} does not combine with an eviction stage "
                         f"({evict.name}) in the engine yet: its pre-RoPE keys would need each kept token's original "
                         "position per KV head stored beside the pages; use kivi or int8 after eviction")
    fmt = None  # the records of num_kv_heads heads (also checks kvquant:group*head_dim against 16-bit offsets)
    if storage is not None and head_dim:
        fmt = PageQuantFormat.from_stage(storage, num_kv_heads, head_dim,
                                         _CACHE_DTYPES.get(dtype_bytes or 2, "bfloat16"))
    dense = 2 * num_kv_heads * head_dim * dtype_bytes * fmt.record_tokens if fmt is not None and dtype_bytes else 0
    if dense and fmt.record_bytes > dense:  # the in-place rewrite needs records no larger than their tokens
        hint = {"kivi": "raise kivi:group", "kvquant": "lower kvquant:outliers or kvquant:bits",
                "shadowkv": "lower shadowkv:rank, raise shadowkv:chunk or set shadowkv:budget=0 (no landmarks)",
                }.get(storage.name, f"choose a smaller {storage.name} setting")
        raise ValueError(f"kv_compression {text!r}: a {storage.name} record takes {fmt.record_bytes} bytes for "
                         f"{num_kv_heads} KV head(s) and {fmt.record_tokens} tokens, more than their {dense} bytes in "
                         f"the cache dtype; "
                         f"{hint}")
    if evict is not None and evict.as_dict().get("every") and spec.stage("select", "quantize", "lowrank",
                                                                          "merge") is not None:
        raise ValueError(f"kv_compression {text!r}: {evict.name}:every (decode-time re-compression) does not combine "
                         "with a storage or page-selection stage in the engine yet")
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
        self._formats: dict[str, tuple[PageQuantFormat | None, ...] | None] = {}

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

    def layer_formats(self, spec: str) -> tuple[PageQuantFormat | None, ...] | None:
        """Per layer, the record format of the spec's storage stage (quantize, ThinK, ShadowKV: one format on every
        full layer; MiniCache: each merged pair's two formats), None when no layer stores records."""
        if spec not in self._formats:
            stage = parse_spec(spec).stage("quantize", "lowrank", "merge")
            dtype = "bfloat16" if self.kv_pool.dtype == torch.bfloat16 else "float32"
            heads, dim = self.kv_pool.shape[3], self.kv_pool.shape[4]
            full = [window is None for window in self.layer_windows]
            formats: list[PageQuantFormat | None] = [None] * len(full)
            if stage is not None and stage.name == "minicache":
                formats = minicache_formats(stage, full, heads, dim, dtype)
            elif stage is not None:
                fmt = PageQuantFormat.from_stage(stage, heads, dim, dtype)
                formats = [fmt if f else None for f in full]
            self._formats[spec] = tuple(formats) if any(formats) else None
        return self._formats[spec]

    # ------------------------------------------------------------------ prefill-end compression
    def compact(self, request_id: str, spec: str, tables: np.ndarray, num_tokens: int,
                queries: dict[int, torch.Tensor], side: dict[int, torch.Tensor] | None = None) -> CompactionResult:
        """Compress a request whose ``num_tokens`` prompt tokens are all cached (nothing quantized yet).

        Args:
            tables: [L, max_pages] the request's page tables (runner mirror).
            queries: layer → [Hq, W, D] post-RoPE queries of the prompt's last tokens.
            side: filled with each layer's side tensor, which later flushes and reads need: ThinK's key channels
                kept [Hkv, d'], ShadowKV's key basis [r, Hkv * D] (cache dtype).
        Returns:
            tokens kept per layer (physical) and, when storing records, the stream layout; the manager frees the
            pages beyond them.
        """
        evictors = [p for p in self.policies(spec) if p.kind == "evict"]
        pruner = next((p for p in self.policies(spec) if p.name == "think"), None)
        formats = self.layer_formats(spec)
        side = side if side is not None else {}
        num_layers = len(self.layer_windows)
        kept_counts, q_tokens, q_pages, q_bytes = [], [0] * num_layers, [0] * num_layers, [0] * num_layers
        first_of_pair: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # MiniCache: layer a's KV
        bs = self.block_size
        for layer, window in enumerate(self.layer_windows):
            fmt = formats[layer] if formats is not None else None
            if window is not None or not evictors and formats is None:  # sliding, or page selection only
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
            if fmt is not None and fmt.method == "minicache":
                if fmt.role == 0:  # stored with its partner, once that layer is read
                    first_of_pair[layer] = (pages, keys.transpose(0, 1), values.transpose(0, 1))
                    continue
                a = fmt.partner
                pages_a, keys_a, values_a = first_of_pair.pop(a)
                merged = self._store_pair(fmt, pages_a, pages, 0, keys_a, values_a, keys.transpose(0, 1),
                                          values.transpose(0, 1))
                for other in (a, layer):
                    q_tokens[other] = merged
                    self._account(self._formats_at(formats, other), other, q_tokens, q_pages, q_bytes)
            elif fmt is not None:
                if fmt.method == "think":
                    side[layer] = pruner.prune(keys, layer_queries).channels  # [Hkv, d']
                elif fmt.method == "shadowkv":  # SVD of the prompt's pre-RoPE keys (no eviction: position = index)
                    pre = self.layer_ropes[layer].rotate(keys.transpose(0, 1), torch.arange(kept, device=keys.device),
                                                         inverse=True)  # [T, Hkv, D]
                    side[layer] = key_basis(pre.reshape(kept, -1), fmt.rank).to(self.kv_pool.dtype)  # [r, Hkv*D]
                q_tokens[layer] = self._store(fmt, layer, pages, 0, keys.transpose(0, 1), values.transpose(0, 1),
                                              side.get(layer), prompt=True)
                self._account(fmt, layer, q_tokens, q_pages, q_bytes)
            elif kept < num_tokens:
                self._write_tokens(pages, 0, keys.transpose(0, 1), values.transpose(0, 1))
        if formats is None:
            return CompactionResult(request_id=request_id, num_kept_tokens=kept_counts)
        return CompactionResult(request_id, kept_counts, q_tokens, q_pages, q_bytes)

    @staticmethod
    def _formats_at(formats: tuple[PageQuantFormat | None, ...], layer: int) -> PageQuantFormat:
        fmt = formats[layer]
        assert fmt is not None
        return fmt

    # ------------------------------------------------------------------ decode-time re-compression
    def recompact(self, request_id: str, spec: str, tables: np.ndarray, num_cached: list[int],
                  budgets: Sequence[tuple[int, int] | None], queries: dict[int, torch.Tensor]) -> CompactionResult:
        """Evict every layer that reached its trigger back to its budget (``compression.spec.decode_budgets``),
        with the spec's own eviction policy on the layer's current keys (survivors and newer tokens alike) and
        ``queries``: layer → ``[Hq, W, D]`` post-RoPE queries of the latest tokens. The kept tokens are rewritten
        to the first pages in order (positions stay logical, as at prefill); other layers are left as they are."""
        evictors = [p for p in self.policies(spec) if p.kind == "evict"]
        kept_counts = list(num_cached)
        for layer, budget in enumerate(budgets):
            if budget is None or num_cached[layer] < budget[1]:
                continue
            num_tokens = num_cached[layer]
            pages = torch.from_numpy(tables[layer, :-(-num_tokens // self.block_size)]).to(self.kv_pool.device)
            keys, values = gather_keys_values(self.kv_pool, pages)  # [P*bs, Hkv, D]
            keys, values = keys[:num_tokens].transpose(0, 1), values[:num_tokens].transpose(0, 1)  # [Hkv, T, D]
            for policy in evictors:  # the budget is absolute now (the prompt's keep fraction was applied once)
                fixed = replace(policy, keep=None, budget=budget[0],
                                **({"window": None} if policy.name == "streaming_llm" else {}))
                plan = fixed.plan(layer, len(self.layer_windows), keys, values, queries.get(layer))
                keys, values = plan.gather(keys), plan.gather(values)
            kept_counts[layer] = keys.shape[1]
            self._write_tokens(pages, 0, keys.transpose(0, 1), values.transpose(0, 1))
        return CompactionResult(request_id=request_id, num_kept_tokens=kept_counts)

    # ------------------------------------------------------------------ decode-time flush of quantized tails
    def flush(self, request_id: str, formats: tuple[PageQuantFormat | None, ...], tables: np.ndarray,
              num_cached: list[int], quant_tokens: np.ndarray, quant_pages: np.ndarray, quant_bytes: np.ndarray,
              side: dict[int, torch.Tensor]) -> CompactionResult | None:
        """Store whole flush units of the tails (``num_cached[l] - quant_tokens[l]`` tokens) of every layer with a
        format (a MiniCache pair: both layers at once, their tails are equal); None when no tail has reached its
        format's ``flush_tokens``."""
        tails = [n - int(q) for n, q in zip(num_cached, quant_tokens)]
        todo = [layer for layer, fmt in enumerate(formats)
                if fmt is not None and fmt.role == 0 and fmt.quantizable(tails[layer]) > 0]
        if not todo:
            return None
        q_tokens, q_pages, q_bytes = quant_tokens.tolist(), quant_pages.tolist(), quant_bytes.tolist()
        for layer in todo:
            fmt = self._formats_at(formats, layer)
            layers = [layer] if fmt.partner is None else list(fmt.pair)
            pages, tail = [], []
            for one in layers:
                used = q_pages[one] + -(-tails[one] // self.block_size)
                pages.append(torch.from_numpy(tables[one, :used]).to(self.kv_pool.device))
                keys, values = gather_keys_values(self.kv_pool, pages[-1][q_pages[one]:])  # [tail pages * bs, Hkv, D]
                tail += [keys[:tails[one]], values[:tails[one]]]
            if fmt.partner is None:
                q_tokens[layer] += self._store(fmt, layer, pages[0], q_tokens[layer], *tail, side.get(layer))
            else:
                added = self._store_pair(fmt, pages[0], pages[1], q_tokens[layer], *tail)
                q_tokens[layers[1]] += added
                q_tokens[layer] += added
            for one in layers:
                self._account(self._formats_at(formats, one), one, q_tokens, q_pages, q_bytes)
        return CompactionResult(request_id, list(num_cached), q_tokens, q_pages, q_bytes)

    # ------------------------------------------------------------------ storage
    def _account(self, fmt: PageQuantFormat, layer: int, q_tokens: list[int], q_pages: list[int],
                 q_bytes: list[int]) -> None:
        """Set a layer's stream pages and stored bytes (records + side tensor) from its stream tokens."""
        q_bytes[layer] = fmt.stream_bytes(q_tokens[layer]) + fmt.side_bytes
        q_pages[layer] = self._stream_pages(fmt, q_tokens[layer])

    def _stream_pages(self, fmt: PageQuantFormat, num_tokens: int) -> int:
        return fmt.stream_pages(num_tokens, self.pool_bytes.shape[1])

    def _store(self, fmt: PageQuantFormat, layer: int, pages: torch.Tensor, stream_tokens: int, keys: torch.Tensor,
               values: torch.Tensor, side: torch.Tensor | None = None, prompt: bool = False) -> int:
        """Append whole flush units of ``keys, values: [T, Hkv, D]`` (post-RoPE, cache dtype) to the layer's stream
        (``stream_tokens`` tokens already on ``pages``) and write the rest after the stream in the cache dtype;
        returns the tokens added to the stream. The caller has read everything it needs from ``pages`` before.
        Pre-RoPE formats (KVQuant, ShadowKV) get the stored keys rotated back from their positions
        ``stream_tokens + i``, rounded to the cache dtype (RoPE is orthogonal: rotating back is exact up to that
        rounding). ShadowKV's landmarks come from the post-RoPE keys, its outlier chunks from the ``prompt``'s."""
        quantized = fmt.quantizable(keys.shape[0])
        if quantized:
            stored_keys = keys[:quantized]
            if fmt.pre_rope:
                positions = torch.arange(stream_tokens, stream_tokens + quantized, device=keys.device)
                stored_keys = self.layer_ropes[layer].rotate(stored_keys, positions, inverse=True)
            records = fmt.encode(stored_keys, values[:quantized], side, keys[:quantized], prompt)
            fmt.write(self.pool_bytes, pages, stream_tokens // fmt.record_tokens, records)
        if quantized < keys.shape[0]:
            tail_start = self._stream_pages(fmt, stream_tokens + quantized)
            self._write_tokens(pages[tail_start:], 0, keys[quantized:], values[quantized:])
        return quantized

    def _store_pair(self, fmt: PageQuantFormat, pages_a: torch.Tensor, pages_b: torch.Tensor, stream_tokens: int,
                    keys_a: torch.Tensor, values_a: torch.Tensor, keys_b: torch.Tensor, values_b: torch.Tensor) -> int:
        """MiniCache: merge the whole groups of a pair's ``[T, Hkv, D]`` K and V (both layers hold
        ``stream_tokens`` merged tokens on ``pages_a`` / ``pages_b`` already), append the two layers' records and
        write the rest after each stream in the cache dtype; returns the tokens merged."""
        merged = fmt.quantizable(keys_a.shape[0])
        a, b = (replace(fmt, role=role) for role in (0, 1))
        if merged:
            records = encode_pair(fmt, keys_a[:merged], values_a[:merged], keys_b[:merged], values_b[:merged])
            for one, pages, rec in zip((a, b), (pages_a, pages_b), records):
                one.write(self.pool_bytes, pages, stream_tokens // fmt.record_tokens, rec)
        if merged < keys_a.shape[0]:
            for one, pages, keys, values in zip((a, b), (pages_a, pages_b), (keys_a, keys_b), (values_a, values_b)):
                tail_start = self._stream_pages(one, stream_tokens + merged)
                self._write_tokens(pages[tail_start:], 0, keys[merged:], values[merged:])
        return merged

    def _write_tokens(self, pages: torch.Tensor, first_slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``keys, values: [T, Hkv, D]`` to slots ``first_slot ...`` of ``pages`` (cache dtype)."""
        bs = self.block_size
        slots = torch.arange(first_slot, first_slot + keys.shape[0], device=pages.device)
        rows = pages[slots // bs] * (2 * bs) + slots % bs
        flat = self.kv_pool.view(-1, *self.kv_pool.shape[-2:])  # [num_blocks * 2 * bs, Hkv, D]
        flat.index_copy_(0, rows, keys.to(flat.dtype).contiguous())
        flat.index_copy_(0, rows + bs, values.to(flat.dtype).contiguous())


class QueryWindow:
    """Post-RoPE queries of a request's latest ``size`` tokens in every layer, for decode-time re-compression by a
    method that scores with recent queries (SnapKV's window, H2O's ``observe``, TOVA's last query): a ring
    ``[L, Hq, size, D]`` in the model dtype, written once per step, put in order only when a layer is evicted."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ring: torch.Tensor | None = None
        self.count = 0  # queries held (at most size)
        self.next = 0  # ring slot of the next query

    def push(self, queries: torch.Tensor) -> None:
        """Append ``queries: [L, Hq, n, D]`` (oldest first)."""
        if self.ring is None:
            shape = (queries.shape[0], queries.shape[1], self.size, queries.shape[3])
            self.ring = queries.new_zeros(shape)
        queries = queries[:, :, -self.size:]
        slots = (self.next + torch.arange(queries.shape[2], device=queries.device)) % self.size
        self.ring[:, :, slots] = queries.to(self.ring.dtype)
        self.next = int(slots[-1]) + 1 if queries.shape[2] else self.next
        self.count = min(self.size, self.count + queries.shape[2])

    def ordered(self) -> dict[int, torch.Tensor]:
        """layer → ``[Hq, count, D]``, oldest first."""
        if self.ring is None:
            return {}
        ring = self.ring if self.count < self.size else self.ring.roll(-self.next, dims=2)
        start = self.next - self.count if self.count < self.size else 0
        return {layer: ring[layer, :, start:start + self.count] for layer in range(ring.shape[0])}
