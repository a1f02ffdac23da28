"""Gemma 3 text decoder: sandwich norms (pre and post attention/MLP), QK-norm, GeGLU, embedding scaling,
sliding-window local layers (RoPE base ``rope_local_theta``) interleaved with global layers (``rope_theta``).

Reference: "Gemma 3 Technical Report"; numerics follow Hugging Face's Gemma3 text model (norms scale by
1 + w in fp32; attention scale ``query_pre_attn_scalar ** -0.5``).
"""

from __future__ import annotations

import torch
from torch import nn

from longfit.config import ModelConfig
from longfit.models.attention import Attention, AttentionMetadata
from longfit.models.base import DecoderModel
from longfit.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, WeightSource


class Gemma3DecoderLayer(nn.Module):
    """h += post_norm(attn(pre_norm(h))); h += post_ff_norm(mlp(pre_ff_norm(h)))."""

    def __init__(self, index: int, config: ModelConfig, source: WeightSource, rope: RotaryEmbedding) -> None:
        super().__init__()
        p = f"model.layers.{index}."
        eps = config.rms_norm_eps

        def norm(name: str, prefix: str = p, out_dtype: torch.dtype = source.dtype) -> RMSNorm:
            return RMSNorm(source.tensor(prefix + name, torch.float32), eps, offset=True, out_dtype=out_dtype)

        # Pre-norms feed matmuls (model dtype); post-norms join the fp32 residual stream.
        self.input_norm = norm("input_layernorm.weight")
        self.post_attention_norm = norm("post_attention_layernorm.weight", out_dtype=torch.float32)
        self.pre_feedforward_norm = norm("pre_feedforward_layernorm.weight")
        self.post_feedforward_norm = norm("post_feedforward_layernorm.weight", out_dtype=torch.float32)
        attn = p + "self_attn."
        self.attn = Attention(
            index, source.linear([attn + f"{n}_proj.weight" for n in "qkv"]), source.linear([attn + "o_proj.weight"]),
            config.num_heads, config.num_kv_heads, config.head_dim, config.attention_scale, rope,
            config.layer_window(index), q_norm=norm("q_norm.weight", attn), k_norm=norm("k_norm.weight", attn))
        self.mlp = GatedMLP(source.linear([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                            source.linear([p + "mlp.down_proj.weight"]), config.hidden_act)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """h: [N, d] fp32 residual stream, updated in place (the model owns it) and returned."""
        h.add_(self.post_attention_norm(self.attn(self.input_norm(h), positions, meta)))
        return h.add_(self.post_feedforward_norm(self.mlp(self.pre_feedforward_norm(h))))


class Gemma3ForCausalLM(DecoderModel):
    norm_offset = True

    def __init__(self, config: ModelConfig, source: WeightSource) -> None:
        super().__init__(config, source)
        global_rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, config.max_model_len)
        local_rope = RotaryEmbedding(config.head_dim, config.rope_local_theta or 10000.0, None, config.max_model_len)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(i, config, source, local_rope if config.layer_types[i] == "sliding" else global_rope)
            for i in range(config.num_layers))
