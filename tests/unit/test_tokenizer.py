"""Tokenizers built from tiny GGUF-style vocabularies, chat templates, and the incremental detokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from longfit.config import ModelConfig
from longfit.models.gguf_loader import Checkpoint
from longfit.models.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["hello world", "  two  spaces\tand a tab\n\nnew lines ", "digits 1234567 and 3.14", "émigré naïve café",
         "emoji 🤗🚀 and 日本語", "mixed: <tag> & \"quotes\" 'x'", "\u200bzero width\u00a0nbsp\r\n"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BPE_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "Ġ 1"]


def bpe_meta(pre: str = "smollm") -> dict[str, object]:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in BPE_MERGES]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": BPE_MERGES,
            "tokenizer.ggml.token_type": np.array([3, 3, 3] + [1] * (len(tokens) - 3)),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                       "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                                       "{% endif %}"}


def spm_meta(space_prefix: bool) -> dict[str, object]:
    """A SentencePiece-style vocabulary: controls, 256 byte pieces, and scored pieces (unique scores)."""
    controls = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    pieces = ["  ", "▁", "a", "b", "c", "h", "e", "l", "o", "w", "r", "d", "ab", "bc", "abc", "▁a", "▁ab", "ca", "cab",
              "he", "ll", "hell", "hello", "▁hello", "▁w", "or", "▁wor", "▁world", "▁▁b"]
    tokens = controls + [f"<0x{b:02X}>" for b in range(256)] + pieces
    token_type = [3] * len(controls) + [6] * 256 + [4 if p == "  " else 1 for p in pieces]
    scores = [-1000.0] * len(controls) + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": np.array(token_type), "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": space_prefix}


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(bpe_meta())


@pytest.fixture(scope="module")
def unigram() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(spm_meta(space_prefix=False))


def test_byte_level_bpe(bpe: Tokenizer) -> None:
    assert bpe.convert_ids_to_tokens(bpe.encode("hello world")) == ["hello", "Ġworld"]
    assert bpe.convert_ids_to_tokens(bpe.encode(" 12 x")) == ["Ġ", "1", "2", "Ġ", "x"]  # digits one by one
    assert bpe.encode("<|im_start|>hi<|im_end|>")[::3] == [1, 2]
    assert bpe.decode(bpe.encode("<|im_start|>hi")) == "hi"
    assert bpe.decode(bpe.encode("<|im_start|>hi"), skip_special_tokens=False) == "<|im_start|>hi"
    assert bpe.eos_token_ids == (0, 2) and bpe.bos_token_id == 1 and not bpe.add_bos_token and not bpe.approximate
    for text in TEXTS:
        assert bpe.decode(bpe.encode(text)) == text


def test_other_bpe_pre_tokenizers() -> None:
    llama3 = Tokenizer.from_gguf_metadata(bpe_meta("llama-bpe"))
    assert llama3.convert_ids_to_tokens(llama3.encode("12345")) == ["12", "3", "4", "5"]  # \p{N}{1,3} then merges
    qwen2 = Tokenizer.from_gguf_metadata(bpe_meta("qwen2"))
    assert qwen2.convert_ids_to_tokens(qwen2.encode("12345")) == ["1", "2", "3", "4", "5"]
    with pytest.warns(UserWarning, match="approximated"):
        other = Tokenizer.from_gguf_metadata(bpe_meta("dbrx"))
    assert other.approximate
    for tokenizer in (llama3, qwen2, other):
        assert all(tokenizer.decode(tokenizer.encode(text)) == text for text in TEXTS)
    with pytest.raises(ValueError, match="'bert' is not supported"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert"})


def test_gemma_style_unigram(unigram: Tokenizer) -> None:
    assert unigram.encode("hello world")[0] == 2 and unigram.encode("hello world", add_special_tokens=False)[0] != 2
    assert unigram.encode("<bos>hello") == unigram.encode("hello")  # BOS never twice
    assert unigram.convert_ids_to_tokens(unigram.encode("hello world", False)) == ["hello", "▁world"]
    # The stored two-space piece becomes "▁▁", matching the normalized text; Viterbi prefers its score (0).
    assert unigram.convert_ids_to_tokens(unigram.encode("a  b", False)) == ["a", "▁▁", "b"]
    assert unigram.encode("<start_of_turn>", False) == [4]
    assert unigram.convert_ids_to_tokens(unigram.encode("🤗", False)) == ["<0xF0>", "<0x9F>", "<0xA4>", "<0x97>"]
    assert unigram.eos_token_ids == (1, 5)  # <eos> and <end_of_turn>
    for text in TEXTS:
        assert unigram.decode(unigram.encode(text)) == text


def spm_reference(meta: dict[str, object], text: str) -> list[int]:
    """llama.cpp's SentencePiece tokenizer, transcribed slowly: control and user-defined tokens cut the text into
    fragments; each fragment gets a "▁" prefix, then from its characters the adjacent pair whose concatenation is
    the best-scoring vocabulary piece is joined (leftmost on ties) until none is left; unknowns become bytes."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]  # type: ignore[assignment]
    types, scores = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == 1}  # type: ignore[index]
    whole = {t: i for i, t in enumerate(tokens) if types[i] in (3, 4)}  # type: ignore[index]
    ids: list[int] = []
    for fragment in re.split("(" + "|".join(map(re.escape, sorted(whole, key=len, reverse=True))) + ")", text):
        if fragment in whole:
            ids.append(whole[fragment])
            continue
        if not fragment:
            continue
        symbols = list("▁" + fragment.replace(" ", "▁"))
        while True:
            best = None
            for i in range(len(symbols) - 1):
                joined = symbols[i] + symbols[i + 1]
                if joined in vocab and (best is None or scores[vocab[joined]] > scores[vocab[best[1]]]):  # type: ignore
                    best = (i, joined)
            if best is None:
                break
            symbols[best[0]:best[0] + 2] = [best[1]]
        for symbol in symbols:
            ids += [vocab[symbol]] if symbol in vocab else [tokens.index(f"<0x{b:02X}>") for b in symbol.encode()]
    return ids


