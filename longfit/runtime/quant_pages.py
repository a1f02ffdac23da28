"""Compressed KV pages: KIVI (2/4-bit), int8, ThinK (pruned key channels), KVQuant (pre-RoPE keys, sparse
outliers) and ShadowKV (low-rank pre-RoPE keys) stored as records inside the ordinary pages of the pool.

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

KIVI record (``G`` tokens, ``Hkv`` heads, ``D`` channels, ``b`` bits, ``bk`` key bits (``key_bits``, else ``b``),
value groups of ``gv`` channels):
    key scale, key zero   float16 [Hkv, D]             (per channel over the G tokens)
    value scale, zero     float16 [G, Hkv, D / gv]     (per token over gv channels)
    key codes             uint8   [G, Hkv, D * bk / 8] (packed along channels, little-endian)
    value codes           uint8   [G, Hkv, D * b / 8]
KVQuant record (``G`` tokens, the key group; the flush unit too): the KIVI fields with ``gv = D`` (one value scale
and zero per token and head), ``b`` in 2, 3, 4, 8, then the dense-and-sparse outliers, a fixed count per record
(``spec.kvquant_outliers``: ``Ko = round(outliers * G * D)`` per head, ``Kv = round(outliers * D)`` per token and head):
    key outlier offsets   uint16 [Hkv, Ko]            (index into the head's [G, D] group, token-major)
    key outlier values    cache dtype [Hkv, Ko]       (exact pre-RoPE values)
    value outlier offsets uint16 [G, Hkv, Kv]         (channel index)
    value outlier values  cache dtype [G, Hkv, Kv]
  Keys are stored **pre-RoPE**: the compactor rotates each key back from its position before encoding and attention
  rotates the dequantized keys to their positions again (``RotaryEmbedding.rotate``). Both rotations are exact
  (RoPE is orthogonal); the only extra error is the cache dtype's rounding of the un-rotated key. The position of
  stream token ``s`` is ``s``: the engine refuses an eviction stage before kvquant (kept tokens would need their
  original per-head positions stored beside the pages).
int8 record (1 token): key scale, value scale float16 [Hkv]; key codes, value codes int8 [Hkv, D].
ThinK record (1 token): the kept key channels [Hkv, d'] and the values [Hkv, D], both in the cache dtype; the
channel index [Hkv, d'] of each layer is chosen once at prefill and held by the runner.
ShadowKV record (``C`` tokens, the chunk; the flush unit too), all in the cache dtype:
    landmark              [Hkv, D]       the mean of the chunk's post-RoPE keys    } only with decode-time
    outlier flags         [Hkv]          1 where the chunk is an outlier chunk     } selection (``select_chunks``)
    key coefficients      [C, r]
    values                [C, Hkv, D]
  A key is ``coefficients @ basis`` pre-RoPE (rotated like KVQuant's); the basis ``[r, Hkv * D]`` (cache dtype,
  orthonormal rows: the top-``r`` right singular vectors of the layer's pre-RoPE prompt keys) is chosen once at
  prefill and held by the runner, like ThinK's channel index. Tokens stored later are projected onto that basis.
  Outlier chunks are chosen among the prompt's (``compression.shadowkv.chunk_landmarks``); decode reads the
  landmarks and rebuilds only the chunks each KV head selects (``models.quant_decode.shadowkv_decode_attention``).
MiniCache (``G`` tokens per record, the group; the flush unit too) stores a merged layer pair (a, b) across both
layers' pages, each layer its own stream, read together (``decode``'s ``partner``):
    layer a record: key directions, value directions   cache dtype [2, G, Hkv, D]  (as many bytes as G dense tokens)
    layer b record: norms       cache dtype [4, G, Hkv]   (||k_a||, ||k_b||, ||v_a||, ||v_b||)
                    offsets     int16 [R, Hkv]            (R = floor(retain * G) retained tokens per head, in the group)
                    exact       cache dtype [4, R, Hkv, D] (k_a, k_b, v_a, v_b of those tokens)
  A layer's keys are direction * its norm, with the retained tokens exact (``compression.merging``).
A format's per-layer side tensor (ThinK's channels, ShadowKV's basis) is its ``side`` argument below.
The byte counts equal ``compression.storage.kv_bytes`` exactly (the planner's numbers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from longfit.compression.kv_quant import (
    QuantizedTensor,
    quantize_int8_per_token,
    quantize_keys_per_channel,
    quantize_values_per_token,
    unpack_bits,
)
from longfit.compression.merging import merge_layers
from longfit.compression.shadowkv import chunk_landmarks
from longfit.compression.spec import INDEX_BYTES, OUTLIER_INDEX_BYTES, StageSpec
from longfit.compression.storage import (
    kvquant_outliers,
    kvquant_split,
    minicache_merges,
    minicache_pairs,
    minicache_record_bytes,
    minicache_retained,
    shadowkv_chunks_read,
    shadowkv_factorizes,
    think_channels_kept,
    value_group,
)

ENGINE_QUANT_METHODS = ("kivi", "int8", "think", "kvquant", "shadowkv", "minicache")
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@functools.lru_cache(maxsize=8)
def _unpack_shifts(bits: int, device: str) -> Tensor:
    """``uint8 [8 / bits]``: the right shift of each code in a byte, lowest bits first (``pack_bits`` order)."""
    return (torch.arange(8 // bits, dtype=torch.uint8) * bits).to(device)


def _unpack_codes(packed: Tensor, bits: int, head_dim: int) -> Tensor:
    """``uint8 [..., D * bits / 8]`` (``pack_bits`` order) → float32 codes ``[..., D]``: shifts and a mask on the
    uint8 bytes for widths dividing 8 (a 256-entry table gather needs int64 indices, 8 bytes per code byte, and
    was several times slower in a microbenchmark), bit planes for 3 bits."""
    if 8 % bits == 0:
        codes = (packed.unsqueeze(-1) >> _unpack_shifts(bits, str(packed.device))) & ((1 << bits) - 1)
        return codes.reshape(*packed.shape[:-1], head_dim).float()
    return unpack_bits(packed, bits, head_dim).float()


_UNITS = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


@functools.lru_cache(maxsize=16)
def grouped_code_order(bits: int, head_dim: int, span: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The channel order ``unpack_codes_grouped`` returns, and its inverse.

    Position ``f = j * span + i * (span / k) + b`` (``k = 8 / bits`` codes per byte; channel group ``j`` of ``span``
    channels, code ``i`` of byte ``b`` of that group) holds channel ``j * span + k * b + i``: every channel group
    stays contiguous, only the channels inside it are permuted. Returns ``(order, inverse)``: ``out[..., f]`` is
    channel ``order[f]``; ``out[..., inverse]`` puts the channels back in order."""
    k = 8 // bits
    if span % k:  # groups narrower than a byte's codes: unpack_codes_grouped keeps the natural order
        return tuple(range(head_dim)), tuple(range(head_dim))
    order = [j * span + k * b + i for j in range(head_dim // span) for i in range(k) for b in range(span // k)]
    inverse = [0] * head_dim
    for f, d in enumerate(order):
        inverse[d] = f
    return tuple(order), tuple(inverse)


def to_code_order(x: Tensor, bits: int, span: int) -> Tensor:
    """``x: [..., D]`` in the natural channel order → the order of ``grouped_code_order(bits, D, span)``: a view
    ``[.., D / span, span / k, k]`` transposed (a strided copy; ``index_select`` on the last dim is several times
    slower on CPU)."""
    k = 8 // bits
    if k == 1 or span % k:
        return x
    return x.unflatten(-1, (x.shape[-1] // span, span // k, k)).transpose(-1, -2).flatten(-3)


def from_code_order(x: Tensor, bits: int, span: int) -> Tensor:
    """The inverse of ``to_code_order``: ``x: [..., D]`` in code order → the natural channel order."""
    k = 8 // bits
    if k == 1 or span % k:
        return x
    return x.unflatten(-1, (x.shape[-1] // span, k, span // k)).transpose(-1, -2).flatten(-3)


@functools.lru_cache(maxsize=16)
def _plane_shifts(bits: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[8 / bits, 1]`` right shifts of each code plane, in the packed words' dtype."""
    return (torch.arange(8 // bits, dtype=dtype) * bits).unsqueeze(1).to(device)


def unpack_codes_grouped(packed: Tensor, bits: int, head_dim: int, span: int) -> Tensor:
    """``uint8 [..., D * bits / 8]`` (``pack_bits`` order, little-endian) → float32 codes ``[..., D]`` in the channel
    order of ``grouped_code_order(bits, D, span)`` (natural when ``span`` is not a multiple of ``8 / bits``).

    Why not ``_unpack_codes``: extracting code ``i`` of every byte at once needs one shift and one mask on 4-byte
    words (mask ``0x03030303`` for 2 bits), not a broadcast over single bytes, and writing the ``k`` results side by
    side (no interleave) is what permutes the channels; the caller permutes its small query or output instead. On
    the 2-core EPYC this takes ~1/4 of the time of ``_unpack_codes`` for a 2-bit [3, 7936, 64] head stream."""
    k = 8 // bits
    if k == 1 or span % k:
        return _unpack_codes(packed, bits, head_dim)
    group_bytes = span // k
    unit = next(u for u in (4, 2, 1) if group_bytes % u == 0)
    lead = packed.shape[:-1]
    words = packed.contiguous().view(_UNITS[unit]).view(*lead, head_dim // span, group_bytes // unit)
    mask = int.from_bytes(bytes([(1 << bits) - 1]) * unit, "little")
    planes = (words.unsqueeze(-2) >> _plane_shifts(bits, words.dtype, words.device)) & mask  # [.., D/span, k, u]
    return planes.view(torch.uint8).reshape(*lead, head_dim).float()


def _outlier_bytes(q: QuantizedTensor, records: int, dtype: torch.dtype) -> list[Tensor]:
    """A quantizer's outliers ``[Hkv, N, K]`` as record fields: offsets then values, ``uint8 [records, ...]``
    each, blocks-major (``[N / records, Hkv, K]`` per record)."""
    if q.outlier_index is None or q.outlier_value is None:
        return []
    index, value = q.outlier_index.transpose(0, 1), q.outlier_value.to(dtype).transpose(0, 1)  # [N, Hkv, K]
    return [t.contiguous().view(torch.uint8).reshape(records, -1) for t in (index, value)]


def _restore_outliers(x: Tensor, fields: Tensor, count: int, dtype: torch.dtype) -> Tensor:
    """Write exact outliers into ``x: float32 [..., B]`` (B values per block) from ``fields: uint8 [..., n, F]``
    holding ``[..., K]`` uint16 offsets then ``[..., K]`` values in ``dtype`` for each of x's leading blocks.
    Offsets are clamped to the block: padding records (masked later) hold stale bytes."""
    lead = x.shape[:-1]
    split = count * OUTLIER_INDEX_BYTES * lead[fields.dim() - 1:].numel()  # offset bytes per record
    index = _view(fields[..., :split], torch.int16).reshape(*lead, count).long() & 0xFFFF
    index = index.clamp_(max=x.shape[-1] - 1)
    value = _view(fields[..., split:], dtype).reshape(*lead, count).float()
    return x.scatter_(-1, index, value)


def _view(data: Tensor, dtype: torch.dtype) -> Tensor:
    """Bytes ``uint8 [..., F]`` reinterpreted as ``dtype`` (copied when the slice is not aligned for it)."""
    data = data.contiguous()
    return (data.clone() if data.storage_offset() % dtype.itemsize else data).view(dtype)


@dataclass(frozen=True, slots=True)
class PageQuantFormat:
    """Record layout of one storage stage for a model's KV heads.

    Attributes:
        method: "kivi", "int8", "think", "kvquant" or "shadowkv".
        bits: code width (ThinK, ShadowKV: the cache dtype's width); KIVI: of the values.
        key_bits: KIVI's key code width when it differs from ``bits`` (0: ``bits``); ``kbits`` resolves it.
        record_tokens: tokens per record (KIVI, KVQuant: the key group G; int8, ThinK, ShadowKV: 1).
        flush_tokens: tail tokens stored at once (KIVI: the residual R, a multiple of G; KVQuant: G; others: 1).
        value_group: channels sharing one value scale (KIVI; KVQuant: D).
        key_channels: key channels kept per head (ThinK).
        dtype: the cache dtype (ThinK stores keys and values in it, KVQuant its outliers).
        outliers: fraction of values KVQuant keeps exact (a fixed count per record, ``spec.kvquant_outliers``).
        rank: ShadowKV's key rank r (< Hkv * D).
        select_chunks, outlier_chunks, local_chunks: ShadowKV's chunks read per KV head and decode step (0: every
            token, and the records hold no landmarks), of which outlier and most recent chunks always.
        retain, pair, role: MiniCache's retained fraction per group, the merged layers (a, b) and this layer's index
            in them (0: a, the directions; 1: b, the norms and retained tokens).
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
    outliers: float = 0.0
    rank: int = 0
    select_chunks: int = 0
    outlier_chunks: int = 0
    local_chunks: int = 0
    retain: float = 0.0
    pair: tuple[int, int] = (0, 0)
    role: int = 0
    key_bits: int = 0

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
        if stage.name == "shadowkv":  # a rank of Hkv * D or more saves nothing: the keys stay dense
            rank = stage.get("rank")
            if not shadowkv_factorizes(num_kv_heads * head_dim, rank):
                return None
            bits, chunk = 8 * _DTYPES[dtype].itemsize, stage.get("chunk")
            return PageQuantFormat("shadowkv", bits, chunk, chunk, num_kv_heads, head_dim, dtype=dtype, rank=rank,
                                   select_chunks=shadowkv_chunks_read(stage) or 0,
                                   outlier_chunks=stage.get("outliers"), local_chunks=stage.get("local"))
        bits = stage.get("bits")
        if bits == 16:
            return None
        if stage.name == "kivi":
            group = stage.get("group")
            return PageQuantFormat("kivi", bits, group, stage.get("residual"), num_kv_heads, head_dim,
                                   value_group(group, head_dim), key_bits=stage.get("key_bits") or 0)
        if stage.name == "int8":
            return PageQuantFormat("int8", 8, 1, 1, num_kv_heads, head_dim)
        if stage.name == "kvquant":
            group = stage.get("group")
            kvquant_split(0, group, head_dim)  # group * D must fit 16-bit outlier offsets
            return PageQuantFormat("kvquant", bits, group, group, num_kv_heads, head_dim, head_dim,
                                   dtype=dtype, outliers=stage.get("outliers"))
        raise ValueError(f"kv_compression: {stage.name} has no paged storage in the engine yet "
                         f"(engine quantizers: {', '.join(ENGINE_QUANT_METHODS)})")

    # ------------------------------------------------------------------ sizes
    @property
    def kbits(self) -> int:
        """The key codes' width (KIVI's ``key_bits`` where set, else ``bits``)."""
        return self.key_bits or self.bits

    @property
    def pre_rope(self) -> bool:
        """Keys are stored un-rotated (KVQuant, ShadowKV): rotate them to their positions after ``decode``."""
        return self.method in ("kvquant", "shadowkv")

    @property
    def has_side(self) -> bool:
        """The format needs a per-layer side tensor chosen at prefill (ThinK's channels, ShadowKV's basis)."""
        return self.method in ("think", "shadowkv")

    @property
    def outlier_counts(self) -> tuple[int, int]:
        """Outliers per record per KV head: (of the key group, of each token's value vector)."""
        if self.method != "kvquant":
            return 0, 0
        return kvquant_outliers(self.outliers, self.record_tokens, self.head_dim)

    @property
    def _field_bytes(self) -> tuple[int, int, int, int, int, int]:
        """(key scale+zero, value scale+zero, key codes, value codes, key outliers, value outliers) bytes of one
        record."""
        h, d, g = self.num_kv_heads, self.head_dim, self.record_tokens
        if self.method == "int8":
            return 2 * h, 2 * h, h * d, h * d, 0, 0
        if self.method == "think":
            width = self.bits // 8
            return 0, 0, h * self.key_channels * width, h * d * width, 0, 0
        if self.method == "shadowkv":  # the landmark and flags take the first field (``shadowkv_record_bytes``)
            width = self.bits // 8
            return (h * d + h) * width * bool(self.select_chunks), 0, g * self.rank * width, g * h * d * width, 0, 0
        pair = OUTLIER_INDEX_BYTES + _DTYPES[self.dtype].itemsize
        key_outliers, value_outliers = self.outlier_counts
        return (4 * h * d, 4 * g * h * (d // self.value_group), g * h * d * self.kbits // 8, g * h * d * self.bits // 8,
                h * key_outliers * pair,
                g * h * value_outliers * pair)

    @property
    def record_bytes(self) -> int:
        if self.method == "minicache":
            width = _DTYPES[self.dtype].itemsize
            return minicache_record_bytes(self.num_kv_heads, self.head_dim, self.record_tokens, self.retain,
                                          width)[self.role]
        return sum(self._field_bytes)

    @property
    def partner(self) -> int | None:
        """The other layer of a MiniCache pair, whose stream ``decode`` also reads; None for other formats."""
        return self.pair[1 - self.role] if self.method == "minicache" else None

    def stream_bytes(self, num_tokens: int) -> int:
        """Bytes of ``num_tokens`` quantized tokens (a multiple of ``record_tokens``)."""
        return num_tokens // self.record_tokens * self.record_bytes

    @property
    def side_bytes(self) -> int:
        """Bytes held outside the pages per layer (ThinK's int64 channel index, ShadowKV's basis in the cache dtype),
        as the planner counts them."""
        if self.method == "shadowkv":
            return self.rank * self.num_kv_heads * self.head_dim * _DTYPES[self.dtype].itemsize
        return self.num_kv_heads * self.key_channels * INDEX_BYTES if self.method == "think" else 0

    def stream_pages(self, num_tokens: int, page_bytes: int) -> int:
        return -(-self.stream_bytes(num_tokens) // page_bytes)

    def quantizable(self, num_tokens: int) -> int:
        """Leading tokens of a tail of ``num_tokens`` that are quantized now: whole flush units."""
        return num_tokens - num_tokens % self.flush_tokens

    # ------------------------------------------------------------------ encode / decode
    def encode(self, keys: Tensor, values: Tensor, side: Tensor | None = None, rotated_keys: Tensor | None = None,
               prompt: bool = False) -> Tensor:
        """``keys, values: [T, Hkv, D]`` (T a multiple of ``record_tokens``) → records
        ``uint8 [T / G, record_bytes]``. ThinK: ``side: [Hkv, d']`` the key channels kept. ShadowKV: ``side:
        [r, Hkv * D]`` the basis; ``keys`` pre-RoPE, stored as their coefficients ``keys @ basisᵀ`` (the projection
        onto the basis rows); with chunk selection, ``rotated_keys`` (the same keys post-RoPE) give the landmarks,
        and outlier chunks are chosen when these are the ``prompt``'s records."""
        num_tokens = keys.shape[0]
        n, g = num_tokens // self.record_tokens, self.record_tokens
        if self.method in ("think", "shadowkv"):
            assert side is not None
            dtype = _DTYPES[self.dtype]
            fields = []
            if self.method == "think":
                kept = keys.gather(2, side.unsqueeze(0).expand(num_tokens, -1, -1))  # [T, Hkv, d']
            else:
                kept = keys.reshape(num_tokens, -1).float() @ side.float().T  # [T, r]
                if self.select_chunks:
                    assert rotated_keys is not None
                    landmarks, outlier = chunk_landmarks(rotated_keys, g, self.outlier_chunks if prompt else 0)
                    fields = [landmarks.reshape(n, -1), outlier.reshape(n, -1)]
            fields += [kept.reshape(n, -1), values.reshape(n, -1)]
            return torch.cat([f.to(dtype).view(torch.uint8) for f in fields], dim=1)
        k, v = keys.transpose(0, 1), values.transpose(0, 1)  # [Hkv, T, D]
        if self.method == "int8":
            kq, vq = quantize_int8_per_token(k), quantize_int8_per_token(v)
            parts = [kq.scale.transpose(0, 1).reshape(n, -1), vq.scale.transpose(0, 1).reshape(n, -1)]
            codes = [kq.codes.transpose(0, 1).reshape(n, -1), vq.codes.transpose(0, 1).reshape(n, -1)]
        else:  # KIVI, KVQuant (keys pre-RoPE: the caller un-rotates them)
            kq = quantize_keys_per_channel(k, self.kbits, g, self.outliers)  # scale/zero [Hkv, n, D]
            vq = quantize_values_per_token(v, self.bits, self.value_group, self.outliers)  # [Hkv, T, D/gv]
            assert kq.zero is not None and vq.zero is not None
            parts = [torch.stack([kq.scale, kq.zero]).permute(2, 0, 1, 3).reshape(n, -1),  # [n, 2*Hkv*D]
                     torch.stack([vq.scale, vq.zero]).permute(2, 0, 1, 3).reshape(n, -1)]  # [n, 2*G*Hkv*D/gv]
            codes = [kq.codes.transpose(0, 1).reshape(n, -1), vq.codes.transpose(0, 1).reshape(n, -1)]
            dtype = _DTYPES[self.dtype]
            codes += _outlier_bytes(kq, n, dtype) + _outlier_bytes(vq, n, dtype)
        scales = [p.contiguous().view(torch.uint8) for p in parts]
        return torch.cat(scales + codes, dim=1)

    def decode(self, records: Tensor, side: Tensor | None = None,
               partner: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``records: uint8 [..., n, record_bytes]`` → keys, values float32 ``[..., n * G, Hkv, D]``.
        ThinK: ``side: [..., Hkv, d']`` the channels; pruned key channels come back as zeros (``q · k`` is
        unchanged). ShadowKV: ``side: [..., r, Hkv * D]`` the basis. KVQuant, ShadowKV: the keys come back pre-RoPE
        (``pre_rope``). MiniCache: ``partner`` the other layer's records of the same groups."""
        if self.method == "minicache":
            assert partner is not None
            return self._decode_merged(*((records, partner) if self.role == 0 else (partner, records)))
        lead, n = records.shape[:-2], records.shape[-2]
        h, d, g = self.num_kv_heads, self.head_dim, self.record_tokens
        ks_b, vs_b, kc_b, vc_b, ko_b, _ = self._field_bytes
        o1, o2, o3 = ks_b, ks_b + vs_b, ks_b + vs_b + kc_b
        o4, o5 = o3 + vc_b, o3 + vc_b + ko_b
        if self.method == "shadowkv":
            assert side is not None
            _, _, coefficients, values = self.shadowkv_fields(records, landmarks=False)
            keys = torch.matmul(coefficients.reshape(*lead, n * g, self.rank).float(), side.float())
            return keys.reshape(*lead, n * g, h, d), values.reshape(*lead, n * g, h, d).float()
        if self.method == "think":
            assert side is not None
            dtype = _DTYPES[self.dtype]
            kept = records[..., :o3].contiguous().view(dtype).reshape(*lead, n, h, self.key_channels)
            values = records[..., o3:].contiguous().view(dtype).reshape(*lead, n, h, d).float()
            index = side.unsqueeze(-3).expand(*lead, n, h, self.key_channels)
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
        k_width, v_width = d * self.kbits // 8, d * self.bits // 8
        k_sz = f16(0, o1).reshape(*lead, n, 1, 2, h, d)
        v_sz = f16(o1, o2).reshape(*lead, n, g, 2, h, d // self.value_group, 1)
        k_codes = _unpack_codes(records[..., o2:o3].reshape(*lead, n, g, h, k_width), self.kbits, d)
        v_codes = _unpack_codes(records[..., o3:o4].reshape(*lead, n, g, h, v_width), self.bits, d)
        v_codes = v_codes.reshape(*lead, n, g, h, d // self.value_group, self.value_group)
        keys = torch.addcmul(k_sz[..., 1, :, :], k_codes, k_sz[..., 0, :, :])  # zero + codes * scale [.., n, g, h, d]
        values = torch.addcmul(v_sz[..., 1, :, :, :], v_codes, v_sz[..., 0, :, :, :]).reshape(*lead, n, g, h, d)
        key_outliers, value_outliers = self.outlier_counts
        dtype = _DTYPES[self.dtype]
        if key_outliers:  # offsets index each head's [g, d] group: scatter on [.., n, h, g * d]
            by_head = keys.transpose(-3, -2).reshape(*lead, n, h, g * d)
            by_head = _restore_outliers(by_head, records[..., o4:o5], key_outliers, dtype)
            keys = by_head.reshape(*lead, n, h, g, d).transpose(-3, -2)
        if value_outliers:
            values = _restore_outliers(values, records[..., o5:], value_outliers, dtype)
        return keys.reshape(*lead, n * g, h, d), values.reshape(*lead, n * g, h, d)

    def shadowkv_landmarks(self, records: Tensor) -> tuple[Tensor, Tensor]:
        """ShadowKV ``records: uint8 [..., n, record_bytes]`` with chunk selection → landmarks float32
        ``[..., n, Hkv, D]`` and outlier flags bool ``[..., n, Hkv]``."""
        lead, n = records.shape[:-2], records.shape[-2]
        h, d = self.num_kv_heads, self.head_dim
        marks = _view(records[..., :self._field_bytes[0]], _DTYPES[self.dtype]).reshape(*lead, n, h * d + h)
        return marks[..., :h * d].float().reshape(*lead, n, h, d), marks[..., h * d:] > 0

    def shadowkv_fields(self, records: Tensor, landmarks: bool = True
                        ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
        """ShadowKV ``records: uint8 [..., n, record_bytes]`` → landmarks and outlier flags
        (``shadowkv_landmarks``; None without chunk selection or ``landmarks``), key coefficients
        ``[..., n, C, r]`` and values ``[..., n, C, Hkv, D]`` in the cache dtype."""
        lead, n = records.shape[:-2], records.shape[-2]
        h, d, g = self.num_kv_heads, self.head_dim, self.record_tokens
        dtype = _DTYPES[self.dtype]
        o1, _, kc_b, _, _, _ = self._field_bytes
        marks, outlier = self.shadowkv_landmarks(records) if o1 and landmarks else (None, None)
        coefficients = _view(records[..., o1:o1 + kc_b], dtype).reshape(*lead, n, g, self.rank)
        values = _view(records[..., o1 + kc_b:], dtype).reshape(*lead, n, g, h, d)
        return marks, outlier, coefficients, values

    def _decode_merged(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """MiniCache: this layer's keys and values float32 ``[..., n * G, Hkv, D]`` from the pair's records
        ``first: [..., n, a bytes]`` (directions) and ``second: [..., n, b bytes]`` (norms, retained tokens)."""
        lead, n = first.shape[:-2], first.shape[-2]
        h, d, g = self.num_kv_heads, self.head_dim, self.record_tokens
        r = minicache_retained(g, self.retain)
        dtype = _DTYPES[self.dtype]
        width = dtype.itemsize
        directions = _view(first, dtype).reshape(*lead, n, 2, g, h, d).float()
        o1, o2 = 4 * g * h * width, 4 * g * h * width + 2 * r * h
        norms = _view(second[..., :o1], dtype).reshape(*lead, n, 4, g, h, 1).float()
        out = []
        for kind in (0, 1):  # keys, values: direction * this layer's norm, then the retained tokens exact
            rebuilt = directions[..., kind, :, :, :] * norms[..., 2 * kind + self.role, :, :, :]  # [..., n, G, Hkv, D]
            if r:
                # offsets are clamped to the group: padding records (masked later) hold stale bytes
                offsets = _view(second[..., o1:o2], torch.int16).reshape(*lead, n, r, h, 1).long().clamp_(0, g - 1)
                exact = _view(second[..., o2:], dtype).reshape(*lead, n, 4, r, h, d)[..., 2 * kind + self.role, :, :, :]
                rebuilt = rebuilt.scatter_(-3, offsets.expand(*lead, n, r, h, d), exact.float())
            out.append(rebuilt.reshape(*lead, n * g, h, d))
        return out[0], out[1]

    def kivi_operands(self, records: Tensor) -> tuple[Tensor, ...]:
        """KIVI ``records: uint8 [B, n, record_bytes]`` → the affine parts ``models.quant_decode`` multiplies, fp32:
        key scale, zero ``[B, n, Hkv, D]`` (per record and channel), key codes ``[B, n, Hkv, G, D]``, value scale,
        zero ``[B, Hkv, D / vg, n * G]`` (per channel group and token), value codes ``[B, Hkv, n * G, D]``.

        The key codes come in the channel order of ``grouped_code_order(kbits, D, vg)``, the value codes in that of
        ``grouped_code_order(bits, D, vg)`` (value groups stay contiguous; the scales and zeros are in the natural
        order). The packed bytes are put heads-first before
        unpacking: a quarter or half of the codes' fp32 bytes to move."""
        if self.method != "kivi":
            raise ValueError(f"kivi_operands needs a kivi format, got {self.method}")
        batch, n = records.shape[:2]
        h, d, g, vg = self.num_kv_heads, self.head_dim, self.record_tokens, self.value_group
        ks_b, vs_b, kc_b, vc_b, _, _ = self._field_bytes
        o1, o2, o3 = ks_b, ks_b + vs_b, ks_b + vs_b + kc_b
        k_width, v_width = d * self.kbits // 8, d * self.bits // 8
        k_sz = records[..., :o1].contiguous().view(torch.float16).float().view(batch, n, 2, h, d)
        v_sz = records[..., o1:o2].contiguous().view(torch.float16).float().view(batch, n, g, 2, h, d // vg)
        v_sz = v_sz.permute(3, 0, 4, 5, 1, 2).reshape(2, batch, h, d // vg, n * g)
        k_packed = records[..., o2:o3].reshape(batch, n, g, h, k_width).transpose(2, 3)
        v_packed = records[..., o3:o3 + vc_b].reshape(batch, n, g, h, v_width).permute(0, 3, 1, 2, 4)
        k_codes = unpack_codes_grouped(k_packed, self.kbits, d, vg)  # [B, n, Hkv, G, D]
        v_codes = unpack_codes_grouped(v_packed, self.bits, d, vg).view(batch, h, n * g, d)
        return k_sz[:, :, 0], k_sz[:, :, 1], k_codes, v_sz[0], v_sz[1], v_codes

    # ------------------------------------------------------------------ paged stream
    def read(self, pool_bytes: Tensor, pages: Tensor, num_records: int) -> Tensor:
        """Records ``[..., num_records, record_bytes]`` from stream pages ``pages: [..., P]`` of ``pool_bytes``
        (``uint8 [num_blocks, page_bytes]``). Rows with fewer records read padding: mask them."""
        # index_select copies whole rows; advanced indexing (pool_bytes[pages]) runs ~10x slower on CPU for uint8 rows
        buffer = pool_bytes.index_select(0, pages.reshape(-1))  # [prod(...) * P, page_bytes]
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


def minicache_formats(stage: StageSpec, full_layers: list[bool], num_kv_heads: int, head_dim: int,
                      dtype: str = "bfloat16") -> list[PageQuantFormat | None]:
    """Per layer: the MiniCache record format of each merged pair's two layers, None elsewhere (and everywhere
    when the spec's groups would not shrink: the pairs stay unmerged)."""
    formats: list[PageQuantFormat | None] = [None] * len(full_layers)
    group, retain = stage.get("group"), stage.get("retain")
    if not minicache_merges(num_kv_heads, head_dim, group, retain, _DTYPES[dtype].itemsize):
        return formats
    bits = 8 * _DTYPES[dtype].itemsize
    for pair in minicache_pairs(len(full_layers), stage.get("start"), full_layers):
        for role in (0, 1):
            formats[pair[role]] = PageQuantFormat("minicache", bits, group, group, num_kv_heads, head_dim,
                                                  dtype=dtype, retain=retain, pair=pair, role=role)
    return formats


def encode_pair(fmt: PageQuantFormat, keys_a: Tensor, values_a: Tensor, keys_b: Tensor,
                values_b: Tensor) -> tuple[Tensor, Tensor]:
    """MiniCache: ``[T, Hkv, D]`` K and V of a pair's two layers (T a multiple of the group) → their records
    ``uint8 [T / G, a bytes]`` and ``uint8 [T / G, b bytes]`` (``compression.merging.merge_layers``)."""
    num_tokens, h, d = keys_a.shape
    n, g, dtype = num_tokens // fmt.record_tokens, fmt.record_tokens, _DTYPES[fmt.dtype]
    merged = merge_layers(*(x.transpose(0, 1).to(dtype) for x in (keys_a, values_a, keys_b, values_b)), fmt.retain, g)
    assert merged is not None  # minicache_formats only makes formats whose groups shrink
    directions = torch.stack([merged.key_direction, merged.value_direction])  # [2, Hkv, T, D]
    directions = directions.view(2, h, n, g, d).permute(2, 0, 3, 1, 4)  # [n, 2, G, Hkv, D]
    norms = torch.cat([merged.key_norms, merged.value_norms]).view(4, h, n, g).permute(2, 0, 3, 1)  # [n, 4, G, Hkv]
    offsets = merged.retained.permute(1, 2, 0)  # [n, R, Hkv]
    exact = torch.cat([merged.retained_keys, merged.retained_values]).permute(2, 0, 3, 1, 4)  # [n, 4, R, Hkv, D]
    first = directions.contiguous().view(torch.uint8).reshape(n, -1)
    second = torch.cat([t.contiguous().view(torch.uint8).reshape(n, -1) for t in (norms, offsets, exact)
                        if t.numel()], dim=1)  # (r = 0: no retained fields)
    return first, second
