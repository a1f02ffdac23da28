"""Shared decoder layers: RMSNorm, rotary embeddings, gated MLPs, and weight helpers.

Activations are ``[N, hidden]`` with N the flattened tokens of every request in the step (no batch dim).
Norm statistics, RoPE angles and softmax run in fp32 whatever the activation dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longfit.config import ModelConfig, RopeScaling
from longfit.models.weights import DEQUANT_BLOCK_ROWS, RawWeight
from longfit.quant.linear import Linear, build_linear, dequantized
from longfit.runtime.host_memory import LOADING_SLACK, release_free_heap


class RMSNorm(nn.Module):
    """y = x / rms(x) · w (Llama) or · (1 + w) (Gemma, ``offset=True``), computed in fp32.

    x: [..., dim] (the fp32 residual stream or activations); returns ``out_dtype`` (the matmul dtype for
    pre-norms, fp32 for norms whose output joins the residual).
    """

    def __init__(self, weight: torch.Tensor, eps: float, offset: bool = False,
                 out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight.float() + 1.0 if offset else weight.float(), persistent=False)
        self.normalized_shape = (self.weight.shape[0],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused call (mean of squares, rsqrt, both products) instead of seven eager ops: a decode step
        # runs 61+ norms on [B, 576] rows, where each eager op costs more than its arithmetic.
        return F.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps).to(self.out_dtype)


def _inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim / 2] fp64 inverse frequencies, with linear or Llama-3 scaling applied."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    # Llama 3: keep high frequencies, divide low ones by factor, interpolate smoothly in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(mid, (1 - smooth) * inv / scaling.factor + smooth * inv, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (Hugging Face layout) with a cos/sin table grown on demand.

    ``cos_sin(positions[N])`` runs once per step and rope (the attention caches it for every layer);
    ``apply(x[N, H, D], cos, sin) -> [N, H, D]`` in x's dtype, computed in fp32.
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None, max_positions: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.inv_freq = _inverse_frequencies(head_dim, theta, scaling)
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)
        self._grow(min(max_positions, 4096))

    def _grow(self, size: int) -> None:
        positions = torch.arange(size, dtype=torch.float64)
        angles = torch.outer(positions, self.inv_freq)  # [size, D/2]
        device = self.cos.device if self.cos.numel() else torch.device("cpu")
        cos, sin = angles.cos().float(), angles.sin().float()
        # Full-width rows so that apply() is x·cos + swap_halves(x)·sin with no per-layer concatenation:
        # cos = [cos, cos], sin = [-sin, sin]  ([size, D] fp32 each).
        self.cos = torch.cat((cos, cos), dim=-1).to(device)
        self.sin = torch.cat((-sin, sin), dim=-1).to(device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [N, 1, D] fp32 for ``positions`` [N], in the full-width layout ``apply`` takes."""
        if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            self._grow(max(int(positions.max()) + 1, 2 * self.cos.shape[0]))
        if self.cos.device != positions.device:  # tables follow the inputs (CUDA when the runner is on it)
            self.cos, self.sin = self.cos.to(positions.device), self.sin.to(positions.device)
        flat = positions.reshape(-1)  # index_select: a row gather, several times faster than advanced indexing on CPU
        shape = (*positions.shape, 1, self.cos.shape[1])
        return self.cos.index_select(0, flat).view(shape), self.sin.index_select(0, flat).view(shape)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [N, H, D] → x·cos + [x2, x1]·sin (sin carries the sign of the first half), in x's dtype.

        Products with the fp32 tables promote bf16 inputs exactly, so the arithmetic is fp32 without a cast op.
        """
        swapped = x.roll(x.shape[-1] // 2, dims=-1)  # [x2, x1]
        return torch.addcmul(x * cos, swapped, sin).to(x.dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x: [..., T, H, D] → x rotated to ``positions`` [T] (``inverse``: back from them to position 0).

        RoPE is an orthogonal rotation per position, so the inverse is the rotation by ``-position``: the same
        cos, the sin negated. Used for keys stored pre-RoPE (KVQuant): un-rotated when quantized, re-rotated after
        dequantizing.
        """
        cos, sin = self.cos_sin(positions)  # [T, 1, D]
        return self.apply(x, cos, -sin if inverse else sin)