def test_spm_bpe_matches_llama_cpp_algorithm() -> None:
    meta = spm_meta(space_prefix=True)
    with pytest.warns(UserWarning, match="approximated"):
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    rng = np.random.default_rng(0)
    texts = ["hello world", "abcabc cab", "ab c bca", "héllo wörld", "ab<start_of_turn>hello<eos>  c"]
    texts += ["".join(rng.choice(list("abc h"), size=12)) for _ in range(30)]
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == spm_reference(meta, text), text
        if "<" not in text and "  " not in text:  # NOTE: as in llama.cpp, a space follows each special token
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chat_templates(bpe: Tokenizer, unigram: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert bpe.apply_chat_template(messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert bpe.apply_chat_template(messages, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"
    assert bpe.encode_chat(messages)[0] == 1
    # No template in the file: Gemma's turn format, BOS written by the template and encoded once.
    system = [{"role": "system", "content": "be brief"}] + messages + [{"role": "assistant", "content": "ok"}]
    rendered = unigram.apply_chat_template(system)
    assert rendered == ("<bos><start_of_turn>user\nbe brief\n\nhi<end_of_turn>\n<start_of_turn>model\nok<end_of_turn>\n"
                        "<start_of_turn>model\n")
    ids = unigram.encode_chat(system)
    assert ids[:2] == [2, 4] and ids.count(2) == 1
    strict = Tokenizer(bpe.backend, 1, (0,), False, "{{ raise_exception('only user turns') }}")
    with pytest.raises(ValueError, match="only user turns"):
        strict.apply_chat_template(messages)
    bare = Tokenizer.from_gguf_metadata({k: v for k, v in bpe_meta().items() if k != "tokenizer.chat_template"})
    assert bare.apply_chat_template(messages).startswith("<|im_start|>user\nhi<|im_end|>")  # ChatML fallback
    meta = bpe_meta()
    meta.pop("tokenizer.chat_template")
    meta["tokenizer.ggml.tokens"] = ["<a>", "<b>", "<c>"] + meta["tokenizer.ggml.tokens"][3:]  # type: ignore[index]
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_gguf_metadata(meta).apply_chat_template(messages)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_incremental_detokenizer_streams_whole_characters(kind: str, bpe: Tokenizer, unigram: Tokenizer) -> None:
    tokenizer = bpe if kind == "bpe" else unigram
    text = "".join(TEXTS) * 3
    ids = tokenizer.encode(text, add_special_tokens=False)
    lengths: list[int] = []
    original = tokenizer.decode

    def counting_decode(window, skip_special_tokens=True):  # type: ignore[no-untyped-def]
        lengths.append(len(window))
        return original(window, skip_special_tokens)

    tokenizer.decode = counting_decode  # type: ignore[method-assign]
    try:
        stream = IncrementalDetokenizer(tokenizer)
        chunks = [stream.push([i]) for i in ids] + [stream.flush()]
    finally:
        del tokenizer.decode
    assert "".join(chunks) == text
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert max(lengths) <= 2 * IncrementalDetokenizer.MAX_HELD_TOKENS  # a short window, not the whole output
    emoji = tokenizer.encode("🤗", add_special_tokens=False)
    assert len(emoji) == 4  # one byte per token: the first three pushes complete nothing
    stream = IncrementalDetokenizer(tokenizer)
    assert [stream.push([i]) for i in emoji] == ["", "", "", "🤗"]
    stream = IncrementalDetokenizer(tokenizer)
    assert stream.push(emoji[:2]) == ""
    assert set(stream.flush()) == {"\ufffd"}  # invalid bytes at the end come out on flush


def test_incremental_detokenizer_keeps_prompt_context() -> None:
    with pytest.warns(UserWarning):
        tokenizer = Tokenizer.from_gguf_metadata(spm_meta(space_prefix=True))  # its decoder strips a leading space
    prompt, output = tokenizer.encode("hello"), tokenizer.encode("hello world", False)[1:]
    assert tokenizer.decode(output) == "world"  # decoded alone, the space is lost
    stream = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    assert "".join(stream.push([i]) for i in output) == " world"
    stream = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    assert stream.push([5]) == "" and stream.push(output) == " world"  # a skipped special keeps the context


def test_from_hf_files_and_checkpoint(tmp_path: Path, bpe: Tokenizer) -> None:
    bpe.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"}, "add_bos_token": True,
              "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_hf_files(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == (0, 2) and tokenizer.add_bos_token
    assert tokenizer.encode("hello") == [1, bpe.token_to_id("hello")]
    assert tokenizer.encode_chat([{"role": "user", "content": "hello"}]) == tokenizer.encode("hello")
    assert tokenizer.vocab_size == bpe.vocab_size
    model = ModelConfig.tiny(vocab_size=bpe.vocab_size, bos_token_id=2, eos_token_ids=(0,), add_bos_token=True)
    checkpoint = Checkpoint(config=model, weights={}, tokenizer_metadata=bpe_meta(), path="x.gguf")
    from_checkpoint = Tokenizer.from_checkpoint(checkpoint)  # BOS / EOS / add-BOS follow the model config
    assert from_checkpoint.encode("hello") == [2, bpe.token_to_id("hello")] and from_checkpoint.eos_token_ids == (0,)
    hf_checkpoint = Checkpoint(config=model, weights={}, path=str(tmp_path),
                               tokenizer_metadata={"tokenizer_json": str(tmp_path / "tokenizer.json")})
    assert Tokenizer.from_checkpoint(hf_checkpoint).encode("hello") == [2, bpe.token_to_id("hello")]
    with pytest.raises(ValueError, match="has no tokenizer"):
        Tokenizer.from_checkpoint(Checkpoint(config=model, weights={}, tokenizer_metadata={}, path="nothing"))
