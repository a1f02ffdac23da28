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
        self.embed = source.tensor("model.embed_tokens.weight")  # [V, d]
        self.norm = RMSNorm(source.tensor("model.norm.weight", torch.float32), config.rms_norm_eps, self.norm_offset)
        head = "model.embed_tokens.weight" if config.tie_word_embeddings or not source.has("lm_head.weight") \
            else "lm_head.weight"
        self.lm_head = source.linear([head])
        self.layers = nn.ModuleList()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [N] int64 → hidden states [N, d] after the final norm."""
        h = self.embed[input_ids]  # [N, d]
        if self.config.embedding_multiplier != 1.0:
            # Gemma multiplies by sqrt(d) rounded to the activation dtype, as the reference does.
            h = h * torch.tensor(self.config.embedding_multiplier, dtype=h.dtype)
        for layer in self.layers:
            h = layer(h, positions, meta)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [M, d] → logits [M, V] fp32."""
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
