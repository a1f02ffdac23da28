"""KVCacheManager: policy over the BlockPool — per-layer page tables, prefix hits, slot allocation,
sliding-window release, compaction after compression, freeing. No torch here.

Each request holds one page table per layer. Uncompressed layers grow in lockstep (one page per
``block_size`` tokens); after compression a layer keeps fewer tokens (``num_cached[l]`` physical tokens,
while positions stay logical) and the whole pages left over are returned to the pool. Sliding-window
layers (Gemma 3) return the pages that fall out of their window as decoding moves on.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from longfit.engine.request import Request
from longfit.kv.block_pool import BlockPool
from longfit.kv.spec import KVCacheSpec
from longfit.outputs import CompactionResult


@dataclass(slots=True)
class RequestKV:
    """Bookkeeping of one request's KV pages (no tensors)."""

    tables: list[list[int]]  # per layer: page ids in token order (0 = released / padding)
    num_cached: list[int]  # per layer: physical tokens stored once the scheduled step has run
    # Quantized layers: the first quant_pages[l] pages hold a byte stream of quant_tokens[l] quantized tokens
    # (quant_bytes[l] bytes); the tokens after them sit in ordinary pages of block_size tokens.
    quant_tokens: list[int]
    quant_pages: list[int]
    quant_bytes: list[int]
    new_blocks: list[list[int]]  # per layer: pages appended since the runner last heard of this request
    num_released: list[int]  # per layer: leading pages already released (sliding windows)
    block_hashes: list[Hashable] = field(default_factory=list)  # prefix hash of each full block
    num_hashed: int = 0  # leading blocks whose pages are registered in the pool under their hash
    cacheable: bool = True  # full blocks may enter the prefix cache

    def num_pages(self) -> int:
        return sum(len(table) - released for table, released in zip(self.tables, self.num_released))


