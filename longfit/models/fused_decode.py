"""The layers of a Llama-family decode step in one C call (``runtime/csrc/decode_step.c``).

At batch 1 an eager SmolLM2 step spent ~6 ms of its ~16 ms (one core) in the products and the attention (C kernels
already) and most of the rest in the ~20 small torch ops per layer around them: two RMSNorms, RoPE on q and k, the
KV write, dtype casts, SiLU·up and two residual adds, each a few microseconds of dispatch for a few hundred flops.
``FusedDecode`` hands the whole stack of layers to one C function that runs those ops as loops between the same
product and attention kernels, with the same roundings (the eager layers are its reference: tests compare them).

It takes a step when every row is a decode token over plain pages (no prefill chunk, no quantized stream, no Quest
selection, no query capture for compression), the model is bf16 on CPU with every projection packed in the tile
layout (``quant/tiles.py``, no bias), and fewer rows than the products' dequantize threshold. Everything else (and
``LONGFIT_FUSED_DECODE=0``, ``LONGFIT_NATIVE=0``, a traced step) runs the eager layers.
"""

from __future__ import annotations

import os

import torch

from longfit.models.attention import AttentionMetadata
from longfit.quant.linear import Int4Linear, Int8Linear, Linear
from longfit.runtime import native

ENV_VAR = "LONGFIT_FUSED_DECODE"  # "0": decode steps run the eager layers
# decode_step.c's table widths (layer, linear, step), checked against the library's own: 3 + 4 linears of 8; 5
_LAYER_FIELDS, _LINEAR_FIELDS, _STEP_FIELDS = 35, 8, 5


def _linear_fields(layer: Linear) -> list[int] | None:
    """A projection's row of the layer table (kind, codes, d or scales, m, fp16 params, N, K, G), or None."""
    if getattr(layer, "layout", None) != "tiles" or layer.bias is not None:
        return None
    if isinstance(layer, Int4Linear):
        return [4, layer.packed.data_ptr(), layer.d.data_ptr(), layer.m.data_ptr(), int(layer.d.dtype == torch.float16),
                layer.out_features, layer.in_features, layer.group_size]
    if isinstance(layer, Int8Linear):
        return [8, layer.codes.data_ptr(), layer.scales.data_ptr(), 0, 0, layer.out_features, layer.in_features, 0]
    return None


