"""Storage math of the KV-compression specs: the exact bytes one request's stored KV takes under each storage
format (quantized codes and scales, pruned or low-rank keys, merged layer pairs, page bounds), and the layout the
engine packs into its pages. No torch; the engine's record formats (``runtime.quant_pages``) and the planner use
these same functions, so planned and held bytes agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from longfit.compression.spec import (
    INDEX_BYTES,
    OUTLIER_INDEX_BYTES,
    SCALE_BYTES,
    STORAGE_KINDS,
    CompressionSpec,
    StageSpec,
    kept_tokens_per_layer,
    parse_spec,
)
from longfit.config import ModelConfig


def kivi_split(num_tokens: int, group: int, residual: int) -> tuple[int, int]:
    """(quantized keys, quantized values) of KIVI as longfit stores it: both ``n - n % residual``.

    Keys follow the reference (jy-yuan/KIVI): whole multiples of ``residual`` are quantized, the rest stays full
    precision. NOTE: the reference keeps exactly the last ``residual`` values in full precision (a sliding window,
    one value quantized per decode step); longfit quantizes values at the same boundary as keys so a record holds
    the keys and values of the same tokens and the tail is flushed ``residual`` tokens at a time. The full-precision
    window is therefore ``n % residual`` tokens for both (between 0 and ``residual - 1``).
    """
    del group  # residual is a multiple of group, so quantized tokens always fill whole groups
    quantized = num_tokens - num_tokens % residual
    return quantized, quantized


def value_group(group: int, head_dim: int) -> int:
    """Channels per value group: ``min(group, head_dim)``, which must divide ``head_dim``."""
    g = min(group, head_dim)
    if head_dim % g:
        raise ValueError(f"kv_compression: group={group} must divide head_dim={head_dim} (or be >= it)")
    return g


def outlier_count(fraction: float, group_elements: int) -> int:
    """Outliers kept exact per quantization group: ``round(fraction * elements)``, half up."""
    return int(fraction * group_elements + 0.5)


def kvquant_split(num_tokens: int, group: int, head_dim: int) -> int:
    """Tokens KVQuant quantizes as longfit stores it: whole groups, ``n - n % group``; keys and values of the last
    ``n % group`` tokens stay in the cache dtype (one record holds the keys and values of the same ``group`` tokens).
    NOTE: the reference quantizes each value vector as it arrives (per token, online); longfit quantizes values at
    the keys' group boundary, as it does for KIVI."""
    if group * head_dim > 65536:
        raise ValueError(f"kv_compression: kvquant:group*head_dim must be <= 65536 (16-bit outlier offsets), "
                         f"got {group}*{head_dim}")
    return num_tokens - num_tokens % group


def kvquant_outliers(fraction: float, group: int, head_dim: int) -> tuple[int, int]:
    """Outliers KVQuant keeps exact: (per key group of ``group x head_dim`` values per KV head, per value vector of
    ``head_dim`` values): a fixed count each, so every record has the same size."""
    return outlier_count(fraction, group * head_dim), outlier_count(fraction, head_dim)


