"""`longfit bench serve`: statistics, workload generation, SSE client (mock transport), the peer's missing message."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random

import httpx
import numpy as np
import pytest

from longfit.bench import serve as bench
from longfit.bench.serve import LengthDist, RequestRecord, RequestSpec


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for size in (1, 2, 7, 100):
        values = [rng.uniform(0, 10) for _ in range(size)]
        for q in (0, 50, 90, 99, 100):
            assert bench.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)
    assert math.isnan(bench.percentile([], 50))


@pytest.mark.parametrize("text,expected", [("256", (256, 256)), ("128:512", (128, 512)), ("0", (0, 0))])
def test_length_spec_parses(text, expected):
    dist = LengthDist.parse(text, "--prompt-len")
    assert (dist.low, dist.high) == expected
    rng = random.Random(0)
    assert all(expected[0] <= dist.sample(rng) <= expected[1] for _ in range(50))


@pytest.mark.parametrize("text", ["abc", "5:2", "-1", "1:2:3", "", "1.5"])
def test_bad_length_spec_names_the_flag(text):
    with pytest.raises(ValueError, match="--output-len"):
        LengthDist.parse(text, "--output-len")


def test_workload_lengths_and_shared_prefixes():
    specs = bench.build_workload(12, LengthDist(5, 9), LengthDist(3, 3), shared_prefix_len=20, num_prefixes=3, seed=4)
    assert len(specs) == 12 and all(s.max_tokens == 3 for s in specs)
    prefixes = [" ".join(s.prompt.split()[:20]) for s in specs]
    assert all(prefixes[i] == prefixes[i % 3] for i in range(12)) and len(set(prefixes)) == 3
    assert all(20 + 5 <= len(s.prompt.split()) <= 20 + 9 for s in specs)
    again = bench.build_workload(12, LengthDist(5, 9), LengthDist(3, 3), shared_prefix_len=20, num_prefixes=3, seed=4)
    assert [s.prompt for s in again] == [s.prompt for s in specs]
    plain = bench.build_workload(3, LengthDist(4, 4), LengthDist(1, 1))
    assert all(len(s.prompt.split()) == 4 for s in plain)


def test_rounds_never_repeat_a_prompt():
    """Each round's prompts differ from every other round's from their first word (no prefix-cache hit across
    rounds), keep the same bodies and lengths, and still share the round's prefixes among themselves."""
    specs = bench.build_workload(6, LengthDist(5, 9), LengthDist(3, 3), shared_prefix_len=20, num_prefixes=2, seed=4)
    first, second = bench.for_round(specs, 0), bench.for_round(specs, 1)
    assert all(a.prompt.split()[:2] != b.prompt.split()[:2] for a in first for b in second)
    assert [a.prompt.split()[2:] for a in first] == [s.prompt.split() for s in specs]
    assert [a.max_tokens for a in second] == [s.max_tokens for s in specs]
    assert first[0].prompt.split()[:22] == first[2].prompt.split()[:22]  # prefix 0, within the round


def test_poisson_arrivals():
    assert bench.arrival_offsets(5, math.inf, random.Random(0)) == [0.0] * 5
    offsets = bench.arrival_offsets(20000, 4.0, random.Random(0))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)  # exponential: std == mean
    with pytest.raises(ValueError, match="request_rate"):
        bench.arrival_offsets(3, 0.0, random.Random(0))


def test_record_and_summary_math():
    # Request A: first chunk at 0.1 s, then every 0.05 s, 5 tokens, done at 0.3 s.
    a = RequestRecord(ok=True, latency=0.3, ttft=0.1, chunk_times=[0.1, 0.15, 0.2, 0.25, 0.3], prompt_tokens=10,
                      output_tokens=5)
    b = RequestRecord(ok=True, latency=0.5, ttft=0.3, chunk_times=[0.3, 0.5], prompt_tokens=20, output_tokens=2)
    failed = RequestRecord(ok=False, error="HTTP 500")
    assert a.tpot == pytest.approx(0.05) and b.tpot == pytest.approx(0.2)
    assert a.itls == pytest.approx([0.05] * 4)
    assert RequestRecord(ok=True, latency=1.0, ttft=1.0, output_tokens=1).tpot is None
    summary = bench.summarize("x", [a, b, failed], duration_s=2.0)
    assert (summary.num_ok, summary.num_failed) == (2, 1)
    assert summary.request_throughput == pytest.approx(1.0)
    assert summary.output_throughput == pytest.approx(3.5)
    assert summary.total_token_throughput == pytest.approx(18.5)
    assert summary.latency_ms["ttft"]["p50"] == pytest.approx(200.0)
    assert summary.latency_ms["ttft"]["mean"] == pytest.approx(200.0)
    assert summary.latency_ms["tpot"]["p90"] == pytest.approx(1000 * (0.05 + 0.9 * 0.15))
    assert summary.latency_ms["itl"]["p50"] == pytest.approx(50.0)  # gaps: four of 0.05 and one of 0.2
    assert summary.latency_ms["e2e"]["p99"] == pytest.approx(1000 * (0.3 + 0.99 * 0.2))
    assert summary.row().split() == ["x", "2", "1", "2.0", "1.00", "3.5", "200/280/298", "125/185/198",
                                     "50/140/194", "400/480/498"]