def _int64(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous int64 tensor (itself when it is one)."""
    return t if t.dtype is torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


class FusedDecode:
    """A model's layer table for ``longfit_fused_decode``: built once (``build``), then called per eligible step.

    The table holds the weights' addresses; ``_tensors`` keeps those tensors alive for as long as the table.
    """

    def __init__(self, model, table: torch.Tensor, tensors: list[torch.Tensor], max_rows: int) -> None:
        first = model.layers[0].attn
        self.rope = first.rope
        self.num_heads, self.num_kv_heads, self.head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        self.scale = float(first.scale)
        self.eps = float(model.layers[0].input_norm.eps)
        self.final_norm = model.norm.weight  # [d] fp32
        self.table = table  # [L, 35] int64
        self._tensors = tensors
        self.max_rows = max_rows  # exclusive: from here on a projection dequantizes (eager layers)

    @classmethod
    def build(cls, model) -> FusedDecode | None:
        """The plan for ``model``, or None where the fused step cannot take it (see the module docstring)."""
        if os.environ.get(ENV_VAR, "1").strip() == "0" or not getattr(model, "fused_decode_layers", False):
            return None
        if model.dtype != torch.bfloat16 or model.embed.device.type != "cpu" or not native.enabled():
            return None
        lib = native.library()
        if lib is None or lib.longfit_fused_layout() != _LAYER_FIELDS * 100 + _LINEAR_FIELDS * 10 + _STEP_FIELDS:
            return None
        rows, tensors, max_rows = [], [model.norm.weight], []
        first = model.layers[0]
        if model.norm.eps != first.input_norm.eps or model.norm.out_dtype != torch.bfloat16:
            return None
        for layer in model.layers:
            attn, mlp, norms = layer.attn, layer.mlp, (layer.input_norm, layer.post_attention_norm)
            same = (attn.rope is first.attn.rope and attn.scale == first.attn.scale
                    and all(n.eps == first.input_norm.eps and n.out_dtype == torch.bfloat16 for n in norms))
            if not same or attn.q_norm is not None or mlp.activation != "silu":
                return None
            projections = (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down)
            fields = [_linear_fields(p) for p in projections]
            if any(f is None for f in fields):
                return None
            rows.append([norms[0].weight.data_ptr(), norms[1].weight.data_ptr(), attn.window or 0,
                         *(x for f in fields for x in f)])
            tensors.extend([n.weight for n in norms] + [t for p in projections for t in p.buffers()])
            max_rows.extend(p.dequantize_min_rows for p in projections)
        if first.attn.head_dim > native.PAGED_DECODE_MAX_DIM or first.attn.num_heads > native.PAGED_DECODE_MAX_HEADS:
            return None
        return cls(model, torch.tensor(rows, dtype=torch.int64), tensors, min(max_rows))

    def applies(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether this step is one the fused call takes: decode rows only, over plain full-precision pages."""
        pool = meta.kv_pool
        return (meta.is_plain_decode() and num_tokens < self.max_rows and pool.device.type == "cpu"
                and pool.dtype in (torch.bfloat16, torch.float32) and pool.is_contiguous())

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """h [B, d] fp32 contiguous (the embeddings), updated in place through every layer as the eager layers do;
        positions [B] int64 → the model's output [B, d] bf16 (the final norm of h)."""
        batch = h.shape[0]
        cos, sin = meta.rope_rows(self.rope, positions)  # [B, 1, D] fp32 each
        threads = torch.get_num_threads()
        # The runner's tensors are int64 and contiguous already: checked, not converted (90 conversions cost ~0.1 ms)
        alive = [(_int64(pages), _int64(first), _int64(lens)) for pages, first, lens
                 in zip(meta.decode_block_tables, meta.decode_first_key, meta.decode_seq_lens)]
        steps = torch.tensor([[pages.data_ptr(), pages.shape[1], first.data_ptr(), lens.data_ptr(),
                               native.key_splits(batch, pages.shape[1], threads)]
                              for pages, first, lens in alive], dtype=torch.int64)
        pool = meta.kv_pool
        key_rows = _int64(meta.key_rows)  # [L, B]
        cos, sin = cos.contiguous(), sin.contiguous()
        out = torch.empty(h.shape, dtype=torch.bfloat16)
        status = native.library().longfit_fused_decode(
            h.data_ptr(), batch, h.shape[1], self.table.shape[0], self.table.data_ptr(), steps.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), pool.data_ptr(), int(pool.dtype == torch.bfloat16), meta.block_size,
            self.num_heads, self.num_kv_heads, self.head_dim, key_rows.data_ptr(), self.scale, self.eps, threads,
            self.final_norm.data_ptr(), out.data_ptr())
        if status != 0:
            raise RuntimeError(f"fused decode step refused its inputs (status {status})")
        return out

    def greedy(self, model, head: tuple, tokens: torch.Tensor, tables: torch.Tensor, widths: torch.Tensor,
               key_rows: torch.Tensor, seq_lens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               pool: torch.Tensor, block_size: int, stops: torch.Tensor, due: torch.Tensor,
               max_seconds: float) -> int:
        """Up to S greedy steps of B rows in one C call (``longfit_decode_greedy``): each embeds its tokens, runs
        these layers, the LM head (``head``: what ``model.native_greedy`` returned for B rows) and the argmax.
        tokens [S + 1, B] int64 (row 0 the inputs; step s fills row s + 1); tables [L, B, W]; widths [S] (pages each
        step reads); key_rows [S, L, B]; seq_lens [S, B]; cos, sin [S, B, D] fp32; stops [B, n] (-1 pads) end the
        loop at a step >= due [B], and so does a step that ends past ``max_seconds``. All int64 and contiguous.
        Returns the steps done."""
        codes, scales, rows, row_error, rel, abs_ = head
        num_steps, batch = tokens.shape[0] - 1, tokens.shape[1]
        done = native.library().longfit_decode_greedy(
            num_steps, batch, model.embed.shape[1], self.table.shape[0], self.table.data_ptr(), tables.data_ptr(),
            tables.shape[2], widths.data_ptr(), key_rows.data_ptr(), seq_lens.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), pool.data_ptr(), int(pool.dtype == torch.bfloat16), block_size, self.num_heads,
            self.num_kv_heads, self.head_dim, self.scale, self.eps, torch.get_num_threads(),
            self.final_norm.data_ptr(), model.embed.data_ptr(), codes.data_ptr(), scales.data_ptr(), scales.shape[0],
            None if rows is None else rows.data_ptr(),
            None if row_error is None else row_error.data_ptr(), rel, abs_, stops.data_ptr(),
            stops.shape[1], due.data_ptr(), max_seconds, tokens.data_ptr())
        if done < 1:
            raise RuntimeError(f"greedy decode loop refused its inputs (status {done})")
        return done