def quantized_bytes(stage: StageSpec, num_kv_heads: int, num_tokens: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of one layer's quantized K and V: packed codes, float16 scales/zeros, residual, outliers."""
    p, h, n, d = stage.as_dict(), num_kv_heads, num_tokens, head_dim
    bits = p["bits"]
    if bits == 16:
        return 2 * h * n * d * dtype_bytes
    if (d * bits) % 8:
        raise ValueError(f"kv_compression: {stage.name}:bits={bits} needs head_dim*bits divisible by 8, head_dim={d}")
    if stage.name == "int8":  # codes + one symmetric scale per token and head, for K and V
        return 2 * h * n * (d + SCALE_BYTES)
    if stage.name == "kivi":
        qk, qv = kivi_split(n, p["group"], p["residual"])
        gv = value_group(p["group"], d)
        codes = h * (qk * (p["key_bits"] or bits) + qv * bits) * d // 8
        scales = 2 * SCALE_BYTES * h * (qk // p["group"] * d + qv * d // gv)
        return codes + scales + h * ((n - qk) + (n - qv)) * d * dtype_bytes
    g = p["group"]  # kvquant: whole groups of g tokens quantized (keys per channel, values per token), rest exact
    qk = kvquant_split(n, g, d)
    key_outliers, value_outliers = kvquant_outliers(p["outliers"], g, d)
    outlier = OUTLIER_INDEX_BYTES + dtype_bytes
    codes = 2 * h * qk * d * bits // 8
    scales = 2 * SCALE_BYTES * h * (qk // g * d + qk)  # key scale + zero per channel per group, value per token
    outliers = h * (qk // g * key_outliers + qk * value_outliers) * outlier
    return codes + scales + outliers + 2 * h * (n - qk) * d * dtype_bytes


def stored_layout(stage: StageSpec, num_kv_heads: int, num_tokens: int, head_dim: int,
                  dtype_bytes: int) -> tuple[int, int, int] | None:
    """How the engine stores one layer of ``num_tokens`` tokens under a storage stage it applies in its pages:
    ``(stream tokens, stream bytes, side bytes)`` — the leading tokens packed as records on the first pages, their
    bytes, and bytes held beside the pages (ThinK's channel index, ShadowKV's basis) — the remaining tokens sit in
    ordinary pages. None when the stage stores plain tokens (identity); minicache's layout depends on the layer
    (``minicache_layouts``).
    """
    h, n, d = num_kv_heads, num_tokens, head_dim
    if stage.name == "think":
        dk = think_channels_kept(d, stage.get("channels"))
        return None if dk == d else (n, h * n * (dk + d) * dtype_bytes, h * dk * INDEX_BYTES)
    if stage.name == "shadowkv":
        r, chunk = stage.get("rank"), stage.get("chunk")
        if not shadowkv_factorizes(h * d, r):
            return None
        stored = n - n % chunk
        record = shadowkv_record_bytes(h, d, r, chunk, stage.get("budget") > 0, dtype_bytes)
        return stored, stored // chunk * record, r * h * d * dtype_bytes
    if stage.name not in ("kivi", "int8", "kvquant") or stage.get("bits") == 16:
        return None
    quantized = n
    if stage.name == "kivi":
        quantized = kivi_split(n, stage.get("group"), stage.get("residual"))[0]
    elif stage.name == "kvquant":
        quantized = kvquant_split(n, stage.get("group"), d)
    return quantized, quantized_bytes(stage, h, quantized, d, dtype_bytes), 0


def dequant_format(stage: StageSpec) -> str:
    """The name of a storage stage's paged format whose expansion cost the planner calibrates: ``kivi:bits=2``,
    ``int8``, ``kvquant:bits=4``, ``think``, ``shadowkv``, ``minicache`` (cost per element depends on the method and
    code width only; ShadowKV's also on its rank). KIVI with its own ``key_bits`` is costed as its value width: the
    unpack and matmuls are the same operations on a few more key bytes."""
    if stage.name in ("int8", "think", "shadowkv", "minicache"):
        return stage.name
    return f"{stage.name}:bits={stage.get('bits')}"


def think_channels_kept(head_dim: int, channels: float) -> int:
    """Key channels ThinK keeps: ``head_dim - floor(head_dim * (1 - channels))`` (kvpress pruned count)."""
    return head_dim - int(head_dim * (1.0 - channels) + 1e-9)


def shadowkv_record_bytes(num_kv_heads: int, head_dim: int, rank: int, chunk: int, landmarks: bool,
                          dtype_bytes: int) -> int:
    """One ShadowKV record (``chunk`` tokens, cache dtype): with ``landmarks`` (decode-time chunk selection), the
    chunk's landmark ``[Hkv, D]`` and outlier flags ``[Hkv]``; then each token's ``rank`` key coefficients and its
    values ``[Hkv, D]``."""
    h, d = num_kv_heads, head_dim
    return ((h * d + h) * landmarks + chunk * (rank + h * d)) * dtype_bytes


def shadowkv_chunks_read(stage: StageSpec) -> int | None:
    """Stored chunks one decode step of one KV head reads under ShadowKV's selection: ``ceil(budget / chunk)``
    chosen by landmark score plus the ``outliers`` and ``local`` chunks; None when it reads every token
    (``budget=0``)."""
    budget, chunk = stage.get("budget"), stage.get("chunk")
    return None if budget == 0 else -(-budget // chunk) + stage.get("outliers") + stage.get("local")


def shadowkv_factorizes(width: int, rank: int) -> bool:
    """ShadowKV stores keys as ``[n, r]`` coefficients + an ``[r, width]`` basis only when ``r < width`` (fewer bytes
    per token); a short prompt may then take more bytes than dense keys: the basis is a fixed cost per layer."""
    return rank < width


def minicache_pairs(num_layers: int, start: float, full_layers: Sequence[bool] | None = None) -> list[tuple[int, int]]:
    """Layer pairs ``(l, l+1)`` merged from ``floor(start * L)`` on, skipping sliding (non-full) layers."""
    full = list(full_layers) if full_layers is not None else [True] * num_layers
    pairs, layer = [], int(start * num_layers + 1e-9)
    while layer + 1 < num_layers:
        if full[layer] and full[layer + 1]:
            pairs.append((layer, layer + 1))
            layer += 2
        else:
            layer += 1
    return pairs


def minicache_retained(group: int, retain: float) -> int:
    """Tokens per KV head kept exact in each merged group of ``group`` tokens: ``floor(retain * group)``."""
    return min(group, int(retain * group + 1e-9))


def minicache_record_bytes(num_kv_heads: int, head_dim: int, group: int, retain: float,
                           dtype_bytes: int) -> tuple[int, int]:
    """Bytes of one merged group of ``group`` tokens: (first layer's record, second layer's record).

    First layer: the shared K and V directions ``[2, G, h, d]``, as many bytes as the group's dense tokens.
    Second layer: four norm vectors ``[4, G, h]`` (k and v of both layers), per head ``r = minicache_retained``
    retained token offsets (int16) and both layers' exact K and V of those tokens ``[4, r, h, d]``.
    """
    h, d, g = num_kv_heads, head_dim, group
    r = minicache_retained(g, retain)
    second = 4 * g * h * dtype_bytes + h * r * OUTLIER_INDEX_BYTES + 4 * h * r * d * dtype_bytes
    return 2 * g * h * d * dtype_bytes, second


def minicache_merges(num_kv_heads: int, head_dim: int, group: int, retain: float, dtype_bytes: int) -> bool:
    """A merged group takes fewer bytes than the two layers' dense tokens (else the pair is left unmerged)."""
    first, second = minicache_record_bytes(num_kv_heads, head_dim, group, retain, dtype_bytes)
    return first + second < 4 * group * num_kv_heads * head_dim * dtype_bytes


def minicache_pair_bytes(num_kv_heads: int, num_tokens: int, head_dim: int, retain: float, dtype_bytes: int,
                         group: int) -> int:
    """Bytes of a merged layer pair of ``num_tokens`` tokens each: whole groups merged
    (``minicache_record_bytes``), the last ``num_tokens % group`` tokens dense in both layers; the dense bytes of
    both layers when merging would not be smaller."""
    per_token = 4 * num_kv_heads * head_dim * dtype_bytes  # K and V of both layers
    if not minicache_merges(num_kv_heads, head_dim, group, retain, dtype_bytes):
        return num_tokens * per_token
    records = sum(minicache_record_bytes(num_kv_heads, head_dim, group, retain, dtype_bytes))
    return num_tokens // group * records + num_tokens % group * per_token


def minicache_layouts(stage: StageSpec, num_kv_heads: int, head_dim: int, tokens: Sequence[int],
                      full_layers: Sequence[bool], dtype_bytes: int) -> list[tuple[int, int, int] | None]:
    """``stored_layout`` of every layer under minicache (``tokens[l]`` tokens held per layer): each merged pair's
    first layer holds the directions, the second the norms and retained tokens, as records of ``group`` tokens;
    other layers (and pairs that would not shrink) hold plain tokens (None)."""
    layouts: list[tuple[int, int, int] | None] = [None] * len(tokens)
    group, retain = stage.get("group"), stage.get("retain")
    if not minicache_merges(num_kv_heads, head_dim, group, retain, dtype_bytes):
        return layouts
    records = minicache_record_bytes(num_kv_heads, head_dim, group, retain, dtype_bytes)
    for a, b in minicache_pairs(len(tokens), stage.get("start"), full_layers):
        merged = min(tokens[a], tokens[b]) // group
        for layer, size in zip((a, b), records):
            layouts[layer] = (merged * group, merged * size, 0)
    return layouts


def kv_bytes(spec: str | CompressionSpec | None, model_config: ModelConfig, num_tokens: int,
             dtype_bytes: int = 2) -> int:
    """Exact bytes of the stored KV of one request of ``num_tokens`` tokens, all layers, without page rounding.

    Per layer ``l`` with ``n_l`` kept tokens (``kept_tokens_per_layer``), ``h`` KV heads, head dim ``d``,
    ``b = dtype_bytes``:
      - no storage stage: ``2 h n_l d b``;
      - quantize: ``quantized_bytes`` (codes ``h n d bits/8``, float16 scale + zero per group, full-precision
        residual tokens, outliers as 2-byte offset + ``b``-byte value);
      - think: keys ``h n_l d' b`` + channel index ``h d' 8`` + values ``h n_l d b`` (``d' < d``; else dense);
      - shadowkv (when ``r < h d``, else dense): the first ``n_l - n_l mod chunk`` tokens as records of ``chunk``
        tokens (``shadowkv_record_bytes``: ``r`` coefficients + values per token, a landmark and outlier flags
        per chunk when ``budget > 0``), the basis ``r h d b``, the last ``n_l mod chunk`` tokens dense;
      - minicache: each merged pair ``minicache_pair_bytes`` (whole groups merged); other layers dense;
      - quest adds page bounds ``2 h d b`` per page of ``page`` tokens (last page partial) on every full layer
        from ``dense_layers`` on.
    """
    spec = parse_spec(spec)
    num_layers, h, d = model_config.num_layers, model_config.num_kv_heads, model_config.head_dim
    windows = [model_config.layer_window(layer) for layer in range(num_layers)]
    kept = kept_tokens_per_layer(spec, num_layers, num_tokens, layer_windows=windows)
    storage, select = spec.stage(*STORAGE_KINDS), spec.stage("select")
    per_layer = [2 * h * n * d * dtype_bytes for n in kept]
    if storage is not None and storage.kind == "quantize":
        per_layer = [quantized_bytes(storage, h, n, d, dtype_bytes) for n in kept]
    elif storage is not None and storage.name == "think":
        dk = think_channels_kept(d, storage.get("channels"))
        if dk < d:
            per_layer = [h * n * (dk + d) * dtype_bytes + h * dk * INDEX_BYTES for n in kept]
    elif storage is not None and storage.name == "shadowkv":
        layouts = [stored_layout(storage, h, n, d, dtype_bytes) for n in kept]
        per_layer = [dense if layout is None else layout[1] + layout[2] + 2 * h * (n - layout[0]) * d * dtype_bytes
                     for n, dense, layout in zip(kept, per_layer, layouts)]
    elif storage is not None and storage.name == "minicache":
        for a, b in minicache_pairs(num_layers, storage.get("start"), [w is None for w in windows]):
            per_layer[a] = minicache_pair_bytes(h, kept[a], d, storage.get("retain"), dtype_bytes, storage.get("group"))
            per_layer[b] = 0
    if select is not None:
        page = select.get("page")
        for layer in range(select.get("dense_layers"), num_layers):
            if windows[layer] is None:
                per_layer[layer] += -(-kept[layer] // page) * 2 * h * d * dtype_bytes
    return sum(per_layer)
