"""DecoderModel: embedding → decoder layers → final norm → LM head, shared by every architecture.

An architecture file only says how to build one layer from the checkpoint; the step's flat batch
(``input_ids``/``positions`` [N]) and the attention metadata flow through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from longfit.config import ModelConfig
from longfit.models.attention import AttentionMetadata
from longfit.models.layers import RMSNorm, WeightSource


class DecoderModel(nn.Module):
    """Base of the causal LMs. Subclasses fill ``self.layers`` with modules ``layer(h, positions, meta)``."""

    norm_offset = False  # Gemma norms scale by (1 + w)

    def __init__(self, config: ModelConfig, source: WeightSource) -> None:
        super().__init__()
        self.config = config
        self.dtype = source.dtype
        self.register_buffer("embed", source.tensor("model.embed_tokens.weight"), persistent=False)  # [V, d]
        self.norm = RMSNorm(source.tensor("model.norm.weight", torch.float32), config.rms_norm_eps, self.norm_offset,
                            out_dtype=source.dtype)
        head = "model.embed_tokens.weight" if config.tie_word_embeddings or not source.has("lm_head.weight") \
            else "lm_head.weight"
        self.lm_head = source.linear([head])
        self.layers = nn.ModuleList()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [N] int64 → hidden states [N, d] (model dtype) after the final norm.

        The residual stream between layers is fp32 whatever the model dtype.
        """
        h = self.embed[input_ids]  # [N, d]
        if self.config.embedding_multiplier != 1.0:
            # Gemma multiplies by sqrt(d) rounded to the activation dtype, as the reference does.
            h = h * torch.tensor(self.config.embedding_multiplier, dtype=h.dtype)
        h = h.float()
        for layer in self.layers:
            h = layer(h, positions, meta)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [M, d] → logits [M, V] fp32.

        A bf16 matmul rounds its output to bf16 (steps of 0.125 at |logit| ≈ 20), enough to swap the top two
        tokens at ~2% of positions. The leading candidates of each row are therefore recomputed exactly in
        fp32 from the same weights: top-1, top-k and sampling see fp32-accurate leaders at a tiny cost.
        """
        logits = self.lm_head(hidden).float()
        weight = getattr(self.lm_head, "weight", None)
        if weight is not None and weight.dtype != torch.float32 and hidden.dtype != torch.float32:
            top = logits.max(dim=-1, keepdim=True).values
            margin = top.abs() * 2.0**-6 + 0.05  # several bf16 rounding steps at that magnitude
            rows, cols = (logits >= top - margin).nonzero(as_tuple=True)
            exact = (hidden[rows].float() * weight[cols].float()).sum(-1)
            bias = getattr(self.lm_head, "bias", None)
            logits[rows, cols] = exact + (bias[cols].float() if bias is not None else 0.0)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