class KVCacheManager:
    """Allocates, shares, compacts and frees KV pages for requests.

    Args:
        spec: resolved layout (number of pages, block size, sliding windows per layer).
        enable_prefix_caching: share full prompt blocks between requests by content hash.
    """

    def __init__(self, spec: KVCacheSpec, enable_prefix_caching: bool = True) -> None:
        self.spec = spec
        self.block_size = spec.block_size
        self.num_layers = spec.num_layers
        self.pool = BlockPool(spec.num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.requests: dict[str, RequestKV] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # prompt tokens found there

    # ------------------------------------------------------------------ capacity
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.num_used_blocks / (self.spec.num_blocks - 1)

    def used_bytes(self) -> int:
        return self.pool.num_used_blocks * self.spec.page_bytes

    def free_bytes(self) -> int:
        return self.pool.num_free_blocks * self.spec.page_bytes

    def request_bytes(self, request_id: str) -> int:
        """KV bytes a request holds now (whole pages, all layers)."""
        state = self.requests.get(request_id)
        return 0 if state is None else state.num_pages() * self.spec.page_bytes

    def stored_bytes(self, request_id: str) -> int:
        """Exact KV bytes of a request's tokens, without page rounding: quantized streams plus the other tokens
        in the cache dtype (sliding-window layers count the last ``window`` tokens, the ones still visible)."""
        state = self.requests.get(request_id)
        if state is None:
            return 0
        token_bytes = self.spec.page_bytes // self.block_size
        total = 0
        for layer, window in enumerate(self.spec.layer_windows):
            tokens = state.num_cached[layer] - state.quant_tokens[layer]
            if window is not None:
                tokens = min(tokens, window)
            total += state.quant_bytes[layer] + tokens * token_bytes
        return total

    def max_pages_for(self, num_tokens: int) -> int:
        """Pages an uncompressed request of ``num_tokens`` tokens needs at its peak."""
        return self.spec.pages_for_tokens(num_tokens)

    def can_ever_fit(self, num_tokens: int) -> bool:
        return self.max_pages_for(num_tokens) <= self.spec.num_blocks - 1

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0

    # ------------------------------------------------------------------ prefix cache
    def _state(self, request: Request) -> RequestKV:
        state = self.requests.get(request.request_id)
        if state is None:
            layers = range(self.num_layers)
            state = RequestKV(tables=[[] for _ in layers], num_cached=[0] * self.num_layers,
                              quant_tokens=[0] * self.num_layers, quant_pages=[0] * self.num_layers,
                              quant_bytes=[0] * self.num_layers, new_blocks=[[] for _ in layers], num_released=[0] * self.num_layers)
            state.cacheable = self.enable_prefix_caching and not request.kv_compression
            self.requests[request.request_id] = state
        return state

    def _update_hashes(self, request: Request, state: RequestKV, num_tokens: int) -> None:
        """Extend the chain of block hashes over full blocks among the first ``num_tokens`` tokens."""
        bs = self.block_size
        tokens = request.all_token_ids
        parent = state.block_hashes[-1] if state.block_hashes else None
        for index in range(len(state.block_hashes), num_tokens // bs):
            parent = hash((parent, tuple(tokens[index * bs:(index + 1) * bs])))
            state.block_hashes.append(parent)

    def get_computed_blocks(self, request: Request) -> int:
        """Reuse cached pages for the longest cached prefix of the prompt; returns the tokens found.

        At least one prompt token is always left to compute so the step produces logits. Requests that
        compress their cache or ask for prompt logprobs compute everything.
        """
        state = self._state(request)
        if not state.cacheable or request.sampling_params.prompt_logprobs is not None:
            return 0
        self._update_hashes(request, state, request.num_prompt_tokens - 1)
        self.num_prefix_queries += request.num_prompt_tokens
        hit_pages: list[list[int]] = []
        for block_hash in state.block_hashes:
            pages = [self.pool.lookup((block_hash, layer)) for layer in range(self.num_layers)]
            if any(page is None for page in pages):
                break
            hit_pages.append(pages)  # type: ignore[arg-type]
        if not hit_pages:
            return 0
        for layer in range(self.num_layers):
            column = [pages[layer] for pages in hit_pages]
            self.pool.touch(column)
            state.tables[layer].extend(column)
            state.new_blocks[layer].extend(column)
        num_hit = len(hit_pages) * self.block_size
        state.num_hashed = len(hit_pages)
        state.num_cached = [num_hit] * self.num_layers
        self.num_prefix_hits += num_hit
        return num_hit

    # ------------------------------------------------------------------ allocation
    def _layer_needs(self, state: RequestKV, num_new_tokens: int) -> list[int]:
        """Pages each layer must add to hold ``num_new_tokens`` more tokens (new tokens go after the stream)."""
        bs = self.block_size
        return [max(0, q_pages + -(-(cached - q_tokens + num_new_tokens) // bs) - len(table))
                for cached, q_tokens, q_pages, table in zip(state.num_cached, state.quant_tokens, state.quant_pages,
                                                            state.tables)]

    def pages_needed(self, request: Request, num_new_tokens: int) -> int:
        return sum(self._layer_needs(self._state(request), num_new_tokens))

    def _take_pages(self, state: RequestKV, num_new_tokens: int) -> bool:
        """Append to each layer's table the pages ``num_new_tokens`` more tokens need; False (nothing taken) if
        the pool has too few free pages."""
        needs = self._layer_needs(state, num_new_tokens)
        needed = sum(needs)
        if needed > self.pool.num_free_blocks:
            return False
        if needed:
            pages = self.pool.allocate(needed)
            cursor = 0
            for layer, need in enumerate(needs):
                if need:
                    chunk = pages[cursor:cursor + need]
                    cursor += need
                    state.tables[layer].extend(chunk)
                    state.new_blocks[layer].extend(chunk)
        return True

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` more tokens in every layer; False if the pool is too full.

        On success the physical counts advance as if the step had run (the scheduler runs it next) and
        sliding-window layers release the pages no future query can see.
        """
        state = self._state(request)
        if not self._take_pages(state, num_new_tokens):
            return False
        for layer in range(self.num_layers):
            state.num_cached[layer] += num_new_tokens
        if state.cacheable:
            self._cache_full_blocks(request, state, request.num_computed_tokens + num_new_tokens)
        self._release_out_of_window(request, state, request.num_computed_tokens)
        return True

    def reserve_slots(self, request: Request, num_tokens: int) -> bool:
        """Pages for ``num_tokens`` tokens after those already counted, without counting them: a multi-step
        decode's lookahead, whose tokens are not known yet, so neither the counts nor the blocks' prefix hashes
        advance (``allocate_slots`` counts them once they are). False, with nothing taken, if the pool is too
        full."""
        return self._take_pages(self._state(request), num_tokens)

    def _cache_full_blocks(self, request: Request, state: RequestKV, num_tokens: int) -> None:
        self._update_hashes(request, state, num_tokens)
        num_full = num_tokens // self.block_size
        for index in range(state.num_hashed, num_full):
            for layer in range(self.num_layers):
                page = state.tables[layer][index]
                if page:
                    self.pool.set_hash(page, (state.block_hashes[index], layer))
        state.num_hashed = max(state.num_hashed, num_full)

    def _release_out_of_window(self, request: Request, state: RequestKV, first_query: int) -> None:
        """Free pages of sliding-window layers lying wholly before every remaining query's window.

        The earliest query still to run (this step's first token) sits at ``first_query`` and sees keys in
        ``(first_query - window, first_query]``; later queries see even later keys.
        """
        for layer, window in enumerate(self.spec.layer_windows):
            if window is None:  # compression never touches sliding layers: their tables stay logical
                continue
            first_visible = first_query - window + 1  # keys before it are never read again
            num_dead = max(0, first_visible) // self.block_size
            table = state.tables[layer]
            start = state.num_released[layer]
            if num_dead > start:
                dead = table[start:num_dead]
                self.pool.free(dead)
                for index in range(start, num_dead):
                    table[index] = 0
                state.num_released[layer] = num_dead

    def take_new_blocks(self, request: Request) -> list[list[int]]:
        """Pages appended since the last call (the diff the runner applies to its table mirror)."""
        state = self._state(request)
        new = state.new_blocks
        state.new_blocks = [[] for _ in range(self.num_layers)]
        return new

    def full_tables(self, request: Request) -> list[list[int]]:
        """The whole page tables (sent when the runner has no mirror yet); clears the pending diff."""
        state = self._state(request)
        state.new_blocks = [[] for _ in range(self.num_layers)]
        return [list(table) for table in state.tables]

    def num_cached_tokens(self, request: Request) -> list[int]:
        return list(self._state(request).num_cached)

    # ------------------------------------------------------------------ compaction and freeing
    def apply_compaction(self, request: Request, result: CompactionResult) -> list[int]:
        """After compression kept ``result.num_kept_tokens[l]`` tokens in layer ``l`` (written to the
        first pages of its table: the quantized stream, then the other tokens), free every page beyond them.
        Returns the freed page ids."""
        state = self._state(request)
        freed: list[int] = []
        request.is_compressed = True
        state.cacheable = False
        for layer, kept in enumerate(result.num_kept_tokens):
            if result.quant_tokens is not None:
                state.quant_tokens[layer] = result.quant_tokens[layer]
                state.quant_pages[layer] = result.quant_pages[layer]
                state.quant_bytes[layer] = result.quant_bytes[layer]
            keep_pages = state.quant_pages[layer] + -(-(kept - state.quant_tokens[layer]) // self.block_size)
            table = state.tables[layer]
            freed.extend(table[keep_pages:])
            del table[keep_pages:]
            state.num_cached[layer] = kept
            state.num_released[layer] = min(state.num_released[layer], keep_pages)
        self.pool.free(freed)
        return freed

    def free(self, request: Request) -> None:
        """Return every page of the request (shared prefix pages just lose a reference)."""
        state = self.requests.pop(request.request_id, None)
        if state is None:
            return
        for table in state.tables:
            self.pool.free(table)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
