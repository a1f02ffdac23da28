"""ModelRunner: executes one scheduled step — page tables → inputs → forward → compression → sampling.

Data flow: ``SchedulerOutput`` (which requests, which tokens, which new pages) → flat batch (decode
tokens first, then prompt chunks) + ``AttentionMetadata`` → ``DecoderModel`` → logits of the rows that
sample (and of every prompt row when prompt logprobs are asked) → ``ModelRunnerOutput``. The runner owns
every tensor that lives across steps: the KV pool, a mirror of each running request's page tables
(updated from the scheduler's page diffs), the seeded generators, and the grammar matchers of structured
requests (``runtime/structured.py``: their token masks are applied to the logits before sampling).
"""

from __future__ import annotations

import numpy as np
import torch

from longfit.compression.spec import decode_budgets
from longfit.config import ModelConfig
from longfit.kv.spec import KVCacheSpec
from longfit.models.attention import AttentionMetadata, ChunkMeta, PageSelect, StreamRead
from longfit.models.base import DecoderModel
from longfit.outputs import (
    CompactionResult,
    ModelRunnerOutput,
    PositionLogprobs,
    ScheduledRequest,
    SchedulerOutput,
)
from longfit.runtime import decode_loop
from longfit.runtime.compactor import Compactor, QueryWindow
from longfit.runtime.decode_graph import DecodeGraph
from longfit.runtime.kv_store import allocate_kv_pool
from longfit.runtime.quant_pages import PageQuantFormat
from longfit.runtime.sampler import SamplingTensors, apply_penalties, compute_logprobs, greedy, sample
from longfit.runtime.structured import GrammarCompiler, GrammarMatcher