class GatedMLP(nn.Module):
    """down(act(gate(x)) · up(x)); gate and up fused in one matmul. act: SiLU (Llama) or tanh-GELU (Gemma)."""

    def __init__(self, gate_up: Linear, down: Linear, activation: str) -> None:
        super().__init__()
        self.gate_up = gate_up
        self.down = down
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [N, F] each, views of one [N, 2F] output
        if torch.compiler.is_compiling():  # fused by the compiler anyway; traced in place, it guarded on the batch
            act = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
            return self.down(act * up)
        # In place on the gate half: no new [N, F] buffers in the step.
        if self.activation == "silu":
            act = F.silu(gate, inplace=True)
        else:
            act = F.gelu(gate, approximate="tanh")
        return self.down(act.mul_(up))


class WeightSource:
    """Looks up a checkpoint's RawWeights by name and builds layers in the runtime's compute form."""

    def __init__(self, weights: dict[str, RawWeight], form: str, dtype: torch.dtype) -> None:
        self.weights = weights
        self.form = form
        self.dtype = dtype

    def has(self, name: str) -> bool:
        return name in self.weights

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.weights:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        weight = self.weights[name]
        value = dequantized([weight], dtype or self.dtype)
        self._done([weight])
        return value

    def linear(self, names: list[str], bias_names: list[str] | None = None, form: str | None = None) -> Linear:
        """One linear layer from weights fused along the output dim (e.g. q, k, v)."""
        missing = [name for name in names if name not in self.weights]
        if missing:
            raise ValueError(f"checkpoint is missing tensors {missing}")
        bias = None
        if bias_names:
            bias = torch.cat([self.tensor(name, torch.float32) for name in bias_names]).to(self.dtype)
        parts = [self.weights[name] for name in names]
        layer = build_linear(parts, bias, form or self.form, self.dtype)
        self._done(parts)
        return layer

    @staticmethod
    def _done(parts: list[RawWeight]) -> None:
        """The parts are converted: drop their file pages, and once the heap holds ``LOADING_SLACK`` of freed
        temporaries, return them to the OS, so that the load's peak is about the model plus one layer's working
        set, not the model plus every temporary freed beside it."""
        for part in parts:
            part.release()
        if any(len(part.shape) >= 2 for part in parts):
            release_free_heap(LOADING_SLACK)


def random_weights(config: ModelConfig, seed: int = 0, std: float = 0.15) -> dict[str, RawWeight]:
    """Random fp32 weights under Hugging Face names, for in-process test models."""
    generator = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
                                          "model.norm.weight": (config.hidden_size,)}
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (config.hidden_size,),
                       p + "post_attention_layernorm.weight": (config.hidden_size,),
                       p + "self_attn.q_proj.weight": (q_out, config.hidden_size),
                       p + "self_attn.k_proj.weight": (kv_out, config.hidden_size),
                       p + "self_attn.v_proj.weight": (kv_out, config.hidden_size),
                       p + "self_attn.o_proj.weight": (config.hidden_size, q_out),
                       p + "mlp.gate_proj.weight": (config.intermediate_size, config.hidden_size),
                       p + "mlp.up_proj.weight": (config.intermediate_size, config.hidden_size),
                       p + "mlp.down_proj.weight": (config.hidden_size, config.intermediate_size)})
        if config.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                           p + "self_attn.v_proj.bias": (kv_out,)})
        if config.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (config.head_dim,),
                           p + "self_attn.k_norm.weight": (config.head_dim,)})
        if config.architecture == "gemma3":
            shapes.update({p + "pre_feedforward_layernorm.weight": (config.hidden_size,),
                           p + "post_feedforward_layernorm.weight": (config.hidden_size,)})
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            # Llama norms scale by w (around 1); Gemma by 1 + w (w around 0).
            value = torch.randn(shape, generator=generator) * 0.1 + (0.0 if config.architecture == "gemma3" else 1.0)
        else:
            value = torch.randn(shape, generator=generator) * std
        weights[name] = RawWeight(name, tuple(shape), "F32", (lambda v=value: v.clone()))
    return weights
