"""Llama-family decoder (SmolLM2, Llama 2/3, Mistral, Qwen2 with QKV bias): pre-norm, GQA, RoPE, SwiGLU."""

from __future__ import annotations

import torch
from torch import nn

from longfit.config import ModelConfig
from longfit.models.attention import Attention, AttentionMetadata
from longfit.models.base import DecoderModel
from longfit.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, WeightSource


class LlamaDecoderLayer(nn.Module):
    """h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, index: int, config: ModelConfig, source: WeightSource, rope: RotaryEmbedding) -> None:
        super().__init__()
        p = f"model.layers.{index}."
        eps = config.rms_norm_eps
        # NOTE: the residual stream stays fp32; norms hand the matmuls their dtype (bf16 residuals cost
        # ~2% top-1 agreement on SmolLM2).
        self.input_norm = RMSNorm(source.tensor(p + "input_layernorm.weight"), eps, out_dtype=source.dtype)
        self.post_attention_norm = RMSNorm(source.tensor(p + "post_attention_layernorm.weight"), eps,
                                           out_dtype=source.dtype)
        attn = p + "self_attn."
        bias = [attn + f"{n}_proj.bias" for n in "qkv"] if config.attention_bias else None
        self.attn = Attention(
            index, source.linear([attn + f"{n}_proj.weight" for n in "qkv"], bias),
            source.linear([attn + "o_proj.weight"]), config.num_heads, config.num_kv_heads, config.head_dim,
            config.attention_scale, rope, config.layer_window(index))
        self.mlp = GatedMLP(source.linear([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                            source.linear([p + "mlp.down_proj.weight"]), config.hidden_act)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """h: [N, d] fp32 residual stream, updated in place (the model owns it) and returned."""
        # add_ of a bf16 branch into the fp32 stream promotes exactly: the sum is fp32 with no cast op.
        h.add_(self.attn(self.input_norm(h), positions, meta))
        return h.add_(self.mlp(self.post_attention_norm(h)))


class LlamaForCausalLM(DecoderModel):
    fused_decode_layers = True
    def __init__(self, config: ModelConfig, source: WeightSource) -> None:
        super().__init__(config, source)
        rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, config.max_model_len)
        self.layers = nn.ModuleList(LlamaDecoderLayer(i, config, source, rope) for i in range(config.num_layers))
