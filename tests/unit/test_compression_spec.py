"""The KV-compression spec language, descriptor table, token counts and byte math (torch-free module)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from longfit.compression.head_scores import read_head_scores, write_head_scores
from longfit.compression.spec import (
    KINDS,
    METHODS,
    NO_COMPRESSION,
    kept_tokens_per_layer,
    make_stage,
    parse_spec,
    pyramid_kept,
)
from longfit.compression.storage import kv_bytes
from longfit.config import ModelConfig

TINY = ModelConfig.tiny(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)  # 2 layers, Hkv 2, D 16


def test_spec_module_imports_no_torch() -> None:
    code = "import sys, longfit.compression.spec; assert 'torch' not in sys.modules, 'spec.py imported torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("text, canonical, names", [
    ("snapkv:keep=0.25", "snapkv:keep=0.25", ["snapkv"]),
    ("kivi:bits=2", "kivi:bits=2", ["kivi"]),
    ("snapkv:keep=0.25+kivi:bits=2", "snapkv:keep=0.25+kivi:bits=2", ["snapkv", "kivi"]),
    (" KIVI : bits = 2 + SnapKV:keep=0.25 ", "snapkv:keep=0.25+kivi:bits=2", ["snapkv", "kivi"]),  # reordered
    ("streaming:sinks=4,window=1024", "streaming_llm:sinks=4,window=1024", ["streaming_llm"]),
    ("pyramid:budget=512", "pyramidkv:budget=512", ["pyramidkv"]),
    ("int8", "int8", ["int8"]),
    ("quest:budget=256+kv8", "quest:budget=256+int8", ["quest", "int8"]),
    ("think:channels=0.5+knorm:keep=0.5", "knorm:keep=0.5+think:channels=0.5", ["knorm", "think"]),
    ("streaming:window=64+minicache", "streaming_llm:window=64+minicache", ["streaming_llm", "minicache"]),
])
def test_valid_specs_parse_to_canonical_form(text: str, canonical: str, names: list[str]) -> None:
    spec = parse_spec(text)
    assert spec.text == canonical
    assert [s.name for s in spec.stages] == names
    assert parse_spec(spec.text) == spec  # the canonical text round-trips


@pytest.mark.parametrize("text", [None, "", "  ", "none", "NONE"])
def test_no_compression(text: str | None) -> None:
    assert parse_spec(text) == NO_COMPRESSION and parse_spec(text).is_empty


def test_values_are_typed_and_defaults_filled() -> None:
    stage = parse_spec("snapkv:keep=1,window=32").stages[0]
    params = stage.as_dict()
    assert params == {"keep": 1.0, "budget": None, "window": 32, "kernel": 5, "pool": "avg", "every": 0}
    assert isinstance(params["keep"], float) and isinstance(params["window"], int)
    kivi = parse_spec("kivi").stages[0].as_dict()
    assert kivi == {"bits": 2, "key_bits": None, "group": 32, "residual": 128}


INVALID = [
    ("foo", "unknown method 'foo'"),
    ("foo", "known methods: streaming_llm"),
    ("snapkv:keep=0", "snapkv:keep must be a number in (0, 1]"),
    ("snapkv:keep=1.5", "snapkv:keep must be a number in (0, 1]"),
    ("snapkv:keep=-0.1", "(0, 1]"),
    ("snapkv:keep=abc", "snapkv:keep must be a number"),
    ("snapkv:keep=nan", "snapkv:keep must be a number"),
    ("kivi:bits=3", "kivi:bits must be one of 2, 4, 16, got '3'"),
    ("kivi:key_bits=8", "kivi:key_bits must be one of 2, 4, got '8'"),
    ("kivi:bits=16,key_bits=2", "kivi:key_bits needs bits=2 or bits=4"),
    ("int8:bits=4", "int8:bits must be one of 8, 16"),
    ("snapkv:kep=0.5", "snapkv does not accept 'kep'; accepted parameters: keep, budget, window, kernel, pool"),
    ("snapkv:keep", "bad syntax 'keep'"),
    ("snapkv:", "bad syntax"),
    (":keep=0.5", "bad syntax"),
    ("snapkv:keep=0.5,", "bad syntax"),
    ("snapkv:keep=0.5++kivi", "bad syntax"),
    ("snapkv", "snapkv needs exactly one of keep=FRACTION"),
    ("snapkv:keep=0.5,budget=10", "snapkv needs exactly one of keep"),
    ("snapkv:budget=2.5", "snapkv:budget must be an integer >= 1"),
    ("snapkv:budget=0", "snapkv:budget must be an integer >= 1"),
    ("snapkv:keep=0.5,kernel=4", "snapkv:kernel must be an odd integer"),
    ("snapkv:keep=0.5,pool=median", "snapkv:pool must be one of avg, max"),
    ("snapkv:keep=0.5,keep=0.4", "snapkv:keep given twice"),
    ("kivi:residual=40", "kivi:residual must be a multiple of group=32"),
    ("pyramidkv:budget=10,window=64", "pyramidkv:budget must be greater than window=64"),
    ("streaming", "needs exactly one of keep=FRACTION, budget=TOKENS or window=TOKENS"),
    ("streaming:window=10,keep=0.5", "needs exactly one of keep"),
    ("snapkv:keep=0.5+h2o:keep=0.5", "at most one eviction stage, got snapkv and h2o"),
    ("kivi+int8", "at most one storage"),
    ("quest+quest", "at most one page-selection stage"),
    ("snapkv:keep=0.5+minicache", "composes only with streaming_llm"),
    ("think:channels=0", "think:channels must be a number in (0, 1]"),
    ("kvquant:outliers=0.5", "kvquant:outliers must be a number in [0, 0.5)"),
    ("duo:sparsity=2", "duo_attention:sparsity must be a number in [0, 1]"),
    ("duo:granularity=token", "duo_attention:granularity must be one of layer, head"),
]


@pytest.mark.parametrize("text, message", INVALID)
def test_invalid_specs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_spec(text)
    assert message in str(error.value)


def test_descriptor_table_is_consistent() -> None:
    for name, method in METHODS.items():
        assert method.kind in KINDS and method.paper and method.summary
        assert method.identity, f"{name} must declare the parameters that make it a no-op"
        budget = {"keep": 1.0} if method.param("keep") and name != "duo_attention" else {}
        identity = dict(method.identity)
        if "keep" in identity:
            budget = {}
        stage = make_stage(name, **{**budget, **identity})
        assert stage.name == name
        for param in method.params:
            if param.default is not None:
                param.convert(name, param.default)  # every default is itself valid


@pytest.mark.parametrize("text, num_layers, num_tokens, expected", [
    ("none", 3, 100, [100, 100, 100]),
    ("snapkv:keep=0.25", 2, 100, [25, 25]),
    ("snapkv:keep=0.57,window=8", 1, 100, [57]),  # 100 * 0.57 is 56.99999999999999 in floating point
    ("snapkv:keep=0.25", 2, 64, [64, 64]),  # prompt not longer than the window: untouched
    ("snapkv:budget=80", 2, 100, [80, 80]),
    ("snapkv:budget=500", 2, 100, [100, 100]),
    ("snapkv:keep=0.001,window=8", 1, 100, [1]),  # at least one token
    ("streaming:sinks=4,window=16", 2, 100, [20, 20]),
    ("streaming:keep=0.25", 1, 100, [25]),
    ("streaming:window=200", 1, 100, [100]),
    ("h2o:keep=0.5", 1, 100, [100]),  # observe=256 >= prompt: untouched
    ("h2o:keep=0.5,observe=32", 1, 100, [50]),
    ("tova:budget=1", 1, 100, [1]),
    ("knorm:keep=0.5,skip_layers=1", 4, 100, [100, 50, 50, 50]),
    ("pyramidkv:keep=0.3,window=8,beta=2", 4, 100, [45, 35, 25, 15]),
    ("pyramidkv:keep=0.3,window=8", 4, 100, [30, 30, 30, 30]),  # kvpress: min < window, falls back to SnapKV
    ("pyramidkv:budget=40,window=8,beta=2", 4, 100, [56, 46, 36, 26]),
    ("pyramidkv:budget=40,window=8,beta=2", 4, 50, [40, 40, 40, 40]),  # n < 2 (C - W): uniform C
    ("pyramidkv:budget=40,window=8,beta=2", 4, 30, [30, 30, 30, 30]),  # n < C: untouched
    ("kivi:bits=2+quest", 2, 100, [100, 100]),
])
def test_kept_tokens_per_layer_table(text: str, num_layers: int, num_tokens: int, expected: list[int]) -> None:
    assert kept_tokens_per_layer(text, num_layers, num_tokens) == expected


def test_sliding_layers_keep_only_their_window() -> None:
    kept = kept_tokens_per_layer("snapkv:keep=0.25", 4, 100, layer_windows=[32, 32, 32, None])
    assert kept == [32, 32, 32, 25]


def test_pyramid_keep_form_averages_to_the_budget() -> None:
    for num_tokens in (300, 1000, 4096):
        for num_layers in (2, 5, 30):
            budgets = [pyramid_kept(layer, num_layers, num_tokens, 0.25, None, 16, 4) for layer in range(num_layers)]
            assert budgets == sorted(budgets, reverse=True), "layer 0 gets the most"
            assert abs(sum(budgets) - num_layers * num_tokens * 0.25) <= num_layers / 2 + 1e-9


KV_BYTES = [  # tiny config: 2 layers, 2 KV heads, head_dim 16, 100 tokens, bf16
    ("none", 2 * 2 * 2 * 100 * 16 * 2),
    ("snapkv:keep=0.25", 2 * 2 * 2 * 25 * 16 * 2),
    ("streaming:sinks=4,window=16", 2 * 2 * 2 * 20 * 16 * 2),
    ("kivi:bits=2", 25600),  # 100 tokens < residual 128: keys and values all full precision
    # kivi G16 R32: keys and values 96 quantized + 4 fp; per layer codes 2*192*16*2/8=1536, scales 2*2*2*(6*16+96)=1536,
    # fp 2*8*16*2=512
    ("kivi:bits=2,group=16,residual=32", 2 * (1536 + 1536 + 512)),
    ("kivi:bits=4,group=16,residual=32", 2 * (3072 + 1536 + 512)),
    # 4-bit keys, 2-bit values: key codes 2*96*16*4/8=1536, value codes 768, same scales and fp tail
    ("kivi:bits=2,key_bits=4,group=16,residual=32", 2 * (1536 + 768 + 1536 + 512)),
    ("int8", 2 * 2 * 2 * 100 * (16 + 2)),
    # kvquant 4-bit G32: 96 tokens quantized, 4 fp. Keys codes 1536 + scales 384 + 5 outliers/group 120 + fp 256;
    # values codes 1536 + per-token scales 768 (round(0.01 * 16) = 0 outliers per vector) + fp 256
    ("kvquant", 2 * (1536 + 384 + 120 + 256 + 1536 + 768 + 256)),
    # outliers=0.1: 51 per key group (4 bytes each), 2 per value vector
    ("kvquant:outliers=0.1", 2 * (1536 + 384 + 2 * 3 * 51 * 4 + 256 + 1536 + 768 + 2 * 96 * 2 * 4 + 256)),
    ("kvquant:bits=16", 25600),
    ("think:channels=0.5", 2 * (2 * 100 * (8 + 16) * 2 + 2 * 8 * 8)),
    ("think:channels=1", 25600),
    # 12 records of 8 tokens (landmark [2, 16] + 2 flags + 8 x (8 coefficients + values [2, 16])), the basis
    # [8, 32], the last 4 tokens dense; all bf16
    ("shadowkv:rank=8", 2 * (12 * (34 + 8 * (8 + 32)) * 2 + 8 * 32 * 2 + 2 * 2 * 4 * 16 * 2)),
    ("shadowkv:rank=8,budget=0", 2 * (12 * 8 * (8 + 32) * 2 + 8 * 32 * 2 + 2 * 2 * 4 * 16 * 2)),
    ("shadowkv:rank=32", 25600),  # rank >= Hkv * D: stored dense
    # minicache, per group of G tokens: directions 2*G*2*16*2 (layer 0); norms 4*G*2*2, 2-byte offsets and exact K, V
    # of both layers for floor(retain*G) tokens per head (layer 1); the tokens after the last group dense in both
    ("minicache:start=0,retain=0.1,group=50",
     2 * (2 * 50 * 2 * 16 * 2 + 4 * 50 * 2 * 2 + 2 * 5 * 2 + 4 * 5 * 2 * 16 * 2)),
    ("minicache:start=0,retain=0.1", (2 * 64 * 2 * 16 * 2 + 4 * 64 * 2 * 2 + 2 * 6 * 2 + 4 * 6 * 2 * 16 * 2)
     + 36 * 4 * 2 * 16 * 2),
    ("minicache:start=0,retain=1", 25600),
    ("minicache:start=0.5,retain=0.1", 25600),  # only layer 1 left: no pair
    ("quest:budget=32,dense_layers=1", 25600 + 7 * 2 * 2 * 16 * 2),  # 7 pages of 16 on layer 1
    # snapkv keeps 25; kivi G16 R16: keys and values 16 quantized + 9 fp: codes 256, scales 2*2*2*(16+16)=256, fp 1152
    ("snapkv:keep=0.25+kivi:bits=2,group=16,residual=16", 2 * (256 + 256 + 1152)),
]


@pytest.mark.parametrize("text, expected", KV_BYTES)
def test_kv_bytes_hand_computed(text: str, expected: int) -> None:
    assert kv_bytes(text, TINY, 100) == expected


def test_kv_bytes_gemma_sliding_layers() -> None:
    gemma = ModelConfig.tiny("gemma3", num_kv_heads=2, num_heads=4, head_dim=16)  # 3 sliding (32) + 1 full layer
    sliding = 3 * 2 * 2 * 32 * 16 * 2
    assert kv_bytes("none", gemma, 100) == sliding + 2 * 2 * 100 * 16 * 2
    assert kv_bytes("snapkv:keep=0.25", gemma, 100) == sliding + 2 * 2 * 25 * 16 * 2
    assert kv_bytes("none", gemma, 100, dtype_bytes=4) == 2 * kv_bytes("none", gemma, 100)


def test_two_bit_is_an_eighth_of_bf16_plus_scales() -> None:
    big = ModelConfig.tiny(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64)
    tokens = 128 * 64  # a multiple of the residual: every key and value quantized, no full-precision tail
    quantized = 2 * tokens  # key tokens + value tokens in codes
    codes = 2 * quantized * 64 * 2 // 8
    assert codes * 8 == 2 * quantized * 64 * 2 * 2 // 2  # exactly 1/8 of the same tokens in bf16
    scales = 2 * 2 * 2 * (tokens // 32 * 64 + tokens * 64 // 32)  # scale + zero, float16
    assert kv_bytes("kivi:bits=2,group=32,residual=128", big, tokens) == codes + scales
    assert kv_bytes("kivi:bits=2,group=32,residual=128", big, tokens + 5) == codes + scales + 2 * 2 * 5 * 64 * 2
    assert kv_bytes("kivi:bits=2,group=32,residual=128", big, tokens) < kv_bytes("none", big, tokens) / 4


def test_head_score_file_round_trip(tmp_path) -> None:
    path = tmp_path / "heads.json"
    write_head_scores(path, [[0.1, 0.9], [0.3, 0.2]], model="tiny", method="test")
    scores = read_head_scores(path)
    assert scores.scores == ((0.1, 0.9), (0.3, 0.2)) and scores.model == "tiny"
    assert dict(scores.metadata) == {"method": "test"}
    doc = json.loads(path.read_text())
    assert doc["format"] == "longfit.head_scores" and doc["version"] == 1
    # head granularity: the 2 lowest of 4 heads stream, so no layer is fully streaming
    assert kept_tokens_per_layer(f"duo:heads={path},sinks=4,window=16,granularity=head", 2, 100) == [100, 100]
    # layer granularity: layer 1 has the lower best head
    assert kept_tokens_per_layer(f"duo:heads={path},sinks=4,window=16", 2, 100) == [100, 20]
    assert kept_tokens_per_layer(f"duo:heads={path},sinks=4,window=16,sparsity=0", 2, 100) == [100, 100]


@pytest.mark.parametrize("content, message", [
    ("not json", "not a readable JSON file"),
    (json.dumps({"format": "other", "version": 1}), "is not a longfit.head_scores version 1 file"),
    (json.dumps({"format": "longfit.head_scores", "version": 1, "num_layers": 1, "num_kv_heads": 2,
                 "scores": [[0.1, 2.0]]}), "numbers in [0, 1]"),
    (json.dumps({"format": "longfit.head_scores", "version": 1, "num_layers": 2, "num_kv_heads": 2,
                 "scores": [[0.1, 0.2]]}), "do not match"),
])
def test_bad_head_score_files(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="kv_compression") as error:
        read_head_scores(path)
    assert message in str(error.value)


def test_duo_needs_a_readable_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="needs heads=PATH"):
        kept_tokens_per_layer("duo", 2, 100)
    with pytest.raises(ValueError, match="cannot read"):
        kept_tokens_per_layer(f"duo:heads={tmp_path / 'missing.json'}", 2, 100)
    path = tmp_path / "h.json"
    write_head_scores(path, [[0.5]], model="one-layer")
    with pytest.raises(ValueError, match="heads has 1 layers, model has 2"):
        kept_tokens_per_layer(f"duo:heads={path}", 2, 100)
