"""ModelConfig from a checkpoint's metadata: GGUF key/values or a Hugging Face ``config.json``. No torch here.

The planner imports this module to size a model without loading weights, so it also holds a small GGUF header
reader (``read_gguf``): ``gguf.GGUFReader`` builds one numpy view per vocabulary entry and takes ~11 s on Gemma 3's
262k-token header, while this reader parses the same header in a fraction of a second and maps tensor data lazily.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from longfit.config import ModelConfig, RopeScaling

GGUF_MAGIC = b"GGUF"
# Tokens that end a chat turn; generation stops on them as well as on the file's EOS id.
CHAT_END_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3")
SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM",
                              "Gemma3ForConditionalGeneration")

# ---------------------------------------------------------------------------------------------------------------
# GGUF header reading (spec: ggml/docs/gguf.md). Little-endian files, versions 2 and 3.
# ---------------------------------------------------------------------------------------------------------------

# GGUF value type id -> (struct format, numpy dtype) for fixed-size scalars.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
    6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file. ``shape`` is in HF/numpy order ``(out, in)``: GGUF dims reversed."""

    name: str
    shape: tuple[int, ...]
    qtype: str  # GGMLQuantizationType name: "F32", "Q4_K", ...
    offset: int  # absolute byte offset in the file
    num_bytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the last, contiguous dimension) in the stored format."""
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[self.qtype]]
        return self.shape[-1] // block_size * type_size


@dataclass(slots=True)
class GGUFFile:
    """A parsed GGUF header plus the read-only memory map its tensor data is viewed from."""

    path: str
    metadata: dict[str, object]
    tensors: dict[str, GGUFTensorInfo]
    buffer: mmap.mmap

    def raw(self, name: str) -> np.ndarray:
        """Stored bytes of a tensor as uint8 ``[*shape[:-1], row_bytes]``: a view into the map, no copy."""
        info = self.tensors[name]
        data = np.frombuffer(self.buffer, dtype=np.uint8, count=info.num_bytes, offset=info.offset)
        return data.reshape(*info.shape[:-1], info.row_bytes)

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process's resident set once it has been converted: the map is read-only,
        so ``madvise(MADV_DONTNEED)`` leaves them in the OS page cache, and a later read faults them back in. Without
        it every byte of the file stays in the loader's RSS until the map closes (SmolLM2: +94 MiB at the peak)."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        info = self.tensors[name]
        if advice is None or info.num_bytes == 0:
            return
        start = info.offset - info.offset % mmap.PAGESIZE  # madvise needs a page-aligned start
        self.buffer.madvise(advice, start, info.offset + info.num_bytes - start)


class _Cursor:
    """Bounds-checked sequential reads from the file, so a truncated header fails with a clear message."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer
        self.size = len(buffer)
        self.offset = 0

    def take(self, num_bytes: int) -> int:
        start = self.offset
        if num_bytes < 0 or start + num_bytes > self.size:
            raise ValueError(f"header ends early (needs byte {start + num_bytes}, file has {self.size})")
        self.offset = start + num_bytes
        return start

    def scalar(self, fmt: str) -> int | float | bool:
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buffer, start)[0]

    def string(self) -> str:
        length = int(self.scalar("<Q"))
        start = self.take(length)
        return self.buffer[start:start + length].decode("utf-8")

    def value(self, type_id: int) -> object:
        if type_id in _SCALARS:
            return self.scalar(_SCALARS[type_id][0])
        if type_id == _STRING:
            return self.string()
        if type_id != _ARRAY:
            raise ValueError(f"unknown metadata value type {type_id} at byte {self.offset}")
        item_type = int(self.scalar("<I"))
        count = int(self.scalar("<Q"))
        if item_type in _SCALARS:  # one vectorized read, e.g. 262k token scores
            dtype = np.dtype(_SCALARS[item_type][1])
            start = self.take(count * dtype.itemsize)
            return np.frombuffer(self.buffer, dtype=dtype, count=count, offset=start).copy()
        if count > (self.size - self.offset) // 8:  # every string or array item takes at least 8 bytes
            raise ValueError(f"array of {count} items cannot fit in the file")
        if item_type == _STRING:  # NOTE: a plain loop; 262k tokens take ~0.2 s
            return [self.string() for _ in range(count)]
        return [self.value(item_type) for _ in range(count)]


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table; tensor bytes stay memory-mapped.

    Raises:
        ValueError: ``"<path> is not a valid GGUF file: <reason>"`` for a missing, truncated or corrupt file.
    """
    path = str(path)
    try:
        with open(path, "rb") as handle:
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as error:  # missing file, a directory, an empty file (mmap refuses it)
        raise ValueError(f"{path} is not a valid GGUF file: {error}") from None
    try:
        return _parse_gguf(path, buffer)
    except Exception as error:  # noqa: BLE001 (struct/Unicode/numpy errors from garbage bytes: one clear error)
        message = f"{path} is not a valid GGUF file: {error}"
        del error
        with contextlib.suppress(BufferError):  # a stray numpy view would keep the map open; harmless
            buffer.close()
        raise ValueError(message) from None


def _parse_gguf(path: str, buffer: mmap.mmap) -> GGUFFile:
    cursor = _Cursor(buffer)
    if buffer[:4] != GGUF_MAGIC:
        raise ValueError(f"bad magic {bytes(buffer[:4])!r}, expected {GGUF_MAGIC!r}")
    cursor.take(4)
    version = int(cursor.scalar("<I"))
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version} (2 and 3 are supported; big-endian files are not)")
    num_tensors, num_kv = int(cursor.scalar("<Q")), int(cursor.scalar("<Q"))
    if num_tensors > len(buffer) // 24 or num_kv > len(buffer) // 12:
        raise ValueError(f"implausible counts ({num_tensors} tensors, {num_kv} metadata entries)")
    metadata: dict[str, object] = {}
    for _ in range(num_kv):
        key = cursor.string()
        metadata[key] = cursor.value(int(cursor.scalar("<I")))
    infos = []
    for _ in range(num_tensors):
        name = cursor.string()
        num_dims = int(cursor.scalar("<I"))
        if not 1 <= num_dims <= 4:
            raise ValueError(f"tensor {name!r} has {num_dims} dimensions")
        dims = [int(cursor.scalar("<Q")) for _ in range(num_dims)]
        type_id, offset = int(cursor.scalar("<I")), int(cursor.scalar("<Q"))
        infos.append((name, dims, type_id, offset))
    alignment = int(metadata.get("general.alignment", 32))  # type: ignore[call-overload]
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment must be a power of two, got {alignment}")
    data_start = -(-cursor.offset // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"tensor {name!r} has unknown type id {type_id}") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block_size:
            raise ValueError(f"tensor {name!r}: row length {dims[0]} is not a multiple of {qtype.name} blocks")
        num_bytes = math.prod(dims) // block_size * type_size
        start = data_start + offset
        if start + num_bytes > len(buffer):
            raise ValueError(f"truncated: tensor {name!r} ends at byte {start + num_bytes}, file has {len(buffer)}")
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), qtype.name, start, num_bytes)
    return GGUFFile(path, metadata, tensors, buffer)


# ---------------------------------------------------------------------------------------------------------------
# GGUF metadata -> ModelConfig
# ---------------------------------------------------------------------------------------------------------------


def _unsupported(kind: str, architecture: object, supported: Collection[str]) -> ValueError:
    return ValueError(f"unsupported {kind} architecture {architecture!r}; longfit supports {', '.join(supported)}")


def _int_field(meta: Mapping[str, Any], key: str, default: int | None = None, high: int = 2**31 - 1) -> int:
    """A positive integer metadata value; bounded so a corrupt file fails here, not in a giant allocation."""
    value = meta.get(key, default)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    array = np.asarray(value)
    if array.ndim:  # per-layer values (e.g. head counts): only uniform ones are supported
        if array.size == 0 or (array != array.flat[0]).any():
            raise ValueError(f"GGUF metadata {key!r} varies per layer ({value!r}); only uniform values are supported")
        array = array.flat[0]
    number = int(array)
    if not 1 <= number <= high:
        raise ValueError(f"GGUF metadata {key!r} must be in 1..{high}, got {number}")
    return number


def _from_float32(value: Any) -> float:
    """The shortest decimal that rounds to the stored float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _optional(cast: type, value: Any) -> Any:
    return None if value is None else cast(value)