def _sse_transport(state: dict, fail_every: int = 0) -> httpx.MockTransport:
    """A fake OpenAI server: streams one chunk per token after a short sleep, then usage and [DONE]."""

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        state["requests"] += 1
        if fail_every and state["requests"] % fail_every == 0:
            return httpx.Response(500, json={"error": {"message": "boom"}})
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        await asyncio.sleep(0.002)
        state["in_flight"] -= 1
        events = [{"choices": [{"index": 0, "text": f"t{i} "}], "usage": None} for i in range(body["max_tokens"])]
        events.append({"choices": [], "usage": {"prompt_tokens": len(body["prompt"].split()),
                                               "completion_tokens": body["max_tokens"]}})
        payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, content=payload.encode(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def test_client_parses_sse_and_caps_concurrency():
    state = {"requests": 0, "in_flight": 0, "peak": 0}
    specs = [RequestSpec("a b c", 4), RequestSpec("d e", 2)] * 5

    async def run():
        async with httpx.AsyncClient(transport=_sse_transport(state), base_url="http://fake/v1/") as client:
            return await bench.run_load(client, "m", specs, concurrency=3, request_rate=math.inf)

    records, duration = asyncio.run(run())
    assert duration > 0 and state["requests"] == 10 and state["peak"] <= 3
    assert [r.output_tokens for r in records] == [4, 2] * 5 and [r.prompt_tokens for r in records] == [3, 2] * 5
    assert all(r.ok and r.ttft is not None and len(r.chunk_times) == r.output_tokens for r in records)


def test_client_records_http_errors():
    state = {"requests": 0, "in_flight": 0, "peak": 0}

    async def run():
        async with httpx.AsyncClient(transport=_sse_transport(state, fail_every=2), base_url="http://fake/v1/") as c:
            return await bench.run_load(c, "m", [RequestSpec("x", 1)] * 4, concurrency=1, request_rate=math.inf)

    records, _ = asyncio.run(run())
    assert [r.ok for r in records] == [True, False, True, False]
    assert records[1].error.startswith("HTTP 500")


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_bench_serve_arguments(parser)
    return parser.parse_args(["--base-url", "http://127.0.0.1:9/v1", "--no-progress", *extra])


def test_peer_not_installed_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(bench, "llama_cpp_available", lambda: False)
    assert bench.run_bench_serve(_args("--peer", "llama.cpp", "--peer-model", "model.gguf")) == 2
    err = capsys.readouterr().err
    assert "llama-cpp-python" in err and "not installed" in err and "--peer-url" in err
    with pytest.raises(bench.PeerUnavailable, match="not installed"):
        bench.start_llama_cpp_peer("model.gguf", 1, 512, None, [])


def test_peer_needs_an_existing_gguf(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "llama_cpp_available", lambda: True)
    with pytest.raises(bench.PeerUnavailable, match="--peer-model"):
        bench.start_llama_cpp_peer(str(tmp_path / "missing.gguf"), 1, 512, None, [])


def test_bad_workload_flags_raise_value_errors():
    with pytest.raises(ValueError, match="--prompt-len"):
        bench.run_bench_serve(_args("--prompt-len", "9:1"))
    with pytest.raises(ValueError, match="num_requests"):
        bench.build_workload(0, LengthDist(1, 1), LengthDist(1, 1))
    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(bench.run_load(None, "m", [RequestSpec("x", 1)], concurrency=0, request_rate=math.inf))


def _summary(label: str, out_tps: float, tpot_p50: float) -> bench.Summary:
    latency = {m: {"mean": 1.0, "p50": tpot_p50 if m == "tpot" else 10.0, "p90": 20.0, "p99": 30.0}
               for m in ("ttft", "tpot", "itl", "e2e")}
    return bench.Summary(label, 4, 0, 2.0, 2.0, out_tps, out_tps + 10, 40, 8, latency)


def test_median_summary_of_rounds():
    med = bench.median_summary("x med", [_summary("a", 10, 5), _summary("a", 30, 7), _summary("a", 20, 100)])
    assert med.output_throughput == 20 and med.latency_ms["tpot"]["p50"] == 7 and med.num_ok == 12


def test_rounds_alternate_servers_and_print_ratios(monkeypatch, capsys):
    order = []

    async def fake_target(label, base_url, model, api_key, warm, specs, args):
        order.append(label)
        return _summary(label, 40.0 if label == "longfit" else 20.0, 10.0 if label == "longfit" else 20.0)

    monkeypatch.setattr(bench, "_bench_target", fake_target)
    args = _args("--peer", "llama-server", "--peer-url", "http://127.0.0.1:9/v1", "--rounds", "3",
                 "--target-label", "longfit", "--num-requests", "2")
    assert bench.run_bench_serve(args) == 0
    assert order == ["longfit", "llama-server", "llama-server", "longfit", "longfit", "llama-server"]
    out = capsys.readouterr().out
    assert "longfit #2" in out and "llama-server med" in out
    assert "ratio longfit/llama-server: output tok/s x2.00, TPOT p50 x0.50" in out


def test_llama_server_binary_missing_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGFIT_PEERS_DIR", str(tmp_path))
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert bench.default_llama_server() == str(tmp_path / "bin" / "llama-server")
    with pytest.raises(bench.PeerUnavailable, match="build_peers.sh"):
        bench.start_llama_server(bench.default_llama_server(), "m.gguf", 1, 16, 512, 2, [])
    with pytest.raises(ValueError, match="--rounds"):
        bench.run_bench_serve(_args("--rounds", "0"))
