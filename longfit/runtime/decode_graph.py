"""Decode steps as one compiled graph (``RuntimeConfig.compile``): the eager step's per-op overhead removed.

A batch-1 decode step of SmolLM2-135M runs ~2,000 eager ops; at a few µs of dispatch each that costs about as much
as its int4 matmuls. ``torch.compile`` (inductor) traces the model's own ``DecoderModel.forward`` for a *plain*
decode step (every row decodes one token over full-precision pages: no prefill chunk, quantized stream, Quest
selection or query capture; on CPU without the C decode-attention kernel, pages that fit one attention chunk) into
one graph: the norms, RoPE, residual adds, cache writes,
masks and softmax fuse into a few C++ loops, and the matmul and attention kernels run with no Python between them.
Other steps run eager, and so does every step once compiling failed (no C++ compiler, an op inductor cannot lower).

Shapes are symbolic (rows, pages); size 1 is special-cased as little as torch allows (``backed_size_oblivious``)
and equal sizes get no shared symbol (``use_duck_shape=False``). torch still specializes one row in a few lowerings,
so there are two graphs, batch 1 and batch 2 up: the engine compiles both at start-up with warm-up requests
(``LLMEngine._compile_decode_step``), and they serve every plain step after that, every depth of the plain path
included, until a guard on a size changes branch (a packed layer's many-row path: from 64 rows in torch's layout,
160 (int8) / 512 (int4) in the tile layout): ``torch._dynamo`` recompiles then. Guards on the model itself are
dropped (its modules and buffers never change after loading; checking ~400 of them cost ~1 ms a step), those on
the step's inputs are kept; inputs must not alias in one step and not in the next (the runner stops sharing equal
per-layer tensors when a graph is on).
Compiling SmolLM2's 30 layers takes minutes of CPU (docs/PERFORMANCE.md); inductor's on-disk cache shortens
later starts. The compiled step computes what the eager step does up to floating-point reassociation (the tests
compare them).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.fx.experimental._config as fx_config

from longfit.models.attention import AttentionMetadata
from longfit.models.base import DecoderModel
from longfit.models.paged_decode import DECODE_CHUNK_TOKENS
from longfit.quant.linear import DenseLinear
from longfit.runtime import native

logger = logging.getLogger(__name__)


def _input_guards(entries: list) -> list[bool]:
    """Keep the guards on the step's inputs and on globals; drop those on the model (``self``)."""
    return [not (entry.name or "").startswith("self") for entry in entries]


def unsupported_reason(model: DecoderModel) -> str | None:
    """Why ``model`` cannot be compiled here, or None. oneDNN-prepacked bf16 layers (``DenseLinear.prepack``) are
    opaque tensors inductor does not lower; ``LONGFIT_PREPACK=0`` keeps plain weights (slower eager products)."""
    if any(isinstance(m, DenseLinear) and m.packed is not None for n, m in model.named_modules() if n != "lm_head"):
        return "prepacked bf16 layers cannot be compiled (use --weights auto/int8/int4, or LONGFIT_PREPACK=0)"
    return None


class DecodeGraph:
    """The compiled forward of plain decode steps for one model, compiled on the first such step."""

    def __init__(self, model: DecoderModel) -> None:
        self.model = model
        self.ropes = list({id(layer.attn.rope): layer.attn.rope for layer in model.layers}.values())
        self.failed: str | None = unsupported_reason(model)  # why steps run eager, None while compiling works
        if self.failed:
            logger.warning("compiled decode steps disabled: %s", self.failed)
        # The C decode-attention kernel as one op of the graph: then a step of any depth is compiled; without it,
        # steps deeper than one attention chunk run eager (the chunked torch attention was slower compiled).
        self.native_attention = native.library() is not None and native.enabled()
        native.IN_GRAPH = self.native_attention
        self.compiled_steps = 0  # steps run through the graph
        self.compile_seconds = 0.0  # time of the calls that compiled (the first one, recompilations)
        self._compiled = None

    def eligible(self, meta: AttentionMetadata) -> bool:
        """Whether this step is a plain decode step the graph holds: decode rows only, full-precision pages, and
        (on CPU without the C kernel) few enough pages for one attention chunk: deeper steps then run the eager
        chunked attention (measured faster there)."""
        if self.failed is not None or not meta.is_plain_decode():
            return False
        if meta.kv_pool.device.type == "cpu" and not self.native_attention:
            widest = max(table.shape[1] for table in meta.decode_block_tables)
            return meta.num_decode * widest * meta.block_size <= DECODE_CHUNK_TOKENS
        return True

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [B] → hidden [B, d] (model dtype), as ``model(input_ids, positions, meta)``."""
        # What the eager step computes lazily with data-dependent Python (RoPE table growth, id-keyed caches) is done
        # here, outside the graph: this step's RoPE rows; each layer builds its own mask inside the graph.
        for rope in self.ropes:
            cos, sin = rope.cos_sin(positions)  # [B, 1, D]
            for table in (cos, sin):  # sizes are symbolic and may be 1 (see above): a broadcast dim must stay 1
                torch._dynamo.mark_static(table, 1)
            meta.rope_cache[id(rope)] = cos, sin
        meta.decode_masks = None
        if self._compiled is None:
            for dim in range(1, meta.kv_pool.dim()):  # the runner's one pool: only its page count varies (Hkv may be 1)
                torch._dynamo.mark_static(meta.kv_pool, dim)
            self._compiled = torch.compile(self.model.forward, dynamic=True,
                                           options={"guard_filter_fn": _input_guards})
        started = time.perf_counter()
        try:
            with fx_config.patch(backed_size_oblivious=True, use_duck_shape=False):
                hidden = self._compiled(input_ids, positions, meta)
        except Exception as error:  # noqa: BLE001 - whatever the compiler raised: run eager from now on
            self.failed = f"{type(error).__name__}: {error}"
            logger.warning("compiling the decode step failed; steps run eager: %s", self.failed[:2000])
            meta.decode_masks = {}
            return self.model(input_ids, positions, meta)
        elapsed = time.perf_counter() - started
        if elapsed > 1.0:  # a (re)compilation: steps themselves take milliseconds
            self.compile_seconds += elapsed
            logger.info("compiled the decode step in %.1f s", elapsed)
        self.compiled_steps += 1
        return hidden