def _chat_eos_ids(tokens: Sequence[str] | None, eos_ids: list[int]) -> tuple[int, ...]:
    """The file's EOS ids plus any chat end-of-turn token the vocabulary has, deduplicated in order."""
    ids = list(eos_ids)
    for token in CHAT_END_TOKENS:
        if tokens is not None and token in tokens:
            ids.append(tokens.index(token))
    return tuple(dict.fromkeys(ids))


def _rope_scaling_from_gguf(meta: Mapping[str, Any], arch: str, rope_freqs: np.ndarray | None,
                            rope_theta: float, head_dim: int) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(meta[f"{arch}.rope.scaling.factor"]))
    if kind not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported; supported: linear, llama3 (rope_freqs)")
    if rope_freqs is None:
        return None
    # llama.cpp stores Llama 3.x's scaling as a per-frequency divisor tensor (rope_freqs). Every Llama 3.x release
    # uses low 1, high 4 and an 8192-token original context; only the factor differs, and it is the largest divisor.
    scaling = RopeScaling(rope_type="llama3", factor=float(np.max(rope_freqs)), low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)
    expected = llama3_frequency_divisors(scaling, rope_theta, head_dim)
    if expected.shape != rope_freqs.shape or not np.allclose(expected, rope_freqs, rtol=1e-3):
        raise ValueError("GGUF rope_freqs does not match Llama 3 scaling (low 1, high 4, original 8192)")
    return scaling


