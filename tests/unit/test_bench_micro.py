"""`longfit bench decode|prefill|context`: plans, alternation, roofline bytes and the table, with fake engines."""

from __future__ import annotations

import argparse
import math

import pytest

from longfit.bench import decode as bench
from longfit.bench.decode import EngineResult, Figure
from longfit.bench.peers import PeerProcess, PeerSpec, PeerUnavailable, prompt_ids


def _args(**overrides) -> argparse.Namespace:
    base = dict(repeats=3, decode_tokens=8, batch_sizes="1,4,16", prompt_tokens=512, depth=16, lengths="512,4k",
                depths="0,2k,8k")
    base.update(overrides)
    return argparse.Namespace(**base)


def test_parse_counts_accepts_k_and_zero():
    assert bench.parse_counts("0,2k,8k", "--depths") == (0, 2048, 8192)
    assert bench.parse_counts("512, 4096", "--lengths") == (512, 4096)
    for bad in ("", "a", "-1", "1,,2"):
        with pytest.raises(ValueError, match="--depths"):
            bench.parse_counts(bad, "--depths")


def test_plans_of_each_command_fit_the_context():
    decode = bench.build_plan("decode", _args(), max_context=8192)
    assert [f.kind for f in decode] == ["prefill", "decode", "decode", "decode"]
    assert [f.batch for f in decode[1:]] == [1, 4, 16] and all(f.depth == 16 for f in decode[1:])
    assert [f.length for f in bench.build_plan("prefill", _args(), 8192)] == [512, 4096]
    context = bench.build_plan("context", _args(), 8192)
    assert [f.depth for f in context] == [0, 2048, 8192 - 8 - 2]  # 8k is cut so depth + decode fits
    assert bench.build_plan("decode", _args(prompt_tokens=0), 8192)[0].kind == "decode"
    with pytest.raises(ValueError, match="--repeats"):
        bench.build_plan("decode", _args(repeats=0), 8192)
    with pytest.raises(ValueError, match="--batch-sizes"):
        bench.build_plan("decode", _args(batch_sizes="0"), 8192)


class _Fake:
    def __init__(self, name: str, log: list[str], rate: float) -> None:
        self.name, self.log, self.rate = name, log, rate

    def prefill(self, length, seed):
        self.log.append(self.name)
        return self.rate * 2

    def decode(self, batch, depth, tokens, seed):
        self.log.append(self.name)
        return self.rate * batch


def test_measure_warms_up_then_alternates_engines():
    log: list[str] = []
    engines = [("a", _Fake("a", log, 10.0)), ("b", _Fake("b", log, 5.0))]
    figures = [Figure("prefill", length=8), Figure("decode", batch=2, depth=4, tokens=3)]
    runs = bench.measure(figures, engines, repeats=3, progress=False)
    # Per figure: warm-up a,b; then rounds alternate their order (b,a / a,b / b,a).
    assert log[:8] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert runs["a"]["prefill 8 tokens"] == [20.0] * 3 and runs["b"]["decode batch 2, depth 4"] == [10.0] * 3


def test_measure_calls_before_figure_once_per_figure():
    log: list[str] = []
    engines = [("a", _Fake("a", log, 10.0))]
    figures = [Figure("prefill", length=8), Figure("decode", batch=2, depth=4, tokens=3)]
    bench.measure(figures, engines, repeats=1, progress=False, before_figure=lambda: log.append("sample"))
    assert log == ["sample", "a", "a", "sample", "a", "a"]


@pytest.mark.skipif(not bench._reset_peak_rss(), reason="the peak RSS cannot be reset here (not Linux)")
def test_bandwidth_samples_do_not_count_in_the_peak_rss():
    """A sample between figures allocates its buffer; the reported peak must stay the runs' own."""
    from longfit.bench.peers import peak_rss_bytes

    import torch

    held = torch.ones(64 << 18)  # 64 MiB touched, then freed: a peak from before the sampler (the model's load)
    del held
    loaded = peak_rss_bytes()
    sampler = bench.BandwidthSampler(256 << 20, repeats=1)
    assert sampler.peak_rss(0) >= loaded  # kept, though creating the sampler reset the high-water mark
    before = peak_rss_bytes()
    sampler.between()
    sampler.between()
    assert len(sampler.samples) == 2 and all(s > 0 for s in sampler.samples)
    assert peak_rss_bytes() < before + (128 << 20)  # the 256 MiB buffer is not in the current high-water mark
    assert sampler.peak_rss(peak_rss_bytes()) >= before
    median = sampler.final()
    assert len(sampler.samples) == 3 and median == sorted(sampler.samples)[1]


def test_render_names_the_bandwidth_samples():
    figures = [Figure("decode", batch=1, depth=0, tokens=4)]
    info = {"weight_bytes": 2**20, "kv_element_bytes": 2.0, "weights": "int4"}
    ours = EngineResult("longfit", info, {"decode batch 1, depth 0": [50.0]}, 2**30)
    text = "\n".join(bench.render("context", [ours], figures, bandwidth=20e9, kv_elements=64, layer_windows=(None,),
                                  header=[], bandwidth_samples=[18e9, 20e9, 25e9]))
    assert "20.00 GB/s (median of 3 samples" in text and "18.0-25.0 GB/s" in text


