"""Capacity planner (longfit/plan/): KV and weight bytes against hand counts, page accounting against a token-by-token
simulation of the engine's rule, users/context inversions, hardware profiles, fidelity files, CLI, invalid input."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from longfit.config import ModelConfig
from longfit.plan import cost_model as cm
from longfit.plan import planner as planner_module
from longfit.plan.hardware import get_preset, list_presets, load_profile_file, resolve_hardware, save_profile
from longfit.plan.planner import add_plan_arguments, kv_footprint, kv_tokens_held, load_fidelity, plan, run_plan_command

# ------------------------------------------------------------------------------------------- model shapes
SMOLLM2 = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, max_model_len=8192, rope_theta=1e5,
                      tie_word_embeddings=True, name="smollm2-135m")
GEMMA3 = ModelConfig(architecture="gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_layers=18,
                     num_heads=4, num_kv_heads=1, head_dim=256, max_model_len=32768, qk_norm=True,
                     hidden_act="gelu_tanh", sliding_window=512, tie_word_embeddings=True,
                     layer_types=tuple("full" if i % 6 == 5 else "sliding" for i in range(18)), name="gemma3-270m")
LLAMA3_8B = ModelConfig(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_model_len=131072,
                        rope_theta=5e5, name="llama-3-8b")
QWEN2_7B = ModelConfig(architecture="llama", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, max_model_len=131072,
                       attention_bias=True, name="qwen2-7b")

HF_CONFIGS = {  # hand-written config.json dicts, as the Hub publishes them (the fields the loader reads)
    "llama-3-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "max_position_embeddings": 8192, "vocab_size": 128256,
                   "rope_theta": 500000.0, "tie_word_embeddings": False, "rms_norm_eps": 1e-5},
    "qwen2-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                 "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "max_position_embeddings": 131072, "vocab_size": 152064,
                 "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28,
                 "tie_word_embeddings": False, "rope_theta": 1000000.0},
    "smollm2-135m": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                     "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192, "vocab_size": 49152,
                     "tie_word_embeddings": True, "rope_theta": 100000},
    "gemma-3-270m": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 640,
                     "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
                     "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 512, "sliding_window_pattern": 6,
                     "max_position_embeddings": 32768, "vocab_size": 262144, "query_pre_attn_scalar": 256},
}
HW = get_preset("xeon-avx512-2c")


def _plan(model: ModelConfig = SMOLLM2, **overrides: object) -> planner_module.Plan:
    kwargs: dict[str, object] = {"context": 2048, "users": None, "output_tokens": 0, "memory_bytes": 4 << 30,
                                 "weights": "bf16", "specs": ["none"], "hardware": HW}
    kwargs.update(overrides)
    return plan(model, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- KV bytes
@pytest.mark.parametrize(("model", "per_token"), [
    (SMOLLM2, 30 * 2 * 3 * 64 * 2),     # 23040
    (LLAMA3_8B, 32 * 2 * 8 * 128 * 2),  # 131072 = 128 KiB (methods.md §11.1)
    (QWEN2_7B, 28 * 2 * 4 * 128 * 2),   # 57344
])
def test_kv_bytes_per_token_full_attention(model: ModelConfig, per_token: int) -> None:
    assert per_token == {"smollm2-135m": 23040, "llama-3-8b": 131072, "qwen2-7b": 57344}[model.name]
    assert cm.full_kv_bytes(model, 1000) == 1000 * per_token
    result = _plan(model, context=4096, memory_bytes=None, kv_memory_bytes=8 << 30)
    spec = json.loads(result.to_json())["specs"][0]
    assert spec["kv_bytes_per_token"] == per_token and spec["kv_bytes_per_request"] == 4096 * per_token
    assert cm.full_kv_bytes(model, 10, dtype_bytes=4) == 10 * 2 * per_token


def test_gemma3_sliding_layers_are_capped_by_the_window() -> None:
    per_layer_token = 2 * 1 * 256 * 2  # 1024 B
    assert cm.full_kv_bytes(GEMMA3, 300) == 18 * 300 * per_layer_token  # below the window every layer holds all
    for tokens in (512, 513, 8192, 32768):
        expected = (3 * tokens + 15 * min(tokens, 512)) * per_layer_token
        assert cm.full_kv_bytes(GEMMA3, tokens) == expected
    result = _plan(GEMMA3, context=32768, memory_bytes=None, kv_memory_bytes=4 << 30)
    assert result.specs[0].kv_bytes_per_token == pytest.approx((3 * 32768 + 15 * 512) * 1024 / 32768)
    # pages: 3 full layers of ceil(T/32) pages, 15 sliding layers of at most ceil(512/32) + 1 = 17
    assert cm.full_kv_pages(GEMMA3, 32768) == 3 * 1024 + 15 * 17
    assert result.specs[0].kv_bytes_per_request_paged == (3 * 1024 + 15 * 17) * 32 * 1024


def _simulated_peak_pages(num_tokens: int, window: int | None, block_size: int) -> int:
    """Slow reference: grow a request token by token; after each step the engine holds the pages from the first
    one any future query can see (position t - window) to the last written token; record the maximum."""
    peak = 0
    for t in range(1, num_tokens + 1):
        first = 0 if window is None else max(0, t - window)
        peak = max(peak, (t - 1) // block_size - first // block_size + 1)
    return peak


@pytest.mark.parametrize("window", [None, 33, 40, 64, 100, 512])
@pytest.mark.parametrize("block_size", [8, 32])
def test_peak_pages_match_token_by_token_simulation(window: int | None, block_size: int) -> None:
    for num_tokens in (1, 7, 32, 33, 63, 64, 65, 100, 511, 512, 513, 600, 777):
        assert cm.peak_layer_pages(num_tokens, window, block_size) == _simulated_peak_pages(
            num_tokens, window, block_size), (num_tokens, window, block_size)


def test_pages_agree_with_engine_kv_spec() -> None:
    spec_module = pytest.importorskip("longfit.kv.spec")
    spec = spec_module.KVCacheSpec(num_layers=18, num_kv_heads=1, head_dim=256, block_size=32, dtype="bfloat16",
                                   dtype_bytes=2, num_blocks=1000,
                                   layer_windows=tuple(GEMMA3.layer_window(i) for i in range(18)))
    assert spec.page_bytes == cm.page_bytes(GEMMA3)
    for tokens in (1, 100, 512, 513, 1000, 4096, 32768):
        assert cm.full_kv_pages(GEMMA3, tokens) == spec.pages_for_tokens(tokens)


# ------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize(("model", "params"), [
    (LLAMA3_8B, 8_030_261_248), (QWEN2_7B, 7_615_616_512), (SMOLLM2, 134_515_008), (GEMMA3, 268_098_176),
])
def test_parameter_counts_match_published_totals(model: ModelConfig, params: int) -> None:
    assert cm.count_parameters(model) == params
    bf16 = cm.weight_bytes(model, cm.parse_weight_format("bf16"))
    assert bf16.total == 2 * params  # every parameter once, tied tables counted once


def test_weight_bytes_quantized_hand_count() -> None:
    d, ffn, q, kv, vocab, layers = 576, 1536, 576, 192, 49152, 30
    mats = [(q, d), (kv, d), (kv, d), (d, q), (ffn, d), (ffn, d), (d, ffn)]
    small = (layers * 2 * d + d) * 2  # norms, bf16
    embedding = vocab * d * 2
    int8 = cm.weight_bytes(SMOLLM2, cm.parse_weight_format("int8"))
    linear8 = layers * sum(o * i + 2 * o for o, i in mats)
    assert int8.total == embedding + (vocab * d + 2 * vocab) + linear8 + small  # tied: bf16 table + int8 head
    assert int8.read_per_step == int8.total - embedding
    for group in (32, 64, 128):
        fmt = cm.parse_weight_format(f"int4-g{group}")
        w4 = cm.weight_bytes(SMOLLM2, fmt)
        linear4 = layers * sum(o * i // 2 + o * math.ceil(i / group) * 4 for o, i in mats)
        head4 = vocab * d // 2 + vocab * math.ceil(d / group) * 4
        assert w4.total == embedding + head4 + linear4 + small
    untied = cm.weight_bytes(LLAMA3_8B, cm.parse_weight_format("int4"))
    assert untied.lm_head == 128256 * 4096 // 2 + 128256 * (4096 // 128) * 4
    assert 4.5e9 < untied.total < 5.5e9  # ~4.9 GB: int4 layers + bf16 embedding


# ------------------------------------------------------------------------------------------- capacity
def test_max_users_is_pages_over_pages_per_request() -> None:
    budget = 3 << 30
    result = _plan(LLAMA3_8B, context=8000, output_tokens=193, memory_bytes=None, kv_memory_bytes=budget)
    held = 8000 + 192
    assert result.kv_tokens_per_request == held
    page = 32 * 2 * 8 * 128 * 2
    pages = 32 * math.ceil(held / 32)
    assert result.specs[0].max_users == (budget // page - 1) // pages  # page 0 is the engine's null page
    assert result.specs[0].kv_bytes_per_request == held * 131072


@pytest.mark.parametrize("model", [SMOLLM2, GEMMA3])
def test_users_and_context_inversions_are_consistent(model: ModelConfig) -> None:
    base: dict[str, object] = {"memory_bytes": None, "kv_memory_bytes": 256 << 20, "output_tokens": 64}
    for context in (700, 2000, 5000):
        max_users = _plan(model, context=context, **base).specs[0].max_users
        assert max_users >= 1
        assert _plan(model, context=context, users=max_users, **base).specs[0].fits
        assert not _plan(model, context=context, users=max_users + 1, **base).specs[0].fits
        spec = _plan(model, context=context, users=max_users, **base).specs[0]
        assert spec.max_context >= context
        if spec.max_context_limited_by == "memory":
            assert _plan(model, context=spec.max_context, **base).specs[0].max_users >= max_users
            assert _plan(model, context=spec.max_context + 1, **base).specs[0].max_users < max_users


def test_memory_budget_subtracts_weights_and_reserve() -> None:
    result = _plan(SMOLLM2, memory_bytes=1 << 30, reserve_bytes=10 << 20)
    assert result.kv_budget_bytes == (1 << 30) - result.weight_bytes.total - (10 << 20)
    tight = _plan(SMOLLM2, memory_bytes=200 << 20, users=1)  # weights alone are 257 MiB
    assert tight.specs[0].max_users == 0 and tight.specs[0].fits is False and tight.notes
    assert _plan(LLAMA3_8B, memory_bytes=None, hardware=get_preset("h100-80gb-sxm")).memory_bytes == 80 << 30


def test_times_are_bandwidth_and_flop_bounds() -> None:
    h100 = get_preset("h100-80gb-sxm")
    result = _plan(LLAMA3_8B, context=8192, hardware=h100, memory_bytes=None, kv_memory_bytes=32 << 30)
    spec = result.specs[0]
    weights_read = 2 * 8_030_261_248 - 2 * 128256 * 4096  # the untied input embedding is only gathered from
    assert result.weight_bytes.read_per_step == weights_read
    assert spec.decode_batch1_s == pytest.approx((weights_read + 8192 * 131072) / 3.35e12)
    assert spec.decode_batch1_bound == "memory" and spec.throughput_batch1 == pytest.approx(1 / spec.decode_batch1_s)
    linear = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)
    flops = 2 * linear * 8192 + 2 * 128256 * 4096 + 4 * 32 * 128 * 32 * (8192 * 8193 // 2)
    assert cm.prefill_flops(LLAMA3_8B, 8192) == flops
    assert spec.prefill_s == pytest.approx(flops / 989.5e12) and spec.prefill_bound == "compute"
    assert spec.throughput_max_batch == pytest.approx(spec.max_batch / spec.decode_max_batch_s)
    assert spec.swap_host_s == pytest.approx(2 * spec.kv_bytes_per_request_paged / 64e9)


def test_prefill_flops_match_explicit_attention_count() -> None:
    model = ModelConfig.tiny("gemma3")  # 3 sliding layers (window 32) + 1 full
    n = 100
    keys = sum(min(i + 1, model.layer_window(layer) or n + 1) for layer in range(model.num_layers) for i in range(n))
    linear = cm.linear_parameters(model)
    expected = 2 * linear * n + 2 * model.vocab_size * model.hidden_size + 4 * model.num_heads * model.head_dim * keys
    assert cm.prefill_flops(model, n) == expected


# ------------------------------------------------------------------------------------------- invalid input
@pytest.mark.parametrize(("overrides", "field"), [
    ({"users": -1}, "users"), ({"users": 0}, "users"), ({"context": 0}, "context"),
    ({"context": 8192, "output_tokens": 1}, "context"), ({"output_tokens": -5}, "output_tokens"),
    ({"weights": "int3"}, "weights"), ({"block_size": 12}, "block_size"), ({"min_retention": 1.5}, "min_retention"),
    ({"memory_bytes": None, "hardware": HW}, "memory"),
])
def test_invalid_inputs_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _plan(SMOLLM2, **overrides)


def test_context_beyond_limit_needs_extrapolation() -> None:
    with pytest.raises(ValueError, match="max_model_len=8192"):
        _plan(SMOLLM2, context=16384)
    result = _plan(SMOLLM2, context=16384, allow_extrapolation=True, memory_bytes=None, kv_memory_bytes=1 << 30)
    assert result.specs[0].kv_bytes_per_request == 16384 * 23040 and result.specs[0].max_context > 16384


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ValueError, match="h100-80gb-sxm"):
        resolve_hardware("tpu-v9")
    for name in ("a100-40gb", "a100-80gb", "h100-80gb-sxm", "l4", "rtx-4090", "apple-m2", "apple-m3",
                 "xeon-avx512-2c", "xeon-avx512-64c"):
        assert name in list_presets() and get_preset(name).source


# ------------------------------------------------------------------------------------------- hardware files
def test_profile_files_and_calibration_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGFIT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="--calibrate"):
        resolve_hardware("this")
    measured = cm.HardwareProfile("this", "cpu", 38e9, 700e9, 180e9, memory_bytes=24 << 30, measured=True)
    path = save_profile(measured, measurements={"runs": [1, 2]})
    assert path == tmp_path / "cache" / "hardware.json"
    assert resolve_hardware("this") == measured
    yaml_file = tmp_path / "box.yaml"
    yaml_file.write_text("kind: cpu\nmemory_bandwidth: 38 GB/s\nbf16_flops: 0.7 TFLOPS\nfp32_flops: 180 GFLOP/s\n"
                         "memory_bytes: 24GiB\ndisk_read_bandwidth: 2e9\n")
    pytest.importorskip("yaml")
    loaded = resolve_hardware(str(yaml_file))
    assert (loaded.name, loaded.memory_bandwidth, loaded.bf16_flops, loaded.fp32_flops) == ("box", 38e9, 7e11, 1.8e11)
    assert loaded.memory_bytes == 24 << 30 and loaded.disk_read_bandwidth == 2e9
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"memory_bandwidth": "fast", "bf16_flops": 1, "fp32_flops": 1}))
    with pytest.raises(ValueError, match="memory_bandwidth"):
        load_profile_file(bad)


# ------------------------------------------------------------------------------------------- specs and fidelity
def test_quantized_specs_include_scales_and_kivi_residual() -> None:
    pytest.importorskip("longfit.compression.spec")
    h, d, layers = 3, 64, 30
    for prompt, output in ((2048, 0), (2048, 100), (1000, 1)):
        n = kv_tokens_held(prompt, output)
        qk = qv = n - n % 128  # KIVI: keys and values flush together in whole residual blocks
        codes = h * (qk + qv) * d * 2 // 8
        scales = 2 * 2 * h * (qk // 32 * d + qv * d // 32)  # fp16 scale + zero per group of 32
        residual = h * ((n - qk) + (n - qv)) * d * 2
        footprint = kv_footprint(SMOLLM2, "kivi:bits=2,group=32,residual=128", prompt, output)
        assert footprint.exact_bytes == layers * (codes + scales + residual), (prompt, output)
        page = 32 * 2 * h * d * 2  # the engine packs the quantized records into pages, then the fp tail's pages
        assert footprint.paged_bytes == layers * (-(-(codes + scales) // page) + -(-(n - qk) // 32)) * page
        mixed = kv_footprint(SMOLLM2, "kivi:bits=2,key_bits=4", prompt, output)  # 4-bit keys, 2-bit values
        assert mixed.exact_bytes == layers * (h * (4 * qk + 2 * qv) * d // 8 + scales + residual), (prompt, output)
        int8 = kv_footprint(SMOLLM2, "int8", prompt, output)
        assert int8.exact_bytes == layers * 2 * h * n * (d + 2)  # int8 codes + one fp16 scale per token and head


def test_evicting_spec_pages_are_exact() -> None:
    pytest.importorskip("longfit.compression.spec")
    prompt, output = 4000, 50
    footprint = kv_footprint(SMOLLM2, "snapkv:keep=0.25", prompt, output)
    per_layer = 1000 + output - 1  # the prompt is compressed once; generated tokens are appended
    assert footprint.exact_bytes == 30 * per_layer * 2 * 3 * 64 * 2
    assert footprint.paged_bytes == 30 * math.ceil(per_layer / 32) * cm.page_bytes(SMOLLM2)
    quest = kv_footprint(SMOLLM2, "quest:budget=512,page=16,dense_layers=2", prompt)
    assert quest.exact_bytes == cm.full_kv_bytes(SMOLLM2, prompt) + 28 * math.ceil(prompt / 16) * 2 * 3 * 64 * 2
    assert quest.read_bytes < quest.exact_bytes / 4  # 28 of 30 layers read 512 of 4000 tokens


def test_specs_and_cheapest_spec_meeting_retention(tmp_path: Path) -> None:
    pytest.importorskip("longfit.compression.spec")
    rows = [{"spec": "none", "task": t, "length": 4096, "score": 80.0} for t in ("niah", "vt")]
    rows += [{"spec": "SnapKV:keep=0.5", "task": "niah", "length": 4096, "score": 78.0},
             {"spec": "snapkv:keep=0.5", "task": "vt", "length": 4096, "score": 76.0},
             {"spec": "snapkv:keep=0.25", "task": "niah", "length": 4096, "retention": 0.8},
             {"spec": "snapkv:keep=0.25", "task": "niah", "length": 1024, "retention": 0.99}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(rows))
    result = _plan(SMOLLM2, context=4096, specs=["none", "snapkv:keep=0.5", "snapkv:keep=0.25", "kivi"],
                   fidelity=str(path), min_retention=0.95, memory_bytes=None, kv_memory_bytes=256 << 20)
    none, half, quarter, kivi = result.specs
    assert half.kv_bytes_per_request == none.kv_bytes_per_request // 2 and half.compression_rate == pytest.approx(2)
    assert half.retention == pytest.approx((78 / 80 + 76 / 80) / 2) and half.retention_tasks == 2
    assert quarter.retention == pytest.approx(0.8) and quarter.retention_length == 4096  # nearest length wins
    assert none.retention == 1.0 and kivi.retention is None and kivi.meets_min_retention is False
    assert result.cheapest_spec == "snapkv:keep=0.5"
    # the prompt is resident uncompressed during prefill, so one request's peak is the full prompt
    assert half.prefill_peak_kv_bytes == none.kv_bytes_per_request_paged
    capacity = (result.kv_budget_bytes // result.page_bytes - 1) * result.page_bytes
    assert half.max_users == 1 + (capacity - none.kv_bytes_per_request_paged) // half.kv_bytes_per_request_paged
    with pytest.raises(ValueError, match="unknown method"):
        _plan(SMOLLM2, specs=["snapkvv:keep=0.5"])
    path.write_text(json.dumps([{"spec": "none", "task": "x"}]))
    with pytest.raises(ValueError, match="entry 0"):
        load_fidelity(path)


# ------------------------------------------------------------------------------------------- HF configs, CLI
def test_hf_configs_plan_like_hand_built_configs() -> None:
    loader = pytest.importorskip("longfit.models.model_config")
    for name, model in (("llama-3-8b", LLAMA3_8B), ("qwen2-7b", QWEN2_7B), ("smollm2-135m", SMOLLM2),
                        ("gemma-3-270m", GEMMA3)):
        parsed = loader.model_config_from_hf(HF_CONFIGS[name], name)
        assert cm.count_parameters(parsed) == cm.count_parameters(model), name
        assert cm.full_kv_bytes(parsed, 4096) == cm.full_kv_bytes(model, 4096), name
        assert parsed.layer_types == model.layer_types, name


def test_cli_json_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("longfit.models.model_config")
    config = tmp_path / "smollm2" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(HF_CONFIGS["smollm2-135m"]))
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    png = tmp_path / "users.png"
    args = parser.parse_args(["--model", str(config), "--context", "2k", "--users", "8", "--memory", "2GiB",
                              "--hardware", "xeon-avx512-8c", "--json", "--plot", str(png)])
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        assert run_plan_command(args) == 0
    data = json.loads(out.getvalue())
    assert data["specs"][0]["kv_bytes_per_token"] == 23040 and data["specs"][0]["fits"] is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = parser.parse_args(["--model", str(config), "--users", "-3", "--memory", "2GiB", "--hardware", "l4"])
    assert run_plan_command(bad) == 2


def test_plan_package_imports_no_torch() -> None:
    code = ("import sys, longfit.plan.planner, longfit.plan.report, longfit.plan.hardware; "
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, check=False).returncode == 0


# ------------------------------------------------------------------------------------------- engine overheads
OVERHEADS = {"step_overhead_s": 2e-3, "step_overhead_per_seq_s": 5e-4, "step_overhead_per_layer_s": 3e-4,
             "step_overhead_per_seq_layer_s": 1e-5, "kv_read_factor": 4.0}


@pytest.mark.parametrize("name", sorted(OVERHEADS))
@pytest.mark.parametrize("bad", [-1e-3, math.nan, math.inf, True, "1 ms", None])
def test_overhead_fields_validate(name: str, bad: object) -> None:
    with pytest.raises(ValueError, match=f"HardwareProfile.{name} must be a finite number >= "):
        cm.HardwareProfile("x", "cpu", 20e9, 1e12, 5e11, **{name: bad})  # type: ignore[arg-type]
    if name == "kv_read_factor":  # a factor below 1 would make KV cheaper than the bound
        with pytest.raises(ValueError, match="kv_read_factor must be a finite number >= 1"):
            cm.HardwareProfile("x", "cpu", 20e9, 1e12, 5e11, kv_read_factor=0.5)
    assert not get_preset("xeon-avx512-2c").has_engine_overheads  # presets stay pure lower bounds


def test_zero_overheads_give_exactly_the_lower_bounds() -> None:
    explicit_zero = dataclasses.replace(HW, step_overhead_s=0.0, step_overhead_per_layer_s=0.0, kv_read_factor=1.0)
    shape: dict[str, object] = {"context": 2048, "users": 4, "output_tokens": 64, "memory_bytes": None,
                                "kv_memory_bytes": 1 << 30}
    result = _plan(SMOLLM2, hardware=explicit_zero, **shape)
    spec = result.specs[0]
    wb, kv = result.weight_bytes.read_per_step, cm.full_kv_bytes(SMOLLM2, 2048)
    flops = cm.decode_flops(SMOLLM2, 2048)

    def old(batch: int) -> float:  # the planner's decode formula before overheads existed
        return cm.step_time(wb + batch * kv, batch * flops, HW.memory_bandwidth, HW.bf16_flops).seconds

    assert spec.decode_batch1_s == old(1) == spec.decode_batch1_lower_bound_s
    assert spec.decode_users_s == old(4) == spec.decode_users_lower_bound_s
    assert spec.decode_max_batch_s == old(spec.max_batch) == spec.decode_max_batch_lower_bound_s
    assert spec.throughput_batch1 == 1.0 / old(1)
    assert result.decode_time_basis == "lower_bound"
    assert json.loads(result.to_json())["specs"] == json.loads(_plan(SMOLLM2, **shape).to_json())["specs"]
    from longfit.plan.report import format_plan

    assert "decode times are lower bounds" in format_plan(result)


def test_calibrated_overheads_hand_computed() -> None:
    hw = cm.HardwareProfile("this", "cpu", 20e9, 1e12, 5e11, measured=True, **OVERHEADS)
    result = _plan(SMOLLM2, context=2048, users=4, output_tokens=0, memory_bytes=None, kv_memory_bytes=1 << 30,
                   hardware=hw)
    spec = result.specs[0]
    weights, kv = 269_030_016, 2048 * 23040  # SmolLM2 bf16, tied: every byte read per step; 47,185,920 B of KV
    bound1 = (weights + kv) / 20e9  # memory-bound: 2 · 134.5M FLOP per token is 0.3 ms at 1 TFLOP/s
    overhead1 = 2e-3 + 5e-4 + 30 * (3e-4 + 1e-5) + 3.0 * kv / 20e9
    assert spec.decode_batch1_lower_bound_s == pytest.approx(bound1, rel=1e-12)
    # 15.8108 ms bound + 2 + 0.5 + 30 · 0.31 = 11.8 ms fixed + 3 · 2.3593 ms of extra KV traffic = 34.6887 ms
    assert spec.decode_batch1_s == pytest.approx(bound1 + overhead1, rel=1e-12)
    assert spec.decode_batch1_s == pytest.approx(0.0346886848, rel=1e-9)
    bound4 = (weights + 4 * kv) / 20e9
    overhead4 = 2e-3 + 4 * 5e-4 + 30 * (3e-4 + 4 * 1e-5) + 3.0 * 4 * kv / 20e9
    assert spec.decode_users_s == pytest.approx(bound4 + overhead4, rel=1e-12)
    assert spec.throughput_users == pytest.approx(4 / (bound4 + overhead4), rel=1e-12)
    assert spec.decode_batch1_bound == "memory" and result.decode_time_basis == "calibrated_estimate"
    data = json.loads(result.to_json())
    assert data["decode_time_basis"] == "calibrated_estimate" and data["hardware"]["kv_read_factor"] == 4.0
    assert data["specs"][0]["decode_batch1_lower_bound_s"] == pytest.approx(bound1)
    from longfit.plan.report import format_plan

    text = format_plan(result)
    assert "calibrated estimates" in text and "decode / token, batch 1 (estimate)" in text
    assert "decode / token, batch 1 (lower bound)" in text and "prefill (lower bound)" in text


def _synthetic_samples(coefficients: dict[str, float], bandwidth: float) -> list[object]:
    from longfit.plan.overheads import StepSample

    samples = []
    for layers in (1, 12):
        for batch in (1, 4, 8):
            for kv_tokens in ((32, 2048, 8192) if layers == 1 else (32,)):
                kv = batch * layers * kv_tokens * 768
                bound = (layers * 7e6 + 57e6 + kv) / bandwidth
                extra = sum(c * t for c, t in zip(
                    [coefficients[f] - (f == "kv_read_factor") for f in cm.OVERHEAD_FIELDS],
                    cm.overhead_terms(layers, batch, kv, bandwidth)))
                samples.append(StepSample(layers, batch, kv, bound, bound + extra))
    return samples


@pytest.mark.parametrize("truth", [
    OVERHEADS,
    {**OVERHEADS, "step_overhead_per_seq_s": 0.0, "kv_read_factor": 1.0},  # on the boundary of the constraints
])
def test_fit_recovers_known_coefficients(truth: dict[str, float]) -> None:
    from longfit.plan.overheads import fit_overheads

    fit = fit_overheads(_synthetic_samples(truth, 25e9), 25e9)
    for name, value in truth.items():
        assert fit.coefficients[name] == pytest.approx(value, rel=1e-6, abs=1e-12), name
    assert fit.rms_relative_error < 1e-9


def test_fit_is_nonnegative_and_needs_identifiable_points() -> None:
    from longfit.plan.overheads import StepSample, fit_overheads

    rng = random.Random(0)
    noisy = [dataclasses.replace(s, measured_s=s.measured_s * (1 + 0.03 * rng.uniform(-1, 1)))
             for s in _synthetic_samples(OVERHEADS, 25e9)]
    fit = fit_overheads(noisy, 25e9)
    assert fit.coefficients["step_overhead_per_layer_s"] == pytest.approx(3e-4, rel=0.2)
    assert fit.coefficients["kv_read_factor"] == pytest.approx(4.0, rel=0.2)
    assert all(v >= 0 for v in fit.coefficients.values()) and fit.rms_relative_error < 0.05
    # measured below the bound everywhere: nothing to attribute, every coefficient stays at its floor
    fast = [dataclasses.replace(s, measured_s=s.lower_bound_s * 0.9) for s in noisy]
    assert fit_overheads(fast, 25e9).coefficients == {**dict.fromkeys(cm.OVERHEAD_FIELDS, 0.0), "kv_read_factor": 1.0}
    one_layer_count = [s for s in noisy if s.num_layers == 1]
    with pytest.raises(ValueError, match="two layer counts"):
        fit_overheads(one_layer_count, 25e9)
    with pytest.raises(ValueError, match="at least 5"):
        fit_overheads(noisy[:3], 25e9)
    with pytest.raises(ValueError, match="measured_s"):
        StepSample(1, 1, 0.0, 1e-3, 0.0)


def test_profile_round_trips_overheads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGFIT_CACHE_DIR", str(tmp_path / "cache"))
    measured = cm.HardwareProfile("this", "cpu", 38e9, 700e9, 180e9, measured=True, **OVERHEADS)
    save_profile(measured, measurements={"engine_overheads": {"points": [{"batch": 1, "measured_s": 0.01}]}})
    assert resolve_hardware("this") == measured
    saved = json.loads((tmp_path / "cache" / "hardware.json").read_text())
    assert saved["kv_read_factor"] == 4.0 and saved["measurements"]["engine_overheads"]["points"]
    written = tmp_path / "box.json"
    written.write_text(json.dumps({"memory_bandwidth": "38 GB/s", "bf16_flops": 1e12, "fp32_flops": 1e11,
                                   "step_overhead_s": "2 ms", "step_overhead_per_layer_s": "300 us",
                                   "step_overhead_per_seq_layer_s": 1e-5, "kv_read_factor": 4}))
    loaded = load_profile_file(written)
    assert loaded.step_overhead_s == pytest.approx(2e-3) and loaded.step_overhead_per_layer_s == pytest.approx(3e-4)
    assert loaded.step_overhead_per_seq_s == 0.0 and loaded.kv_read_factor == 4 and loaded.has_engine_overheads
    old = tmp_path / "old.json"  # a calibration from before the overhead fields: a pure lower bound
    old.write_text(json.dumps({"memory_bandwidth": 38e9, "bf16_flops": 1e12, "fp32_flops": 1e11, "measured": True}))
    assert not load_profile_file(old).has_engine_overheads
    assert any("no engine overheads" in n for n in _plan(hardware=load_profile_file(old)).notes)
    for bad, field in (({"step_overhead_s": "fast"}, "step_overhead_s"), ({"kv_read_factor": 0.9}, "kv_read_factor"),
                       ({"step_overhead_per_seq_s": -1}, "step_overhead_per_seq_s")):
        written.write_text(json.dumps({"memory_bandwidth": 1e9, "bf16_flops": 1e9, "fp32_flops": 1e9, **bad}))
        with pytest.raises(ValueError, match=field):
            load_profile_file(written)
    from longfit.plan.report import format_presets

    listing = format_presets()
    assert "this: decode overheads 2.00 ms/step + 500.0 µs/seq + 300.0 µs/layer + 10.0 µs/seq/layer, KV read x4.00" \
        in listing


def test_engine_step_measurement_fits_finite_overheads() -> None:
    """The real engine decode step, timed at tiny size (<10 s): the fitted coefficients are finite and >= 0."""
    pytest.importorskip("torch")
    from longfit.bench.calibrate import calibrate_engine

    base = ModelConfig.tiny("llama", num_layers=1, max_model_len=512, tie_word_embeddings=True)
    points = ((1, 1, 8), (1, 2, 8), (1, 1, 200), (1, 2, 200), (3, 1, 8), (3, 2, 8))
    profile = cm.HardwareProfile("this", "cpu", 20e9, 1e11, 5e10, measured=True)
    dequant_points = ((1, 1, 200, "kivi:bits=2"), (3, 1, 300, "kivi:bits=2"))
    fitted, raw = calibrate_engine(profile, points, base, steps=3, rounds=1, flush_bytes=1 << 20,
                                   dequant_points=dequant_points, dequant_steps=4)
    assert [(p["num_layers"], p["batch"], p["depth"]) for p in raw["points"]] == list(points)
    assert [(p["num_layers"], p["batch"], p["depth"], p["spec"]) for p in raw["dequant_points"]] == list(dequant_points)
    assert all(p["dequant_elements"] > 0 and math.isfinite(p["fit_relative_error"]) for p in raw["dequant_points"])
    assert all(len(p["step_times_s"]) == 2 and len(p["step_times_s"][0]) == 4 for p in raw["dequant_points"])
    for name in cm.STREAM_COST_FIELDS:
        costs = dict(getattr(fitted, name))
        assert list(costs) == ["kivi:bits=2"] and math.isfinite(costs["kivi:bits=2"]) and costs["kivi:bits=2"] >= 0
        assert raw["fit"][name] == costs
    assert all(p["measured_s"] > 0 and len(p["step_times_s"][0]) == 3 for p in raw["points"])
    for name in cm.OVERHEAD_FIELDS:
        value = getattr(fitted, name)
        assert math.isfinite(value) and value >= (1.0 if name == "kv_read_factor" else 0.0), name
        assert raw["fit"][name] == value
    assert fitted.memory_bandwidth == profile.memory_bandwidth and fitted.has_engine_overheads


def test_quantized_streams_add_their_expansion_cost_to_decode() -> None:
    """KIVI-2 on SmolLM2 at 2k: the footprint counts the layers holding a quantized stream and the K/V elements of
    each stream (the tokens before the residual window, in whole groups); a profile's stream costs add exactly
    that many layer- and element-costs per sequence to each decode step, nothing to the full cache or eviction."""
    from longfit.compression.storage import kivi_split

    model = SMOLLM2
    fp = kv_footprint(model, "kivi:bits=2", 2048)
    stream = kivi_split(2048, 32, 128)[0]
    assert 0 < stream <= 2048 and stream % 32 == 0
    assert fp.streams == cm.StreamRead("kivi:bits=2", model.num_layers,
                                       model.num_layers * stream * 2 * model.num_kv_heads * model.head_dim)
    assert kv_footprint(model, "none", 2048).streams == cm.StreamRead()
    assert kv_footprint(model, "snapkv:keep=0.25", 2048).streams == cm.StreamRead()
    base = cm.HardwareProfile("x", "cpu", 20e9, 1e11, 5e10, step_overhead_s=1e-3)
    slow = dataclasses.replace(base, kv_dequant_s_per_element={"kivi:bits=2": 2e-9, "int8": 1e-9},
                               kv_stream_layer_s={"kivi:bits=2": 1e-4, "int8": 3e-4})
    assert slow.stream_costs("int8") == (3e-4, 1e-9) and slow.stream_costs(None) == (0.0, 0.0)
    assert slow.stream_costs("kvquant:bits=4") == (1e-4, 2e-9)  # untimed: the format with the dearest element
    kwargs = dict(context=2048, users=4, output_tokens=1, memory_bytes=8 << 30, weights="bf16",
                  specs=["none", "kivi:bits=2"])
    fast_plan, slow_plan = plan(model, hardware=base, **kwargs), plan(model, hardware=slow, **kwargs)
    extra = 2e-9 * fp.streams.elements + 1e-4 * model.num_layers
    assert slow_plan.specs[0].decode_batch1_s == fast_plan.specs[0].decode_batch1_s
    assert slow_plan.specs[1].decode_batch1_s == pytest.approx(fast_plan.specs[1].decode_batch1_s + extra, rel=1e-9)
    assert slow_plan.specs[1].decode_users_s == pytest.approx(fast_plan.specs[1].decode_users_s + 4 * extra, rel=1e-9)
    with pytest.raises(ValueError, match="kv_dequant_s_per_element"):
        dataclasses.replace(base, kv_dequant_s_per_element={"int8": -1.0})


def test_profile_with_expansion_costs_round_trips_through_json(tmp_path: Path) -> None:
    profile = cm.HardwareProfile("this", "cpu", 20e9, 1e11, 5e10, measured=True, step_overhead_s=1e-3,
                                 kv_dequant_s_per_element={"kivi:bits=2": 1.2e-8, "int8": 3.8e-9},
                                 kv_stream_layer_s={"kivi:bits=2": 2e-4})
    written = save_profile(profile, tmp_path / "hw.json")
    loaded = load_profile_file(written)
    assert loaded == profile and dict(loaded.kv_dequant_s_per_element)["int8"] == 3.8e-9


def test_stream_cost_fit_recovers_both_costs_and_stays_nonnegative() -> None:
    pytest.importorskip("torch")
    from longfit.bench.calibrate import _nonnegative_fit2

    rows = [(30.0, 5e6, 30 * 2e-4 + 5e6 * 4e-9), (30.0, 2e7, 30 * 2e-4 + 2e7 * 4e-9)]
    a, b = _nonnegative_fit2(rows)
    assert a == pytest.approx(2e-4, rel=1e-6) and b == pytest.approx(4e-9, rel=1e-6)
    # a longer stream that costs less than a shorter one: no negative element cost, the per-layer one takes it all
    a, b = _nonnegative_fit2([(30.0, 5e6, 0.02), (30.0, 2e7, 0.01)])
    assert b == 0.0 and a == pytest.approx(0.015 / 30)


def test_calibration_stability_flags_a_machine_whose_speed_moved() -> None:
    """Round spread = slowest round's median / fastest's - 1 per point; a 2x swing or a bandwidth drop is unsteady."""
    from longfit.bench.calibrate import STEADY_LIMIT, round_spread, stability

    steady_points = [{"step_times_s": [[0.010, 0.011, 0.012], [0.0105, 0.011, 0.0115]]},
                     {"step_times_s": [[0.020, 0.020], [0.021, 0.022]]},
                     {"step_times_s": [[0.030]]}]  # one round: no spread
    assert round_spread(steady_points) == pytest.approx([0.0, 0.075])
    result = stability(20e9, 19e9, steady_points)
    assert result["steady"] and result["bandwidth_drift"] == pytest.approx(-0.05)
    assert result["round_spread_median"] == pytest.approx(0.0375) and result["round_spread_max"] == pytest.approx(0.075)
    moved = [{"step_times_s": [[0.050, 0.051], [0.100, 0.104]]}, {"step_times_s": [[0.020], [0.041]]}]
    assert not stability(20e9, 20e9, moved)["steady"]  # rounds 2x apart
    assert not stability(28e9, 15e9, steady_points)["steady"]  # bandwidth fell by 46%
    assert stability(20e9, 20e9 * (1 + STEADY_LIMIT / 2), [])["round_spread_median"] is None