class RequestState:
    """Runner-side state of a running request: page tables mirror [L, max_pages] and its generator."""

    __slots__ = ("tables", "num_pages", "generator", "queries", "formats", "quant_tokens", "quant_pages", "quant_bytes",
                 "side", "quest", "evict_spec", "budgets", "recent", "grammar")

    def __init__(self, num_layers: int, max_pages: int, seed: int | None) -> None:
        self.tables = np.zeros((num_layers, max_pages), dtype=np.int64)
        self.num_pages = np.zeros(num_layers, dtype=np.int64)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # layer → post-RoPE queries [Hq, w, D] of the prompt's last tokens, gathered over chunks (compression)
        self.queries: dict[int, list[torch.Tensor]] = {}
        # Records once compressed: per layer its format (None: plain tokens), and the first quant_pages pages hold
        # quant_tokens tokens as records.
        self.formats: tuple[PageQuantFormat | None, ...] | None = None
        self.quant_tokens = np.zeros(num_layers, dtype=np.int64)
        self.quant_pages = np.zeros(num_layers, dtype=np.int64)
        self.quant_bytes = np.zeros(num_layers, dtype=np.int64)
        # layer → the storage format's side tensor (ThinK: [Hkv, d'] key channels kept; ShadowKV: [r, Hkv*D] basis)
        self.side: dict[int, torch.Tensor] = {}
        self.quest = None  # Quest policy once the prompt is compressed: decode reads selected pages
        # Decode-time re-compression (an eviction stage's `every`): the spec, per-layer (budget, trigger) and the
        # latest queries when the method scores with them.
        self.evict_spec: str | None = None
        self.budgets: list[tuple[int, int] | None] | None = None
        self.recent: QueryWindow | None = None
        self.grammar: GrammarMatcher | None = None  # structured output: where the output is in its grammar

    def set_layout(self, result: CompactionResult, block_size: int) -> None:
        """Follow a compaction: the manager kept the stream pages plus the pages of the remaining tokens."""
        if result.quant_tokens is not None:
            self.quant_tokens[:] = result.quant_tokens
            self.quant_pages[:] = result.quant_pages
            self.quant_bytes[:] = result.quant_bytes
        kept = np.asarray(result.num_kept_tokens)
        self.num_pages[:] = self.quant_pages + -(-(kept - self.quant_tokens) // block_size)

    def append_pages(self, new_block_ids: list[list[int]], reset: bool) -> None:
        if reset:
            self.num_pages[:] = 0
        for layer, pages in enumerate(new_block_ids):
            if pages:
                # Sized for max_model_len tokens; compaction only shrinks a table, so this never overflows.
                start = self.num_pages[layer]
                self.tables[layer, start:start + len(pages)] = pages
                self.num_pages[layer] = start + len(pages)


class ModelRunner:
    """Runs the model over the paged KV cache.

    Args:
        model: the decoder, weights already in their compute form.
        config: its shape.
        spec: the resolved KV layout; the pool is allocated here.
        max_model_len: longest request, to size the page-table mirrors.
    """

    def __init__(self, model: DecoderModel, config: ModelConfig, spec: KVCacheSpec, max_model_len: int,
                 device: str = "cpu") -> None:
        self.model = model
        self.config = config
        self.spec = spec
        self.device = device
        self.kv_pool = allocate_kv_pool(spec, device)
        self.block_size = spec.block_size
        self.max_pages = -(-max_model_len // spec.block_size) + 1
        self.states: dict[str, RequestState] = {}
        self.windows = spec.layer_windows
        self._layer_rows = np.arange(len(self.windows))[:, None]  # [L, 1]: a row index per layer
        self._window_groups: dict[int | None, list[int]] = {}  # layers by sliding window (None: full attention)
        for layer, window in enumerate(self.windows):
            self._window_groups.setdefault(window, []).append(layer)
        self.compactor = Compactor(self.kv_pool, spec.block_size, spec.layer_windows, config.attention_scale,
                                   [layer.attn.rope for layer in model.layers])
        # Quest: per-page key min / max [num_blocks, 2, Hkv, D], allocated when a request first selects pages.
        self.page_bounds: torch.Tensor | None = None
        # Structured output: the engine sets it (it holds the tokenizer); None refuses structured requests.
        self.grammars: GrammarCompiler | None = None
        self.graph: DecodeGraph | None = None

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in scheduler_output.finished_request_ids:
            state = self.states.pop(request_id, None)
            if state is not None and state.formats is not None:
                self._clear_streams(state)
        result = ModelRunnerOutput(sampled_token_ids={})
        if not scheduler_output.scheduled:
            return result
        for item in scheduler_output.scheduled:
            state = self.states.get(item.request_id)
            if state is None or item.reset_block_table:
                state = RequestState(self.spec.num_layers, self.max_pages, item.sampling_params.seed)
                self.states[item.request_id] = state
            state.append_pages(item.new_block_ids, item.reset_block_table)
            structured = item.sampling_params.structured_output
            if structured is not None and state.grammar is None:
                if self.grammars is None:
                    raise ValueError("structured_output: this runner has no tokenizer to build grammars with")
                # A new state (first step, or resumed after a preemption): follow the output generated so far.
                state.grammar = self.grammars.matcher(structured, item.output_token_ids)

        def is_decode(it: ScheduledRequest) -> bool:
            return len(it.token_ids) == 1 and it.sampling_params.prompt_logprobs is None and not it.kv_compression

        decodes = [it for it in scheduler_output.scheduled if is_decode(it)]
        chunks = [it for it in scheduler_output.scheduled if not is_decode(it)]
        if scheduler_output.num_steps > 1 and not chunks and decode_loop.applies(self, decodes):
            decode_loop.run(self, decodes, scheduler_output.num_steps, result)
            return result
        ordered = decodes + chunks
        input_ids, positions, key_rows = self._flat_inputs(ordered)
        meta = AttentionMetadata(kv_pool=self.kv_pool, block_size=self.block_size, key_rows=key_rows,
                                 num_decode=len(decodes))
        if decodes:
            self._decode_metadata(decodes, meta)
            capture = [row for row, it in enumerate(decodes) if self.states[it.request_id].recent is not None]
            if capture:
                meta.decode_capture = torch.tensor(capture, dtype=torch.int64, device=self.device)
        start = len(decodes)
        for item in chunks:
            meta.chunks.append(self._chunk_metadata(item, start))
            start += len(item.token_ids)

        if self.graph is not None and self.graph.eligible(meta):
            hidden = self.graph(input_ids, positions, meta)  # [N, d], the same forward compiled
        else:
            hidden = self.model(input_ids, positions, meta)  # [N, d]
        self._keep_queries(meta, decodes, chunks)
        for item in scheduler_output.scheduled:
            if self._compresses(item):
                result.compactions.append(self._compact(item))
            elif self.states[item.request_id].budgets is not None:
                recompacted = self._recompact(item)
                if recompacted is not None:
                    result.compactions.append(recompacted)
            elif self.states[item.request_id].quest is not None:
                before = np.asarray(item.num_cached_tokens)
                self._update_bounds(self.states[item.request_id], before, before + len(item.token_ids))
            elif self.states[item.request_id].formats is not None:
                flushed = self._flush(item)
                if flushed is not None:
                    result.compactions.append(flushed)

        # Rows that produce logits: every decode token; a chunk's last token if it samples; all its
        # tokens if prompt logprobs are asked.
        sample_rows: list[int] = []
        sample_items: list[ScheduledRequest] = []
        prompt_rows: list[tuple[ScheduledRequest, int, int]] = []
        for row, item in enumerate(decodes):
            sample_rows.append(row)
            sample_items.append(item)
        for chunk, item in zip(meta.chunks, chunks):
            if item.sampling_params.prompt_logprobs is not None and item.num_computed_tokens < item.num_prompt_tokens:
                prompt_rows.append((item, chunk.start, chunk.end))
            if item.do_sample:
                sample_rows.append(chunk.end - 1)
                sample_items.append(item)
        for item, begin, end in prompt_rows:
            result.prompt_logprobs[item.request_id] = self._prompt_logprobs(item, hidden[begin:end])
        if sample_items:
            bias = self._logit_bias(sample_items)
            logits = self.model.compute_logits(hidden[sample_rows], bias)  # [B, V] fp32
            self._sample(logits, sample_items, result)
        return result

    def _logit_bias(self, items: list[ScheduledRequest]) -> torch.Tensor | None:
        """fp32 [B, V] added to the sampling rows' logits, or None when no row needs one: -inf where a structured
        request's grammar forbids the token, plus the request's ``logit_bias``. Built before the logits, so that
        the head's leading candidates are rescored among the tokens as biased (``DecoderModel.compute_logits``)."""
        grammars = [self.states[it.request_id].grammar for it in items]
        biases = [it.sampling_params.logit_bias for it in items]
        if all(g is None for g in grammars) and not any(biases):
            return None
        bias = torch.zeros(len(items), self.config.vocab_size, dtype=torch.float32)
        for row, (grammar, values) in enumerate(zip(grammars, biases)):
            if values:
                bias[row, list(values)] = torch.tensor(list(values.values()), dtype=torch.float32)
            if grammar is not None:
                bias[row].masked_fill_(~grammar.allowed(), float("-inf"))
        return bias.to(self.device)

    def _clear_streams(self, state: RequestState) -> None:
        """Zero the stream pages of a request that leaves: as ordinary pages they may next hold tokens only in
        some slots, and attention multiplies the other (masked) slots by zero, so they must never hold the NaN
        bit patterns packed codes can form. The pages are free already; nothing reuses them before this step."""
        width = int(state.quant_pages.max())
        pages = state.tables[:, :width][np.arange(width) < state.quant_pages[:, None]]
        if pages.size:
            self.kv_pool[torch.from_numpy(pages).to(self.device)] = 0

    # ------------------------------------------------------------------ inputs
    def _flat_inputs(self, items: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, positions: [N]; key_rows: [L, N] rows of each new key in the flattened pool."""
        bs = self.block_size
        ids: list[int] = []
        pos_parts, row_parts = [], []
        for item in items:
            n = len(item.token_ids)
            ids.extend(item.token_ids)
            pos_parts.append(np.arange(item.num_computed_tokens, item.num_computed_tokens + n))
            state = self.states[item.request_id]
            # New tokens go to the tail, after the quantized stream (if any): [L, n] slots in the tail.
            slot = np.asarray(item.num_cached_tokens)[:, None] + np.arange(n) - state.quant_tokens[:, None]
            pages = state.tables[self._layer_rows, state.quant_pages[:, None] + slot // bs]  # [L, n]
            row_parts.append(pages * (2 * bs) + slot % bs)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        positions = torch.from_numpy(np.concatenate(pos_parts)).to(self.device)
        key_rows = torch.from_numpy(np.concatenate(row_parts, axis=1)).to(self.device)
        return input_ids, positions, key_rows

    def _decode_metadata(self, items: list[ScheduledRequest], meta: AttentionMetadata) -> None:
        """Per layer: the pages each decode query reads (only the window's pages on sliding layers; the
        quantized stream pages and the tail pages on quantized layers)."""
        bs = self.block_size
        states = [self.states[it.request_id] for it in items]
        # C order: a layer's row is then contiguous whatever Bd (a compiled step guards on strides).
        seq_lens = np.ascontiguousarray(np.asarray([it.num_cached_tokens for it in items]).T + 1)  # [L, Bd]
        # tables [L, Bd, maxP], stream tokens and pages [L, Bd]: one request's as views (the stack copies ~60 KiB a
        # step at 8k tokens)
        if len(states) == 1:
            tables, q_tokens, q_pages = (a[:, None] for a in (states[0].tables, states[0].quant_tokens,
                                                               states[0].quant_pages))
        else:
            tables, q_tokens, q_pages = (np.stack(arrays, axis=1) for arrays in zip(
                *((st.tables, st.quant_tokens, st.quant_pages) for st in states)))
        meta.decode_block_tables, meta.decode_first_key, meta.decode_seq_lens = [], [], []
        # Layers with equal first keys (lengths) share one tensor: decode attention builds its mask once for them.
        # Not with a decode graph: it guards on which inputs alias, and values that coincide in one step and not in
        # the next (a sliding window's first key leaving 0) would recompile it; it builds each mask in the graph.
        shared: dict[object, torch.Tensor] = {}
        share = self.graph is None or self.graph.failed is not None

        def tensor(values: np.ndarray) -> torch.Tensor:
            if not share:  # values may be one array for several layers: each layer gets its own copy
                return torch.from_numpy(values.copy()).to(self.device)
            key = (values.dtype.str, values.tobytes())
            if key not in shared:
                shared[key] = torch.from_numpy(values).to(self.device)
            return shared[key]

        def convert(pages: np.ndarray, first_key: np.ndarray, lens: np.ndarray) -> tuple[torch.Tensor, ...]:
            return torch.from_numpy(pages if share else pages.copy()).to(self.device), tensor(first_key), tensor(lens)

        meta.decode_quant = [None] * len(self.windows)
        # per layer: (pages [Bd, width], first key [Bd], lengths [Bd]) as tensors
        converted: list[tuple[torch.Tensor, ...] | None] = [None] * len(self.windows)
        # Plain layers (no quantized stream, no Quest) with equal lengths and windows differ only in their page
        # tables: their reads are gathered in one numpy pass (per layer this was ~1 ms of a 15 ms step at 30 layers).
        plain: dict[tuple, list[int]] = {}
        quest_from = min((st.quest.dense_layers for st in states if st.quest is not None), default=None)
        if quest_from is None and not q_tokens.any() and (seq_lens == seq_lens[0]).all() \
                and (q_pages == q_pages[0]).all():
            groups = self._window_groups.values()  # the common step: every layer plain, grouped by window alone
        else:
            has_stream = q_tokens.any(axis=1)  # [L]
            for layer, window in enumerate(self.windows):
                quest = window is None and quest_from is not None and layer >= quest_from
                if quest or (window is None and has_stream[layer]):
                    converted[layer] = convert(*self._layer_reads(states, tables, q_tokens, q_pages, seq_lens, layer,
                                                                   quest, meta))
                else:
                    plain.setdefault((window, seq_lens[layer].tobytes(), q_pages[layer].tobytes()), []).append(layer)
            groups = plain.values()
        for layers in groups:
            window, lens, skip = self.windows[layers[0]], seq_lens[layers[0]], q_pages[layers[0]]
            first_page = np.zeros_like(lens) if window is None else np.maximum(lens - window, 0) // bs
            width = int(-(-lens.max() // bs)) if window is None else -(-window // bs) + 1
            span = (first_page + (skip if window is None else 0))[:, None] + np.arange(width)  # [Bd, width]
            limit = (skip if window is None else 0) + -(-lens // bs)
            group_tables = tables if len(layers) == len(tables) else tables[layers]  # all layers: no copy
            pages = self._gather_pages(group_tables, span, limit)  # [len(layers), Bd, width]
            if share:  # one conversion for the group: its layers' tables are views of one tensor (~0.3 ms a step)
                group, first_t, lens_t = convert(pages, first_page * bs, lens)
                for i, layer in enumerate(layers):
                    converted[layer] = (group[i], first_t, lens_t)
            else:
                for i, layer in enumerate(layers):
                    converted[layer] = convert(pages[i], first_page * bs, lens)
        for pages_t, first_t, lens_t in converted:
            meta.decode_block_tables.append(pages_t)
            meta.decode_first_key.append(first_t)
            meta.decode_seq_lens.append(lens_t)

    def _layer_reads(self, states: list[RequestState], tables: np.ndarray, q_tokens: np.ndarray,
                     q_pages: np.ndarray, seq_lens: np.ndarray, layer: int, quest: bool,
                     meta: AttentionMetadata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One full-attention layer with a quantized stream or Quest rows: (pages [Bd, width], first key [Bd],
        tail lengths [Bd]); sets the layer's ``meta.decode_quant`` / ``decode_select``."""
        bs = self.block_size
        lens = seq_lens[layer]
        if q_tokens[layer].any():
            lens = lens - q_tokens[layer]  # the tail: tokens after the stream
            meta.decode_quant[layer] = self._stream_reads(states, tables, q_tokens, q_pages, layer)
        width = int(-(-lens.max() // bs))
        span = q_pages[layer][:, None] + np.arange(width)
        limit = q_pages[layer] + -(-lens // bs)
        if quest:
            meta.decode_select = meta.decode_select or [None] * len(self.windows)
            meta.decode_select[layer], selected = self._page_selects(states, tables[layer], lens, layer)
            limit = np.where(selected, 0, limit)  # those rows read nothing in the dense path
            width = max(1, int(limit.max()))
            span = span[:, :width]
        return self._gather_pages(tables[layer], span, limit), np.zeros_like(lens), lens

    @staticmethod
    def _gather_pages(tables: np.ndarray, span: np.ndarray, limit: np.ndarray) -> np.ndarray:
        """Pool pages [..., Bd, width] at table indices ``span`` [Bd, width] of ``tables`` [..., Bd, maxP] (one
        layer's, or a stack of layers'). Entries from a row's ``limit`` [Bd] on read the null page: the mirror may
        still name pages that were freed and now hold another request's packed (non-float) bytes."""
        start, width = span[:, 0], span.shape[1]
        if width and (start == start[0]).all() and start[0] + width <= tables.shape[-1]:
            # Every row reads the same run of table entries (one request, or requests at equal lengths): a slice
            pages = tables[..., start[0]:start[0] + width]
            if (limit >= start[0] + width).all():
                return np.ascontiguousarray(pages)
            return np.where(span < limit[:, None], pages, 0)
        index = np.broadcast_to(np.minimum(span, tables.shape[-1] - 1), (*tables.shape[:-1], width))
        return np.where(span < limit[:, None], np.take_along_axis(tables, index, axis=-1), 0)

    def _page_selects(self, states: list[RequestState], tables: np.ndarray, lens: np.ndarray,
                      layer: int) -> tuple[list[PageSelect], np.ndarray]:
        """Quest rows of one layer, one PageSelect per policy; returns them and the [Bd] mask of those rows."""
        bs = self.block_size
        selects, selected = [], np.zeros(len(states), dtype=bool)
        for policy in {st.quest for st in states if st.quest is not None and layer >= st.quest.dense_layers}:
            rows = np.asarray([r for r, st in enumerate(states) if st.quest == policy])
            num_pages = -(-lens[rows] // bs)
            width = int(num_pages.max())
            pages = np.where(np.arange(width) < num_pages[:, None], tables[rows, :width], 0)
            selects.append(PageSelect(torch.from_numpy(rows).to(self.device), torch.from_numpy(pages).to(self.device),
                                      torch.from_numpy(lens[rows]).to(self.device),
                                      policy.num_pages_kept(1 << 30), self._bounds()))
            selected[rows] = True
        return selects, selected

    def _stream_reads(self, states: list[RequestState], tables: np.ndarray, q_tokens: np.ndarray,
                      q_pages: np.ndarray, layer: int) -> list[StreamRead]:
        """One read of ``layer`` per record format in the batch: its rows' stream pages (padded with page 0) and
        record counts, and for a MiniCache pair the same rows' read of the partner layer. tables: [L, Bd, maxP];
        q_tokens, q_pages: [L, Bd]."""
        formats = [st.formats[layer] if st.formats is not None else None for st in states]
        reads = []
        for fmt in {f for f, n in zip(formats, q_tokens[layer]) if n and f is not None}:
            rows = np.asarray([r for r, f in enumerate(formats) if f == fmt and q_tokens[layer, r]])
            reads.append(self._decode_read(fmt, rows, states, tables, q_tokens, q_pages, layer))
            if fmt.partner is not None:
                reads[-1].partner = self._decode_read(states[rows[0]].formats[fmt.partner], rows, states, tables,
                                                      q_tokens, q_pages, fmt.partner)
        return reads

    def _decode_read(self, fmt: PageQuantFormat, rows: np.ndarray, states: list[RequestState], tables: np.ndarray,
                     q_tokens: np.ndarray, q_pages: np.ndarray, layer: int) -> StreamRead:
        width = int(q_pages[layer, rows].max())
        pages = np.where(np.arange(width) < q_pages[layer, rows, None], tables[layer, rows, :width], 0)
        records = q_tokens[layer, rows] // fmt.record_tokens
        side = torch.stack([states[r].side[layer] for r in rows]) if fmt.has_side else None
        return StreamRead(fmt, torch.from_numpy(rows).to(self.device),
                          torch.from_numpy(np.ascontiguousarray(pages)).to(self.device),
                          torch.from_numpy(records).to(self.device), int(records.max()), side)

    def _chunk_read(self, state: RequestState, layer: int, with_partner: bool = True) -> StreamRead:
        """A prefill chunk's read of one layer's stream (and of its MiniCache partner's)."""
        fmt = state.formats[layer]
        assert fmt is not None
        pages = torch.from_numpy(state.tables[layer, :state.quant_pages[layer]]).to(self.device)
        read = StreamRead(fmt, None, pages, None, int(state.quant_tokens[layer]) // fmt.record_tokens,
                          state.side.get(layer))
        if fmt.partner is not None and with_partner:
            read.partner = self._chunk_read(state, fmt.partner, with_partner=False)
        return read

    def _chunk_metadata(self, item: ScheduledRequest, start: int) -> ChunkMeta:
        n = len(item.token_ids)
        state = self.states[item.request_id]
        num_pages = int((state.quant_pages + -(-(np.asarray(item.num_cached_tokens) + n - state.quant_tokens)
                                                // self.block_size)).max())
        table = state.tables[:, :num_pages]
        window = 0
        if item.kv_compression:
            # Capture the queries of this chunk's tokens among the prompt's last `window_size` tokens.
            first_wanted = item.compress_at - self.compactor.window_size(item.kv_compression)
            window = max(0, min(n, item.num_computed_tokens + n - first_wanted))
        elif state.recent is not None:  # after compression, for decode-time re-compression
            window = min(n, state.recent.size)
        quant = None
        if state.formats is not None and state.quant_tokens.any():
            quant = [self._chunk_read(state, layer) if q else None for layer, q in enumerate(state.quant_tokens)]
        return ChunkMeta(start=start, end=start + n, num_cached=list(item.num_cached_tokens),
                         block_table=torch.from_numpy(np.ascontiguousarray(table)).to(self.device),
                         capture_window=window, quant=quant)

    # ------------------------------------------------------------------ compression
    @staticmethod
    def _compresses(item: ScheduledRequest) -> bool:
        """This step completes the prompt of a request that compresses its KV."""
        return bool(item.kv_compression) and item.num_computed_tokens + len(item.token_ids) == item.compress_at

    def _compact(self, item: ScheduledRequest):
        state = self.states[item.request_id]
        queries = {layer: torch.cat(parts, dim=1) for layer, parts in state.queries.items()}  # [Hq, W, D]
        state.queries.clear()
        result = self.compactor.compact(item.request_id, item.kv_compression, state.tables, item.compress_at,
                                        queries, state.side)
        state.formats = self.compactor.layer_formats(item.kv_compression)
        self._follow(state, result)
        budgets = decode_budgets(item.kv_compression, len(self.windows), item.compress_at, layer_windows=self.windows)
        if any(budgets):
            state.evict_spec, state.budgets = item.kv_compression, budgets
            size = self.compactor.window_size(item.kv_compression)
            if size:
                state.recent = QueryWindow(size)
                state.recent.push(torch.stack([queries[layer] for layer in range(len(self.windows))]))
        state.quest = self.compactor.selector(item.kv_compression)
        if state.quest is not None:
            self._update_bounds(state, np.zeros(len(self.windows), dtype=np.int64), np.asarray(result.num_kept_tokens))
        return result

    def _keep_queries(self, meta: AttentionMetadata, decodes: list[ScheduledRequest],
                      chunks: list[ScheduledRequest]) -> None:
        """File the queries the layers captured: a prompt's last ones for its compression, a compressed request's
        latest ones for its decode-time re-compression (``QueryWindow``)."""
        captured: dict[int, dict[int, torch.Tensor]] = {}
        for (chunk_index, layer), queries in meta.captured.items():
            state = self.states[chunks[chunk_index].request_id]
            if state.recent is None:
                state.queries.setdefault(layer, []).append(queries)
            else:
                captured.setdefault(chunk_index, {})[layer] = queries
        for chunk_index, layers in captured.items():
            state = self.states[chunks[chunk_index].request_id]
            state.recent.push(torch.stack([layers[layer] for layer in range(len(self.windows))]))
        if meta.decode_capture is not None:
            steps = torch.stack(meta.decode_captured)  # [L, R, Hq, D]
            for i, row in enumerate(meta.decode_capture.tolist()):
                self.states[decodes[row].request_id].recent.push(steps[:, i].unsqueeze(2))

    def _recompact(self, item: ScheduledRequest) -> CompactionResult | None:
        """Decode-time re-compression: layers that reached their trigger are evicted back to their budget."""
        state = self.states[item.request_id]
        num_cached = [n + len(item.token_ids) for n in item.num_cached_tokens]
        if not any(b is not None and n >= b[1] for n, b in zip(num_cached, state.budgets)):
            return None
        queries = state.recent.ordered() if state.recent is not None else {}
        result = self.compactor.recompact(item.request_id, state.evict_spec, state.tables, num_cached,
                                          state.budgets, queries)
        self._follow(state, result)
        return result

    def _update_bounds(self, state: RequestState, before: np.ndarray, after: np.ndarray) -> None:
        """Quest: key bounds of the pages that became full while the layers went from ``before`` to ``after``
        tokens (the newest, partial page is always read, so it needs none)."""
        bs = self.block_size
        pages = [state.tables[layer, before[layer] // bs:after[layer] // bs]
                 for layer, window in enumerate(self.windows) if window is None and layer >= state.quest.dense_layers]
        pages = np.concatenate(pages) if pages else np.zeros(0, dtype=np.int64)
        if not pages.size:
            return
        ids = torch.from_numpy(pages).to(self.device)
        keys = self.kv_pool[ids, 0]  # [n, bs, Hkv, D]
        bounds = self._bounds()
        bounds[ids, 0] = keys.amin(dim=1)
        bounds[ids, 1] = keys.amax(dim=1)

    def _bounds(self) -> torch.Tensor:
        if self.page_bounds is None:
            shape = (self.kv_pool.shape[0], 2, *self.kv_pool.shape[-2:])
            self.page_bounds = torch.zeros(shape, dtype=self.kv_pool.dtype, device=self.device)
        return self.page_bounds

    def _flush(self, item: ScheduledRequest) -> CompactionResult | None:
        """Quantize the full-precision tails that reached a flush unit after this step's tokens were written."""
        state = self.states[item.request_id]
        num_cached = [n + len(item.token_ids) for n in item.num_cached_tokens]
        result = self.compactor.flush(item.request_id, state.formats, state.tables, num_cached, state.quant_tokens,
                                      state.quant_pages, state.quant_bytes, state.side)
        if result is not None:
            self._follow(state, result)
        return result

    def _follow(self, state: RequestState, result: CompactionResult) -> None:
        """The manager truncates full layers' tables to the pages still holding tokens; the mirror follows
        (sliding-window layers keep their tables)."""
        num_pages = state.num_pages.copy()
        state.set_layout(result, self.block_size)
        sliding = np.asarray([w is not None for w in self.windows])
        state.num_pages[sliding] = num_pages[sliding]

    # ------------------------------------------------------------------ outputs
    def _prompt_logprobs(self, item: ScheduledRequest, hidden: torch.Tensor) -> list[PositionLogprobs | None]:
        """Logprobs of prompt tokens ``num_computed + 1 .. `` predicted by this chunk's rows."""
        begin = item.num_computed_tokens
        targets = item.prompt_token_ids[begin + 1:begin + 1 + hidden.shape[0]]
        out: list[PositionLogprobs | None] = [None] if begin == 0 else []
        if targets:
            logits = self.model.compute_logits(hidden[:len(targets)]).cpu()
            target_ids = torch.tensor(targets, dtype=torch.int64)
            out.extend(compute_logprobs(logits, target_ids, [item.sampling_params.prompt_logprobs] * len(targets)))
        return out

    def _sample(self, logits: torch.Tensor, items: list[ScheduledRequest], result: ModelRunnerOutput) -> torch.Tensor:
        """One token per row of ``logits`` [B, V], appended to ``result`` (with its logprobs where asked); returns
        them ([B] int64, CPU)."""
        # Sampling runs on the CPU: [B, V] is small next to a step, and the per-request generators live there.
        logits = logits.cpu()
        params = [it.sampling_params for it in items]
        raw = logits
        penalized = [row for row, p in enumerate(params) if p.needs_penalties]
        if penalized:
            logits = logits.clone()
            apply_penalties(logits, penalized, [params[r] for r in penalized],
                            [items[r].prompt_token_ids for r in penalized], [items[r].output_token_ids for r in penalized])
        if all(p.temperature == 0 for p in params):  # greedy rows only: sample()'s argmax, without its tensors
            token_ids = greedy(logits)
        else:
            tensors = SamplingTensors.from_params(params, logits.shape[1])
            generators = [self.states[it.request_id].generator for it in items]
            token_ids = sample(logits, tensors, generators)
        wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            rows = torch.tensor(wanted)
            entries = compute_logprobs(raw[rows], token_ids[rows], [params[r].logprobs for r in wanted])
            for row, entry in zip(wanted, entries):
                result.logprobs.setdefault(items[row].request_id, []).append(entry)
        for item, token in zip(items, token_ids.tolist()):
            result.sampled_token_ids.setdefault(item.request_id, []).append(token)
            grammar = self.states[item.request_id].grammar
            if grammar is not None:
                grammar.consume(token)
        return token_ids
