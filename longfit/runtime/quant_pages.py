"""Compressed KV pages: KIVI (2/4-bit), int8 and ThinK (pruned key channels) stored as records inside the
ordinary pages of the pool.

A quantized layer of a request keeps its tokens in two parts, in one page table:

    [ stream pages: records of quantized tokens 0 .. Q-1 ][ tail pages: tokens Q .. n-1 in the model dtype ]

The stream is a byte string of fixed-size *records* laid end to end over the stream pages (a record may straddle
two pages: pages are gathered into one buffer before it is read). A record holds ``record_tokens`` tokens of all
KV heads with their scales, so a page of ``page_bytes`` bytes holds ``page_bytes / record_bytes`` records instead of
``block_size`` tokens: a 2-bit page really holds about 6x the tokens of a bf16 page (scales included).

New tokens are always written to the tail in the model dtype (the full-precision residual window of KIVI). When
the tail reaches ``flush_tokens``, the runner quantizes whole flush units into new records, appends them to the
stream, moves the remaining tail tokens after it, and the manager frees the pages left over. Everything is done in
place: the stream of ``m`` tokens never takes more bytes than the same ``m`` tokens in the model dtype.

KIVI record (``G`` tokens, ``Hkv`` heads, ``D`` channels, ``b`` bits, value groups of ``gv`` channels):
    key scale, key zero   float16 [Hkv, D]            (per channel over the G tokens)
    value scale, zero     float16 [G, Hkv, D / gv]    (per token over gv channels)
    key codes             uint8   [G, Hkv, D * b / 8] (packed along channels, little-endian)
    value codes           uint8   [G, Hkv, D * b / 8]
int8 record (1 token): key scale, value scale float16 [Hkv]; key codes, value codes int8 [Hkv, D].
ThinK record (1 token): the kept key channels [Hkv, d'] and the values [Hkv, D], both in the cache dtype; the
channel index [Hkv, d'] of each layer is chosen once at prefill and held by the runner.
The byte counts equal ``compression.spec.kv_bytes`` exactly (the planner's numbers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from longfit.compression.kv_quant import (
    quantize_int8_per_token,
    quantize_keys_per_channel,
    quantize_values_per_token,
)
from longfit.compression.spec import INDEX_BYTES, StageSpec, think_channels_kept, value_group

ENGINE_QUANT_METHODS = ("kivi", "int8", "think")
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@functools.lru_cache(maxsize=8)
def _unpack_table(bits: int, device: str) -> Tensor:
    """``[256, 8 / bits]`` float32: the codes held by each byte value, lowest bits first (``pack_bits`` order)."""
    per_byte = 8 // bits
    byte = torch.arange(256, dtype=torch.int64).unsqueeze(1)
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    return ((byte >> shifts) & ((1 << bits) - 1)).float().to(device)


@dataclass(frozen=True, slots=True)
class PageQuantFormat:
    """Record layout of one storage stage for a model's KV heads.

    Attributes:
        method: "kivi", "int8" or "think".
        bits: code width (ThinK: the cache dtype's width).
        record_tokens: tokens per record (KIVI: the key group G; int8, ThinK: 1).
        flush_tokens: tail tokens stored at once (KIVI: the residual R, a multiple of G; int8, ThinK: 1).
        value_group: channels sharing one value scale (KIVI).
        key_channels: key channels kept per head (ThinK).
        dtype: the cache dtype (ThinK stores keys and values in it).
    """

    method: str
    bits: int
    record_tokens: int
    flush_tokens: int
    num_kv_heads: int
    head_dim: int
    value_group: int = 0
    key_channels: int = 0
    dtype: str = "bfloat16"

    @staticmethod
    def from_stage(stage: StageSpec, num_kv_heads: int, head_dim: int,
                   dtype: str = "bfloat16") -> PageQuantFormat | None:
        """The format of a storage stage, or None for its identity (``bits=16``, every channel kept)."""
        if stage.name == "think":
            kept = think_channels_kept(head_dim, stage.get("channels"))
            if kept == head_dim:
                return None
            bits = 8 * _DTYPES[dtype].itemsize
            return PageQuantFormat("think", bits, 1, 1, num_kv_heads, head_dim, key_channels=kept, dtype=dtype)
        bits = stage.get("bits")
        if bits == 16:
            return None
        if stage.name == "kivi":
            group = stage.get("group")
            return PageQuantFormat("kivi", bits, group, stage.get("residual"), num_kv_heads, head_dim,
                                   value_group(group, head_dim))
        if stage.name == "int8":
            return PageQuantFormat("int8", 8, 1, 1, num_kv_heads, head_dim)
        raise ValueError(f"kv_compression: {stage.name} has no paged storage in the engine yet "
                         f"(engine quantizers: {', '.join(ENGINE_QUANT_METHODS)})")

    # ------------------------------------------------------------------ sizes
    @property
    def _field_bytes(self) -> tuple[int, int, int, int]:
        """(key scale+zero, value scale+zero, key codes, value codes) bytes of one record."""
        h, d, g = self.num_kv_heads, self.head_dim, self.record_tokens
        if self.method == "int8":
            return 2 * h, 2 * h, h * d, h * d
        if self.method == "think":
            width = self.bits // 8
            return 0, 0, h * self.key_channels * width, h * d * width
        codes = g * h * d * self.bits // 8
        return 4 * h * d, 4 * g * h * (d // self.value_group), codes, codes

    @property
    def record_bytes(self) -> int:
        return sum(self._field_bytes)

    def stream_bytes(self, num_tokens: int) -> int:
        """Bytes of ``num_tokens`` quantized tokens (a multiple of ``record_tokens``)."""
        return num_tokens // self.record_tokens * self.record_bytes

    @property
    def side_bytes(self) -> int:
        """Bytes held outside the pages per layer (ThinK's int64 channel index), as the planner counts them."""
        return self.num_kv_heads * self.key_channels * INDEX_BYTES if self.method == "think" else 0

    def stream_pages(self, num_tokens: int, page_bytes: int) -> int:
        return -(-self.stream_bytes(num_tokens) // page_bytes)

    def quantizable(self, num_tokens: int) -> int:
        """Leading tokens of a tail of ``num_tokens`` that are quantized now: whole flush units."""
        return num_tokens - num_tokens % self.flush_tokens

    # ------------------------------------------------------------------ encode / decode
    def encode(self, keys: Tensor, values: Tensor, channels: Tensor | None = None) -> Tensor:
        """``keys, values: [T, Hkv, D]`` (T a multiple of ``record_tokens``) → records ``uint8 [T / G, record_bytes]``.
        ThinK: ``channels: [Hkv, d']`` the key channels kept."""
        num_tokens = keys.shape[0]
        n, g = num_tokens // self.record_tokens, self.record_tokens
        if self.method == "think":
            assert channels is not None
            dtype = _DTYPES[self.dtype]
            kept = keys.gather(2, channels.unsqueeze(0).expand(num_tokens, -1, -1))  # [T, Hkv, d']
            return torch.cat([kept.to(dtype).reshape(n, -1).view(torch.uint8),
                              values.to(dtype).reshape(n, -1).view(torch.uint8)], dim=1)
        k, v = keys.transpose(0, 1), values.transpose(0, 1)  # [Hkv, T, D]
        if self.method == "int8":
            kq, vq = quantize_int8_per_token(k), quantize_int8_per_token(v)
            parts = [kq.scale.transpose(0, 1).reshape(n, -1), vq.scale.transpose(0, 1).reshape(n, -1)]
            codes = [kq.codes.transpose(0, 1).reshape(n, -1), vq.codes.transpose(0, 1).reshape(n, -1)]
        else:
            kq = quantize_keys_per_channel(k, self.bits, g)  # scale/zero [Hkv, n, D], codes [Hkv, T, D*b/8]
            vq = quantize_values_per_token(v, self.bits, self.value_group)  # scale/zero [Hkv, T, D/gv]
            assert kq.zero is not None and vq.zero is not None
            parts = [torch.stack([kq.scale, kq.zero]).permute(2, 0, 1, 3).reshape(n, -1),  # [n, 2*Hkv*D]
                     torch.stack([vq.scale, vq.zero]).permute(2, 0, 1, 3).reshape(n, -1)]  # [n, 2*G*Hkv*D/gv]
            codes = [kq.codes.transpose(0, 1).reshape(n, -1), vq.codes.transpose(0, 1).reshape(n, -1)]
        scales = [p.contiguous().view(torch.uint8) for p in parts]
        return torch.cat(scales + codes, dim=1)

    def decode(self, records: Tensor, channels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``records: uint8 [..., n, record_bytes]`` → keys, values float32 ``[..., n * G, Hkv, D]``.
        ThinK: ``channels: [..., Hkv, d']``; pruned key channels come back as zeros (``q · k`` is unchanged)."""
        lead, n = records.shape[:-2], records.shape[-2]
        h, d, g = self.num_kv_heads, self.head_dim, self.record_tokens
        ks_b, vs_b, kc_b, _ = self._field_bytes
        o1, o2, o3 = ks_b, ks_b + vs_b, ks_b + vs_b + kc_b
        if self.method == "think":
            assert channels is not None
            dtype = _DTYPES[self.dtype]
            kept = records[..., :o3].contiguous().view(dtype).reshape(*lead, n, h, self.key_channels)
            values = records[..., o3:].contiguous().view(dtype).reshape(*lead, n, h, d).float()
            index = channels.unsqueeze(-3).expand(*lead, n, h, self.key_channels)
            keys = kept.new_zeros(*lead, n, h, d, dtype=torch.float32).scatter_(-1, index, kept.float())
            return keys, values

        def f16(lo: int, hi: int) -> Tensor:
            return records[..., lo:hi].contiguous().view(torch.float16).float()

        if self.method == "int8":
            k_scale = f16(0, o1).reshape(*lead, n, h, 1)
            v_scale = f16(o1, o2).reshape(*lead, n, h, 1)
            k_codes = records[..., o2:o3].contiguous().view(torch.int8).reshape(*lead, n, h, d)
            v_codes = records[..., o3:].contiguous().view(torch.int8).reshape(*lead, n, h, d)
            return k_codes.float() * k_scale, v_codes.float() * v_scale
        table = _unpack_table(self.bits, str(records.device))
        k_sz = f16(0, o1).reshape(*lead, n, 1, 2, h, d)
        v_sz = f16(o1, o2).reshape(*lead, n, g, 2, h, d // self.value_group, 1)
        k_codes = table[records[..., o2:o3].long()].reshape(*lead, n, g, h, d)
        v_codes = table[records[..., o3:].long()].reshape(*lead, n, g, h, d // self.value_group, self.value_group)
        keys = torch.addcmul(k_sz[..., 1, :, :], k_codes, k_sz[..., 0, :, :])  # zero + codes * scale
        values = torch.addcmul(v_sz[..., 1, :, :, :], v_codes, v_sz[..., 0, :, :, :])
        return keys.reshape(*lead, n * g, h, d), values.reshape(*lead, n * g, h, d)

    # ------------------------------------------------------------------ paged stream
    def read(self, pool_bytes: Tensor, pages: Tensor, num_records: int) -> Tensor:
        """Records ``[..., num_records, record_bytes]`` from stream pages ``pages: [..., P]`` of ``pool_bytes``
        (``uint8 [num_blocks, page_bytes]``). Rows with fewer records read padding: mask them."""
        buffer = pool_bytes[pages]  # [..., P, page_bytes]
        flat = buffer.reshape(*pages.shape[:-1], -1)[..., :num_records * self.record_bytes]
        return flat.reshape(*pages.shape[:-1], num_records, self.record_bytes)

    def write(self, pool_bytes: Tensor, pages: Tensor, first_record: int, records: Tensor) -> None:
        """Store ``records: uint8 [n, record_bytes]`` at record index ``first_record`` of the stream on
        ``pages: [P]`` (P covers the stream's end)."""
        page_bytes = pool_bytes.shape[1]
        start = first_record * self.record_bytes
        offsets = torch.arange(start, start + records.numel(), device=pool_bytes.device)
        rows = pages[offsets // page_bytes] * page_bytes + offsets % page_bytes
        pool_bytes.view(-1).index_copy_(0, rows, records.reshape(-1))