def test_step_bytes_counts_weights_once_and_kv_per_sequence():
    info = {"weight_bytes": 1000, "kv_element_bytes": 2.0}
    figure = Figure("decode", batch=4, depth=100, tokens=9)  # mean depth 100 + 5 = 105
    full = bench.step_bytes(info, figure, kv_bytes_per_token_element=8, layer_windows=(None, None))
    assert full == pytest.approx(1000 + 4 * (2 * 105) * 8 * 2)
    windowed = bench.step_bytes(info, figure, 8, layer_windows=(None, 32))
    assert windowed == pytest.approx(1000 + 4 * (105 + 32) * 8 * 2)


def test_step_bytes_takes_the_kv_the_engine_measured():
    """longfit reports the KV its requests held while timed: a compressed cache reads less than the estimate."""
    figure = Figure("decode", batch=1, depth=4096, tokens=16)
    info = {"weight_bytes": 1000, "kv_element_bytes": 2.0, "kv_read_bytes": {figure.label: 5000.0}}
    assert bench.step_bytes(info, figure, 8, layer_windows=(None,)) == 6000
    other = Figure("decode", batch=4, depth=4096, tokens=16)  # not measured: the estimate
    assert bench.step_bytes(info, other, 8, layer_windows=(None,)) > 6000


def test_longfit_backend_measures_the_kv_held_while_decoding():
    from tests.conftest import make_tiny_llm

    held = {}
    for spec in (None, "snapkv:keep=0.25"):
        backend = bench.LongfitBackend(make_tiny_llm(kv_compression=spec))
        backend.decode(batch=1, depth=400, tokens=4, seed=0)
        held[spec] = backend.info()["kv_read_bytes"][Figure("decode", batch=1, depth=400).label]
    page = make_tiny_llm().engine.kv_spec.page_bytes
    layers = make_tiny_llm().engine.model_config.num_layers
    assert held[None] >= layers * (400 // 8) * page  # every token's page in every layer
    assert held["snapkv:keep=0.25"] < 0.4 * held[None]


def test_render_prints_ratios_roofline_and_rss():
    figures = [Figure("prefill", length=512), Figure("decode", batch=1, depth=0, tokens=4)]
    info = {"weight_bytes": 100 * 2**20, "kv_element_bytes": 2.0, "weights": "int4"}
    ours = EngineResult("longfit", info, {"prefill 512 tokens": [400.0], "decode batch 1, depth 0": [50.0]}, 2**30)
    peer = EngineResult("llama.cpp", info | {"weights": "GGUF Q4_1"},
                        {"prefill 512 tokens": [200.0], "decode batch 1, depth 0": [100.0]}, 2**29)
    text = "\n".join(bench.render("decode", [ours, peer], figures, bandwidth=10e9, kv_elements=64,
                                  layer_windows=(None,), header=["head"]))
    assert "2.00x" in text and "0.50x" in text  # prefill 400/200, decode 50/100
    roofline = [line for line in text.splitlines() if "% of roofline" in line][0]
    assert f"{100 * (100 * 2**20 + 3.5 * 64 * 2) * 50 / 10e9:.1f}" in roofline
    assert "peak RSS MiB" in text and "1024" in text and "GB/s" in text and "GGUF Q4_1" in text
    assert math.isnan(EngineResult("x", info).value(figures[0]))
    assert EngineResult("x", info, {"prefill 512 tokens": [1.0, 3.0, 2.0]}).value(figures[0], "best") == 3.0


def test_prompts_are_shared_between_engines_and_shapes_differ():
    first = prompt_ids(0, 3, 5, vocab=1000)
    assert first == prompt_ids(0, 3, 5, vocab=1000) and len(first) == 3 and all(len(p) == 5 for p in first)
    assert len({tuple(p) for p in first}) == 3
    assert prompt_ids(0, 2, 0, vocab=1000)[0].__len__() == 1  # depth 0: a one-token prompt


def test_peer_spec_validation_and_missing_gguf():
    with pytest.raises(ValueError, match="peer must be"):
        PeerSpec("vllm", "x.gguf", 2)
    with pytest.raises(ValueError, match="KV type"):
        PeerSpec("llama.cpp", "x.gguf", 2, kv_type="q4_0")
    assert PeerSpec("llama.cpp", "x.gguf", 2, kv_type="q8_0").label == "llama.cpp kv q8_0"
    with pytest.raises(PeerUnavailable):
        PeerProcess(PeerSpec("transformers", "/no/such/file.gguf", 2))


def test_peak_rss_of_a_child_is_its_own():
    """ru_maxrss survives fork+exec on Linux; a peer must not report the bench process's peak as its own."""
    import subprocess
    import sys

    from longfit.bench.peers import peak_rss_bytes

    ballast = bytearray(256 << 20)  # noqa: F841 - raises this process's peak
    ours = peak_rss_bytes()
    code = "from longfit.bench.peers import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert ours >= 256 << 20 and child < ours - (128 << 20)
