"""Multi-step decoding: up to ``SchedulerOutput.num_steps`` decode steps of a batch in one call from the engine.

vLLM's multi-step scheduling, for the same reason: with the layers in one C call (``models/fused_decode.py``), a
batch-1 SmolLM2 step computes in ~5 ms on one core, and the engine around it (scheduling, the runner's inputs and
page metadata, output processing) added ~0.9 ms of Python per token (docs/PERFORMANCE.md). When every scheduled
row decodes over plain pages, the scheduler reserves pages for ``num_steps`` tokens per request and the runner
feeds each sampled token straight back: per step only the model, the LM head and the sampler run, on inputs built
once for all the steps ([num_steps, B] positions, key slots, lengths and RoPE rows). Where the rows are greedy
without logprobs and the model's layers and int8 LM head have C kernels (``FusedDecode.greedy``,
``DecoderModel.native_greedy``), the whole loop is one C call (``longfit_decode_greedy``): embedding, layers, head,
leader rescoring and argmax per step with no Python between tokens. Each step computes exactly what a single step
would (same metadata, same kernels, same roundings, the seeded generators advanced once per token): tests compare.

The loop ends early, after the step that produced it, when any row samples one of its stop tokens (EOS unless
``ignore_eos``, ``stop_token_ids``, once ``min_tokens`` is reached), and after the step that takes it past
``MAX_BURST_S``: a stream then never waits much longer than that for its next tokens (at 16 rows with prompt chunks
around, a SmolLM2 step takes ~50 ms on one core, and four steps held tokens back for ~220 ms with no throughput to
show for it; at batch 1 four steps take ~20 ms). Every row returns the same number of tokens. Requests whose stop
needs text (stop strings) or whose next logits depend on the output so far (penalties, logit bias, grammars) are
never given more than one step by the scheduler; rows this module does not take (quantized or Quest pages,
decode-time eviction, sliding windows, a compiled graph) run one ordinary step.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from longfit.models.attention import AttentionMetadata
from longfit.outputs import ModelRunnerOutput, ScheduledRequest

MAX_BURST_S = 0.05  # no step starts after a loop has run this long


def applies(runner, items: list[ScheduledRequest]) -> bool:
    """Whether ``runner`` (a ``ModelRunner``) may loop over these decode rows: plain pages whose layers all hold
    the same number of keys, no sliding window, no compiled graph, nothing read or written between tokens. (The
    scheduler gave the step several steps only for requests whose sampling needs nothing between tokens.)"""
    if any(window is not None for window in runner.windows) or (runner.graph is not None
                                                               and runner.graph.failed is None):
        return False
    for item in items:
        state = runner.states[item.request_id]
        if (state.formats is not None or state.quest is not None or state.budgets is not None
                or state.recent is not None or state.grammar is not None
                or min(item.num_cached_tokens) != max(item.num_cached_tokens)):
            return False
    return True


def run(runner, items: list[ScheduledRequest], num_steps: int, result: ModelRunnerOutput) -> None:
    """Up to ``num_steps`` decode steps of ``items`` (one token each, ``applies`` holds); the sampled tokens (and
    logprobs) go to ``result`` in order, the same count for every row."""
    device, bs, num_layers = runner.device, runner.block_size, len(runner.windows)
    batch = len(items)
    states = [runner.states[it.request_id] for it in items]
    before = np.asarray([it.num_cached_tokens[0] for it in items])  # [B] keys before the first step's
    ahead = np.arange(num_steps)[:, None]  # [S, 1]
    slots = before[None] + ahead  # [S, B]: each step's new key
    width_all = int(-(-(slots[-1].max() + 1) // bs))
    tables = np.stack([st.tables[:, :width_all] for st in states], axis=1)  # [L, B, W]
    # [S, L, B] rows of each step's key in the pool viewed as [-1, Hkv, D] (its value bs rows later)
    key_rows = tables[:, np.arange(batch)[None], slots // bs] * (2 * bs) + slots % bs  # [L, S, B]
    key_rows = torch.from_numpy(np.ascontiguousarray(key_rows.transpose(1, 0, 2))).to(device)
    seq_lens = torch.from_numpy(slots + 1).to(device)  # [S, B] keys including the new one
    positions = torch.from_numpy(np.asarray([it.num_computed_tokens for it in items])[None] + ahead).to(device)
    # Each step's RoPE rows gathered at once ([S, B, 1, D] fp32 each) into its metadata's cache, where every layer
    # shares one table (Llama); otherwise each step gathers its own
    rope = runner.model.layers[0].attn.rope
    shared = all(layer.attn.rope is rope for layer in runner.model.layers)
    cos, sin = rope.cos_sin(positions) if shared else (None, None)
    widths = (-(-(slots.max(axis=1) + 1) // bs)).tolist()  # [S]: pages each step reads
    tables_t = torch.from_numpy(tables).to(device)
    first_key = [torch.zeros(batch, dtype=torch.int64, device=device)] * num_layers
    stops = [it.stop_ids for it in items]
    due = [it.sampling_params.min_tokens - len(it.output_token_ids) for it in items]  # a stop counts from this step
    tokens = torch.tensor([it.token_ids[0] for it in items], dtype=torch.int64, device=device)

    def metadata(step: int, block_tables: list[torch.Tensor]) -> AttentionMetadata:
        meta = AttentionMetadata(kv_pool=runner.kv_pool, block_size=bs, key_rows=key_rows[step], num_decode=batch,
                                 decode_block_tables=block_tables, decode_first_key=first_key,
                                 decode_seq_lens=[seq_lens[step]] * num_layers, decode_quant=[None] * num_layers)
        if cos is not None:
            meta.rope_cache[id(rope)] = (cos[step], sin[step])
        return meta

    width, block_tables = 0, []
    started = time.perf_counter()
    for step in range(num_steps):
        if widths[step] != width:  # the pages a step reads: as the runner's own step, one [L, B, width] tensor
            width = widths[step]
            block_tables = list(tables_t[:, :, :width].contiguous().unbind(0))
        meta = metadata(step, block_tables)
        head = _greedy_head(runner, items, meta) if step == 0 and cos is not None else None
        if head is not None:
            _run_greedy(runner, items, head, tokens, tables_t, widths, key_rows, seq_lens, cos, sin, stops, due,
                        result)
            return
        hidden = runner.model(tokens, positions[step], meta)  # [B, d]
        tokens = runner._sample(runner.model.compute_logits(hidden), items, result)
        sampled = tokens.tolist()
        if any(token in stop and step + 1 >= first for token, stop, first in zip(sampled, stops, due)) \
                or time.perf_counter() - started > MAX_BURST_S:
            break
        tokens = tokens.to(device)


def _greedy_head(runner, items: list[ScheduledRequest], meta: AttentionMetadata) -> tuple | None:
    """``DecoderModel.native_greedy``'s head where the whole loop can run in C (``FusedDecode.greedy``): greedy rows
    without logprobs, the fused layers taking this step, a head it takes. None otherwise."""
    plan = runner.model.fused_decode()
    if plan is None or not plan.applies(meta, len(items)) or not all(
            it.sampling_params.temperature == 0 and it.sampling_params.logprobs is None for it in items):
        return None
    return runner.model.native_greedy(len(items))


def _run_greedy(runner, items: list[ScheduledRequest], head: tuple, tokens: torch.Tensor, tables: torch.Tensor,
                widths: list[int], key_rows: torch.Tensor, seq_lens: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, stops: list[frozenset[int]], due: list[int], result: ModelRunnerOutput) -> None:
    """The loop in one C call: the same steps as ``run``'s, with no Python between tokens."""
    num_steps, batch = seq_lens.shape
    out = torch.empty(num_steps + 1, batch, dtype=torch.int64)  # row 0 the inputs, then each step's tokens
    out[0] = tokens
    width = max(1, max(len(stop) for stop in stops))
    stop_ids = torch.tensor([sorted(stop) + [-1] * (width - len(stop)) for stop in stops], dtype=torch.int64)
    done = runner.model.fused_decode().greedy(
        runner.model, head, out, tables, torch.tensor(widths, dtype=torch.int64), key_rows, seq_lens,
        cos.reshape(num_steps, batch, -1).contiguous(), sin.reshape(num_steps, batch, -1).contiguous(),
        runner.kv_pool, runner.block_size, stop_ids, torch.tensor(due, dtype=torch.int64), MAX_BURST_S)
    for row, item in enumerate(items):
        result.sampled_token_ids.setdefault(item.request_id, []).extend(out[1:done + 1, row].tolist())
