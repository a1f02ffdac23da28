"""DecoderModel: embedding → decoder layers → final norm → LM head, shared by every architecture.

An architecture file only says how to build one layer from the checkpoint; the step's flat batch
(``input_ids``/``positions`` [N]) and the attention metadata flow through unchanged.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from longfit.config import ModelConfig
from longfit.models.attention import AttentionMetadata
from longfit.models.fused_decode import FusedDecode
from longfit.models.layers import RMSNorm, WeightSource
from longfit.quant import matmul
from longfit.quant.linear import DenseLinear, Int8Linear
from longfit.runtime import native

# bf16 has 8 significant bits: a product or a sum rounded to it moves by at most 2^-9 of its magnitude.
_BF16_REL = 2.0**-9
# The tile kernels' activation split (qlinear.c): each input is within max|x| / 64516 of what they multiply.
_ACT_SPLIT_STEPS = 127 * 508
# compute_logits' margin for the head's output rounding: |top logit| · _LEAD_REL + _LEAD_ABS, several bf16 steps.
_LEAD_REL, _LEAD_ABS = 2.0**-6, 0.05
# From this many rows on, a tied int8 LM head is computed as one bf16 matmul over the embedding table instead:
# the int8 kernel's time grows about linearly with rows (measured, 49152x576, 1-2 threads: torch's int8 kernel
# faster up to 4 rows, even at 6-8, 2x slower at 16; the tile kernel with 8-bit activations (AVX512-VNNI), against
# the matmul, 1 thread (scripts/bench_qlinear.py --rows 16,32,48,64,96): 6.9 vs 12.3 ms at 16 rows, 23.5 vs 25.4 at
# 64, 31.6 vs 33.2 at 96; the two cross between 64 and ~128 rows from run to run).
PACKED_HEAD_MAX_ROWS = 8
TILED_HEAD_MAX_ROWS = 64


class DecoderModel(nn.Module):
    """Base of the causal LMs. Subclasses fill ``self.layers`` with modules ``layer(h, positions, meta)``."""

    norm_offset = False  # Gemma norms scale by (1 + w)
    fused_decode_layers = False  # the layers are Llama's: a decode step may run them in C (models/fused_decode.py)

    def __init__(self, config: ModelConfig, source: WeightSource) -> None:
        super().__init__()
        self.config = config
        self.dtype = source.dtype
        self.norm = RMSNorm(source.tensor("model.norm.weight", torch.float32), config.rms_norm_eps, self.norm_offset,
                            out_dtype=source.dtype)
        tied = config.tie_word_embeddings or not source.has("lm_head.weight")
        self.lm_head = source.linear(["model.embed_tokens.weight" if tied else "lm_head.weight"])
        head = self.lm_head
        exact_dense = isinstance(head, DenseLinear) and head.fallback_reason is None
        if tied and exact_dense and head.weight.dtype == source.dtype:
            embed = head.weight  # the same dequantized [V, d] table: share it instead of holding it twice
        else:
            embed = source.tensor("model.embed_tokens.weight")
        self.register_buffer("embed", embed, persistent=False)  # [V, d] model dtype
        self._init_exact_rows(tied)
        self.layers = nn.ModuleList()
        self._fused: FusedDecode | None | bool = False  # False: not built yet (on the first eager step)

    def _init_exact_rows(self, tied: bool) -> None:
        """Which [V, d] rows ``compute_logits`` rescores the leading candidates with (``exact_rows``), and how far
        the fast head's weights may be from them (``head_row_error`` [V] fp32: max |w_head - w_rows| per row).

        bf16 dense head: its own weight (the matmul only rounds its output). int8 head tied to the embeddings:
        the bf16 embedding rows, i.e. the checkpoint's weights as the bf16 path uses them. Others: none.
        """
        head = self.lm_head
        self._exact_rows_name: str | None = None  # a buffer name, so that it follows .to(device)
        self.head_row_error: torch.Tensor | None
        self.register_buffer("head_row_error", None, persistent=False)
        if isinstance(head, DenseLinear):
            if head.weight.dtype != torch.float32:
                self._exact_rows_name = "lm_head.weight"
        elif isinstance(head, Int8Linear) and tied and head.bias is None:
            self._exact_rows_name = "embed"
            # RTN: |code·s - w| ≤ s/2; the bf16 rows differ from w by ≤ 2^-9·|w| ≤ 2^-9·127·s.
            self.head_row_error = head.scales.float() * (0.5 + 127 * _BF16_REL)
            if head.layout == "tiles":
                # The tile kernel splits x into 8-bit integers, |x_k - x̂_k| ≤ max|x| / 64516 ≤ Σ|x| / 64516
                # (runtime/csrc/qlinear.c), which moves logit n by ≤ s_n·Σ_k|code[n, k]|·Σ|x| / 64516 more.
                self.head_row_error += head.scales.float() * head.code_abs_sums() / _ACT_SPLIT_STEPS

    @property
    def exact_rows(self) -> torch.Tensor | None:
        """[V, d] rows the leading logits are recomputed from, or None."""
        # attrgetter: the same lookup as get_buffer, without its checks (~20 us of a batch-1 step)
        return None if self._exact_rows_name is None else operator.attrgetter(self._exact_rows_name)(self)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [N] int64 → hidden states [N, d] (model dtype) after the final norm.

        The residual stream between layers is fp32 whatever the model dtype; the layers update it in place
        (``h`` below is always a fresh tensor: the gather makes a copy).
        """
        h = F.embedding(input_ids, self.embed)  # [N, d], a fresh copy
        if self.config.embedding_multiplier != 1.0:
            # Gemma multiplies by sqrt(d) rounded to the activation dtype, as the reference does.
            h = h * torch.tensor(self.config.embedding_multiplier, dtype=h.dtype)
        h = h.float()
        fused = None if torch.compiler.is_compiling() else self.fused_decode()
        if fused is not None and fused.applies(meta, h.shape[0]):
            return fused(h, positions, meta)  # every layer and the final norm in one call
        for layer in self.layers:
            h = layer(h, positions, meta)
        return self.norm(h)

    def fused_decode(self) -> FusedDecode | None:
        """The one-call decode step of these layers (built on first use), or None where it cannot take them."""
        if self._fused is False:
            self._fused = FusedDecode.build(self)
        return self._fused

    def native_greedy(self, batch: int) -> tuple | None:
        """(codes, scales, exact rows or None, row_error or None, rel, abs) where a greedy token of ``batch`` rows
        can be taken in C as this model takes it: the embedding row as it is (bf16, no multiplier), and
        ``compute_logits`` without a bias being the int8 tile kernel rounded to bf16, then (with exact rows)
        ``native.head_leaders`` with margin ``|top| · rel + abs``, then the first argmax (``FusedDecode.greedy``
        repeats these). None otherwise."""
        head, rows = self.lm_head, self.exact_rows
        if (not isinstance(head, Int8Linear) or getattr(head, "layout", None) != "tiles" or head.bias is not None
                or (rows is not None and (rows.dtype != torch.bfloat16 or not rows.is_contiguous()))
                or batch >= min(TILED_HEAD_MAX_ROWS, head.dequantize_min_rows)
                or self.config.final_logit_softcapping or self.config.embedding_multiplier != 1.0
                or self.embed.dtype != torch.bfloat16 or not self.embed.is_contiguous() or native.library() is None):
            return None
        return head.codes, head.scales, rows, self.head_row_error, _LEAD_REL, _LEAD_ABS

    def compute_logits(self, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [M, d] → logits [M, V] fp32; ``bias`` (fp32 [M, V]: a request's logit_bias, -inf for the tokens
        a structured request's grammar forbids) is added first, so the leading candidates rescored below are the
        best ones as biased.

        A bf16 matmul rounds its output to bf16 (steps of 0.125 at |logit| ≈ 20), enough to swap the top two
        tokens at ~2% of positions; an int8 head (requantized per channel) moves logits by up to ~0.5. The
        leading candidates of each row (every token the head's error could rank first) are therefore recomputed
        in fp32 from ``exact_rows``: top-1, top-k and sampling see accurate leaders at a tiny cost. From
        ``PACKED_HEAD_MAX_ROWS`` rows on (``TILED_HEAD_MAX_ROWS`` for the tile layout), a tied int8 head is replaced
        by a bf16 matmul over the embedding table.
        """
        rows_weight = self.exact_rows
        row_error = self.head_row_error
        max_rows = TILED_HEAD_MAX_ROWS if getattr(self.lm_head, "layout", None) == "tiles" else PACKED_HEAD_MAX_ROWS
        if row_error is not None and hidden.shape[0] >= max_rows:
            # The packed kernels cost grows with every row (no reuse of the weights across rows): from a few rows
            # on, one bf16 matmul over the embedding table (the exact weights, held anyway) is faster.
            logits = matmul.linear(hidden, rows_weight).float()
            row_error = None
        else:
            logits = self.lm_head(hidden).float()
        if bias is not None:
            logits.add_(bias)
        head_bias = getattr(self.lm_head, "bias", None)
        if rows_weight is not None and hidden.dtype != torch.float32:
            if (bias is None and head_bias is None and logits.device.type == "cpu" and hidden.dtype == torch.bfloat16
                    and rows_weight.dtype == torch.bfloat16 and rows_weight.is_contiguous() and logits.is_contiguous()
                    and native.library() is not None):
                # The same rule in one C call (~0.03 ms where the torch ops take ~0.3-0.4 at batch 1)
                native.head_leaders(logits, hidden.contiguous(), rows_weight, row_error, _LEAD_REL, _LEAD_ABS)
            else:
                rescore_leaders(logits, hidden, rows_weight, row_error, bias, head_bias)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
            if bias is not None:  # tanh maps -inf to -cap: forbidden tokens masked again
                logits.masked_fill_(torch.isneginf(bias), float("-inf"))
        return logits


def rescore_leaders(logits: torch.Tensor, hidden: torch.Tensor, rows_weight: torch.Tensor,
                    row_error: torch.Tensor | None, bias: torch.Tensor | None = None,
                    head_bias: torch.Tensor | None = None) -> None:
    """``compute_logits``' leader rescoring in torch (``native.head_leaders`` is the same rule in C, without
    ``bias`` and ``head_bias``): logits [M, V] fp32, biased already, are rescored in place from hidden [M, d] and the
    exact rows [V, d]; row_error [V] fp32 bounds the fast head's weights' distance from them (None: the same
    weights)."""
    top = logits.amax(dim=-1, keepdim=True)  # [M, 1]
    rounding = top.abs() * _LEAD_REL + _LEAD_ABS  # several bf16 output steps at that magnitude
    if row_error is None:  # same weights: only the output rounding separates the two
        leaders = logits >= top - rounding
    else:
        # Row n's fast logit is within err[n] = row_error[n]·Σ|x| (+ rounding) of its exact one, a bound,
        # not an estimate: every row whose upper end reaches the best lower end may be the leader.
        err = torch.outer(hidden.float().abs().sum(-1), row_error).add_(rounding)  # [M, V]
        best_lower = (logits - err).amax(dim=-1, keepdim=True)
        leaders = err.add_(logits) >= best_lower  # upper ends, in place: one [M, V] temporary less
    rows, cols = leaders.nonzero(as_tuple=True)
    exact = (hidden[rows].float() * rows_weight[cols].float()).sum(-1)
    if head_bias is not None:
        exact += head_bias[cols].float()
    if bias is not None:
        exact += bias[rows, cols]
    logits[rows, cols] = exact