def llama3_frequency_divisors(scaling: RopeScaling, rope_theta: float, head_dim: int) -> np.ndarray:
    """What each RoPE inverse frequency is divided by under Llama 3.1 scaling: float32 ``[head_dim // 2]``.

    Paper: "The Llama 3 Herd of Models" (transformers ``_compute_llama3_parameters``).
    """
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / scaling.low_freq_factor, old_len / scaling.high_freq_factor
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    scaled = np.where(middle, (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq, scaled)
    return (inv_freq / scaled).astype(np.float32)


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3 interleaves ``pattern - 1`` sliding-window layers with one global layer (layer i is global iff
    ``i % pattern == pattern - 1``), as HF's ``Gemma3TextConfig`` and llama.cpp's ``set_swa_pattern(6)`` do."""
    return tuple("full" if i % pattern == pattern - 1 else "sliding" for i in range(num_layers))


def model_config_from_gguf_metadata(meta: Mapping[str, Any], name: str,
                                    tensor_names: Collection[str] | None = None,
                                    rope_freqs: np.ndarray | None = None) -> ModelConfig:
    """Build a ModelConfig from GGUF key/values (as ``read_gguf`` returns them, or plain lists).

    Args:
        meta: GGUF metadata; ``tokenizer.ggml.tokens`` is used to find chat end tokens and the vocabulary size.
        name: name recorded in the config.
        tensor_names: the file's tensor names; embeddings are tied iff ``output.weight`` is absent. None: tied.
        rope_freqs: the ``rope_freqs.weight`` tensor when present (Llama 3.x scaling), float32 ``[head_dim // 2]``.

    Raises:
        ValueError: for an architecture other than llama, qwen2, gemma3, or missing required keys.
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise _unsupported("GGUF", arch, SUPPORTED_GGUF_ARCHITECTURES)
    tokens = meta.get("tokenizer.ggml.tokens")
    hidden = _int_field(meta, f"{arch}.embedding_length")
    num_heads = _int_field(meta, f"{arch}.attention.head_count")
    num_layers = _int_field(meta, f"{arch}.block_count", high=4096)
    head_dim = _int_field(meta, f"{arch}.attention.key_length", hidden // num_heads)
    vocab = meta.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ValueError(f"GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
    rope_theta = _from_float32(meta.get(f"{arch}.rope.freq_base", 10000.0))
    eos_ids = [int(meta[key]) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                           "tokenizer.ggml.eom_token_id") if key in meta]
    # llama.cpp's default when the key is absent: SentencePiece vocabularies add BOS, byte-level BPE ones do not.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))
    common: dict[str, Any] = {
        "vocab_size": int(vocab), "hidden_size": hidden, "num_layers": num_layers, "num_heads": num_heads,
        "intermediate_size": _int_field(meta, f"{arch}.feed_forward_length"),
        "num_kv_heads": _int_field(meta, f"{arch}.attention.head_count_kv", num_heads), "head_dim": head_dim,
        "max_model_len": _int_field(meta, f"{arch}.context_length"), "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling_from_gguf(meta, arch, rope_freqs, rope_theta, head_dim),
        "rms_norm_eps": _from_float32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": tensor_names is None or "output.weight" not in tensor_names,
        "final_logit_softcapping": _optional(float, meta.get(f"{arch}.final_logit_softcapping")),
        "bos_token_id": _optional(int, meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_ids": _chat_eos_ids(tokens, eos_ids), "add_bos_token": add_bos, "name": name,
    }
    if arch == "gemma3":
        # NOTE: the GGUF file does not store query_pre_attn_scalar. HF's configs use head_dim for every size but
        # 27B (62 layers), which uses hidden/heads; llama.cpp applies the same rule (LLM_TYPE_27B).
        scalar = float(hidden // num_heads if num_layers == 62 else head_dim)
        return ModelConfig(
            architecture="gemma3", attention_bias=False, hidden_act="gelu_tanh", qk_norm=True,
            query_pre_attn_scalar=scalar, embedding_multiplier=math.sqrt(hidden), rope_local_theta=10000.0,
            sliding_window=_int_field(meta, "gemma3.attention.sliding_window"),
            layer_types=gemma3_layer_types(num_layers), **common)
    window = meta.get(f"{arch}.attention.sliding_window")
    layer_types = ("sliding",) * num_layers if window else ()  # Mistral 7B v0.1 converted as "llama"
    return ModelConfig(architecture="llama", attention_bias=arch == "qwen2", hidden_act="silu",
                       sliding_window=int(window) if window else None, layer_types=layer_types, **common)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------------------------


def _rope_from_hf(params: Mapping[str, Any] | None) -> RopeScaling | None:
    if not params:
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeScaling(
            rope_type="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)))
    raise ValueError(f"rope scaling {kind!r} is not supported; supported: default, linear, llama3")


def model_config_from_hf(config: Mapping[str, Any], name: str, add_bos_token: bool | None = None,
                         vocab: Mapping[str, int] | None = None) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout).

    Args:
        config: the parsed ``config.json``; Gemma 3 multimodal configs are read from their ``text_config``.
        name: name recorded in the config.
        add_bos_token: whether the tokenizer prepends BOS; None: True for Llama/Mistral/Gemma 3, False for Qwen2.
        vocab: token -> id, to add chat end-of-turn tokens (``<|im_end|>``, ...) to the EOS ids.

    Raises:
        ValueError: for an unsupported architecture or rope scaling type.
    """
    architectures = config.get("architectures") or []
    arch_name = architectures[0] if architectures else config.get("model_type")
    model_type = config.get("model_type")
    if arch_name not in SUPPORTED_HF_ARCHITECTURES and model_type != "gemma3_text":
        raise _unsupported("Hugging Face", arch_name, SUPPORTED_HF_ARCHITECTURES)
    text: Mapping[str, Any] = config.get("text_config") or config
    is_gemma = model_type in ("gemma3", "gemma3_text") or str(arch_name).startswith("Gemma3")
    hidden, num_heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    num_layers = int(text["num_hidden_layers"])
    head_dim = int(text.get("head_dim") or hidden // num_heads)
    # transformers 5 moved rope settings into rope_parameters (per layer type for Gemma 3).
    rope_params: Mapping[str, Any] = text.get("rope_parameters") or {}
    global_rope: Mapping[str, Any] = rope_params.get("full_attention", rope_params)
    local_rope: Mapping[str, Any] = rope_params.get("sliding_attention", {})
    rope_theta = float(global_rope.get("rope_theta", text.get("rope_theta", 1e6 if is_gemma else 1e4)))
    eos = text.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [int(i) for i in (eos if isinstance(eos, list) else [] if eos is None else [eos])]
    eos_ids += [vocab[t] for t in CHAT_END_TOKENS if vocab and t in vocab]
    window = text.get("sliding_window")
    common: dict[str, Any] = {
        "vocab_size": int(text["vocab_size"]), "hidden_size": hidden, "num_layers": num_layers,
        "intermediate_size": int(text["intermediate_size"]), "num_heads": num_heads, "head_dim": head_dim,
        "num_kv_heads": int(text.get("num_key_value_heads") or num_heads),
        "max_model_len": int(text.get("max_position_embeddings", 2048)), "rope_theta": rope_theta,
        "rope_scaling": _rope_from_hf(text.get("rope_scaling") or global_rope),
        "rms_norm_eps": float(text.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", is_gemma))),
        "bos_token_id": _optional(int, text.get("bos_token_id", config.get("bos_token_id"))),
        "final_logit_softcapping": _optional(float, text.get("final_logit_softcapping")),
        "eos_token_ids": tuple(dict.fromkeys(eos_ids)), "name": name,
    }
    if is_gemma:
        types = text.get("layer_types")
        layer_types = (tuple("full" if t == "full_attention" else "sliding" for t in types) if types
                       else gemma3_layer_types(num_layers, int(text.get("sliding_window_pattern", 6))))
        local_theta = local_rope.get("rope_theta", text.get("rope_local_base_freq", 10000.0))
        return ModelConfig(
            architecture="gemma3", hidden_act="gelu_tanh", qk_norm=True, attention_bias=False,
            query_pre_attn_scalar=float(text.get("query_pre_attn_scalar", head_dim)),
            embedding_multiplier=math.sqrt(hidden), rope_local_theta=float(local_theta),
            sliding_window=_optional(int, window), layer_types=layer_types,
            add_bos_token=True if add_bos_token is None else add_bos_token, **common)
    is_qwen = arch_name == "Qwen2ForCausalLM"
    if is_qwen:  # Qwen2 slides only on layers >= max_window_layers, and only when use_sliding_window is set
        first = int(text.get("max_window_layers", num_layers))
        sliding = bool(text.get("use_sliding_window")) and window is not None
        layer_types = tuple("sliding" if sliding and i >= first else "full" for i in range(num_layers))
    else:  # Mistral v0.1 slides everywhere; later Mistrals and Llama set sliding_window to null
        layer_types = ("sliding",) * num_layers if window else ()
    return ModelConfig(
        architecture="llama", hidden_act="silu", attention_bias=is_qwen or bool(text.get("attention_bias", False)),
        sliding_window=int(window) if window and "sliding" in layer_types else None, layer_types=layer_types,
        add_bos_token=(not is_qwen) if add_bos_token is None else add_bos_token, **common)


def read_hf_tokenizer_facts(directory: str | os.PathLike[str]) -> tuple[bool | None, dict[str, int] | None]:
    """(add_bos_token, vocabulary) from an HF directory's tokenizer files, each None when unknown.

    ``add_bos_token`` comes from ``tokenizer_config.json`` or, failing that, from whether the ``tokenizer.json``
    post-processor emits a special token before the text.
    """
    directory = Path(directory)
    add_bos: bool | None = None
    vocab: dict[str, int] | None = None
    config_path, tokenizer_path = directory / "tokenizer_config.json", directory / "tokenizer.json"
    if config_path.is_file():
        value = json.loads(config_path.read_text(encoding="utf-8")).get("add_bos_token")
        add_bos = bool(value) if value is not None else None
    if tokenizer_path.is_file():
        data = json.loads(tokenizer_path.read_text(encoding="utf-8"))
        vocab = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
        if add_bos is None:
            single = (data.get("post_processor") or {}).get("single") or []
            add_bos = bool(single) and "SpecialToken" in single[0]
    return add_bos, vocab


def load_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """ModelConfig of a ``config.json``, a Hugging Face directory, or a GGUF file (header only, no weights).

    Raises:
        ValueError: when the path is none of these, or names an unsupported architecture.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{path.parent} is not a Hugging Face model directory: it has no config.json")
    if path.suffix == ".json" and path.is_file():
        add_bos, vocab = read_hf_tokenizer_facts(path.parent)
        config = json.loads(path.read_text(encoding="utf-8"))
        return model_config_from_hf(config, path.parent.name, add_bos_token=add_bos, vocab=vocab)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; expected a .gguf file, a config.json or a Hugging Face directory")
    gguf_file = read_gguf(path)
    return model_config_from_gguf_metadata(gguf_file.metadata, path.stem, gguf_file.tensors, gguf_rope_freqs(gguf_file))


def gguf_rope_freqs(gguf_file: GGUFFile) -> np.ndarray | None:
    """The ``rope_freqs.weight`` tensor (Llama 3.x frequency divisors) as float32 ``[head_dim // 2]``, or None."""
    info = gguf_file.tensors.get("rope_freqs.weight")
    if info is None:
        return None
    return np.asarray(dequantize(gguf_file.raw(info.name), GGMLQuantizationType[info.qtype]), np.float32).reshape(-1)
