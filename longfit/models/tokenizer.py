"""Tokenizer built with the ``tokenizers`` library alone, from GGUF vocabulary metadata or a ``tokenizer.json``.

GGUF vocabularies, by ``tokenizer.ggml.model``:
- ``gpt2`` (byte-level BPE): tokens + merges; the pre-tokenizer follows ``tokenizer.ggml.pre`` as llama.cpp does
  (``smollm``: single digits then GPT-2 byte-level, which matches llama.cpp id for id; ``llama-bpe`` / ``qwen2``:
  their split regexes; anything else: plain GPT-2 byte-level, flagged ``approximate``).
- ``llama`` (SentencePiece with scores): Gemma (no space prefix) as a Unigram over the scores, as transformers'
  GGUF converter rebuilds it (same ids on ordinary text; llama.cpp agrees); Llama 2 / Mistral style (space prefix)
  as BPE with merges ranked by the merged piece's score, which is llama.cpp's greedy SPM algorithm up to tie order
  (``approximate``).
Control tokens (token type 3) are registered as special tokens, so ``<start_of_turn>`` or ``<|im_start|>`` in text
is one id and ``decode(skip_special_tokens=True)`` drops them. User-defined tokens (type 4) of BPE and Llama-style
vocabularies become added tokens, matched before the model as llama.cpp does; Gemma's are left to the Unigram, as
transformers does.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2.ext
import numpy as np
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from longfit.models.model_config import CHAT_END_TOKENS

if TYPE_CHECKING:
    from longfit.models.gguf_loader import Checkpoint

_CONTROL, _USER_DEFINED = 3, 4
# Pre-tokenizer split patterns by llama.cpp ``tokenizer.ggml.pre`` (the regexes of llama-vocab.cpp / HF's files).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLIT_BY_PRE = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_GPT2_PRE = ("gpt2", "default", "smollm")
# Minimal turn formats for files that ship no chat template but whose vocabulary has the turn tokens.
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set system = '' %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (system if loop.first else '') + message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _special(tokens: Sequence[str], token_type: np.ndarray, kind: int, special: bool) -> list[AddedToken]:
    return [AddedToken(tokens[i], special=special, normalized=False) for i in np.flatnonzero(token_type == kind)]


def _byte_level_bpe(meta: Mapping[str, Any]) -> tuple[BackendTokenizer, bool]:
    """Byte-level BPE (GPT-2 family) from GGUF tokens + merges. Returns (tokenizer, approximate)."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    vocab = {token: i for i, token in enumerate(tokens)}
    # NOTE: Llama 3 takes a whole pre-token when the vocabulary has it before trying merges (llama.cpp ignore_merges).
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in ("llama-bpe", "llama3")))
    approximate = pre not in _GPT2_PRE and pre not in _SPLIT_BY_PRE
    if pre in _SPLIT_BY_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":  # llama.cpp: "\p{N}" (one digit per piece), then the GPT-2 regex
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    token_type = np.asarray(meta.get("tokenizer.ggml.token_type", np.ones(len(tokens))))
    backend.add_special_tokens(_special(tokens, token_type, _CONTROL, special=True))
    backend.add_tokens(_special(tokens, token_type, _USER_DEFINED, special=False))
    return backend, approximate


def _gemma_unigram(meta: Mapping[str, Any]) -> BackendTokenizer:
    """Gemma's SentencePiece vocabulary as transformers' ``GGUFGemmaConverter`` rebuilds it (which matches llama.cpp):
    a Unigram over the scores with byte fallback, spaces normalized to "▁", no prefix space."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    scores = np.asarray(meta["tokenizer.ggml.scores"], dtype=np.float64).tolist()
    pieces = []
    for token, score in zip(tokens, scores):
        if token == "<0x09>":  # NOTE: as transformers does: the tab byte piece becomes a literal tab piece
            token = "\t"
        elif token and not token.strip(" "):  # runs of spaces are stored raw; the normalized text has "▁"
            token = "▁" * len(token)
        pieces.append((token, score))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = BackendTokenizer(models.Unigram(pieces, unk_id=int(unk) if unk is not None else None,
                                              byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    token_type = np.asarray(meta.get("tokenizer.ggml.token_type", np.ones(len(tokens))))
    backend.add_special_tokens(_special(tokens, token_type, _CONTROL, special=True))
    return backend


def _spm_bpe(meta: Mapping[str, Any]) -> BackendTokenizer:
    """Llama 2 / Mistral SentencePiece vocabularies: BPE whose merge order is the merged piece's score, the order
    in which llama.cpp's SPM tokenizer greedily joins neighbours; "▁" prefixed to each text fragment."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    scores = np.asarray(meta["tokenizer.ggml.scores"], dtype=np.float64)
    token_type = np.asarray(meta.get("tokenizer.ggml.token_type", np.ones(len(tokens))))
    vocab = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for i in np.argsort(-scores, kind="stable"):  # best-scoring merged piece first
        piece = tokens[i]
        if token_type[i] != 1 or len(piece) < 2:
            continue
        ranked += [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=ranked, byte_fallback=True, fuse_unk=True,
                                          unk_token=tokens[int(unk)] if unk is not None else None))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # NOTE: llama.cpp prefixes a space to every text fragment, also one that already starts with a space, and
    # special tokens cut the text into fragments. A Prepend normalizer does the same (it runs per fragment);
    # Metaspace would not double a leading space.
    steps_in = [normalizers.Prepend("▁")] if prefix else []
    backend.normalizer = normalizers.Sequence(steps_in + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    backend.add_special_tokens(_special(tokens, token_type, _CONTROL, special=True))
    backend.add_tokens(_special(tokens, token_type, _USER_DEFINED, special=False))
    return backend


def _tojson(value: object, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class Tokenizer:
    """Text ↔ token ids for one model, plus its chat template.

    Attributes:
        bos_token_id: id of BOS, or None. ``encode`` prepends it when ``add_bos_token`` is set.
        eos_token_ids: ids that end generation (the file's EOS and the chat end-of-turn token).
        approximate: True when the vocabulary kind is only approximated (see the module docstring).
    """

    def __init__(self, backend: BackendTokenizer, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 add_bos_token: bool, chat_template: str | None = None, approximate: bool = False) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos_token = add_bos_token
        self.approximate = approximate
        self._template_source = chat_template
        self._template: jinja2.Template | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF ``tokenizer.*`` metadata (``Checkpoint.tokenizer_metadata`` of a GGUF file).

        Raises:
            ValueError: for a vocabulary kind other than gpt2 (byte-level BPE) and llama (SentencePiece).
        """
        kind = meta.get("tokenizer.ggml.model")
        approximate = False
        if kind == "gpt2":
            backend, approximate = _byte_level_bpe(meta)
        elif kind == "llama" and not meta.get("tokenizer.ggml.add_space_prefix", True):
            backend = _gemma_unigram(meta)
        elif kind == "llama":
            backend, approximate = _spm_bpe(meta), True
        else:
            raise ValueError(f"tokenizer.ggml.model {kind!r} is not supported; supported: gpt2 (BPE), llama (SPM)")
        if approximate:
            warnings.warn(f"tokenizer (model {kind!r}, pre {meta.get('tokenizer.ggml.pre')!r}) is approximated; "
                          "token ids may differ slightly from llama.cpp", stacklevel=2)
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = [int(eos)] if eos is not None else []
        eos_ids += [tokens.index(t) for t in CHAT_END_TOKENS if t in tokens]
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        template = meta.get("tokenizer.chat_template")
        return cls(backend, int(bos) if bos is not None else None, tuple(dict.fromkeys(eos_ids)),
                   add_bos, str(template) if template is not None else None, approximate)

    @classmethod
    def from_hf_files(cls, tokenizer_json: str | os.PathLike[str],
                      tokenizer_config_json: str | os.PathLike[str] | None = None) -> Tokenizer:
        """Build from a Hugging Face ``tokenizer.json`` and, if given, ``tokenizer_config.json`` (chat template,
        BOS/EOS tokens, add_bos_token). A directory's ``chat_template.jinja`` is used when the config has none."""
        backend = BackendTokenizer.from_file(str(tokenizer_json))
        config: dict[str, object] = {}
        if tokenizer_config_json is not None:
            config = json.loads(Path(tokenizer_config_json).read_text(encoding="utf-8"))

        def token_id(key: str) -> int | None:
            value = config.get(key)
            text = value.get("content") if isinstance(value, dict) else value
            return backend.token_to_id(text) if isinstance(text, str) else None

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = Path(tokenizer_json).with_name("chat_template.jinja")
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        eos_ids = [i for i in [token_id("eos_token")] if i is not None]
        eos_ids += [i for i in (backend.token_to_id(t) for t in CHAT_END_TOKENS) if i is not None]
        bos = token_id("bos_token")
        add_bos = bool(config.get("add_bos_token", False)) and bos is not None
        template = template if isinstance(template, str) else None
        return cls(backend, bos, tuple(dict.fromkeys(eos_ids)), add_bos, template)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> Tokenizer:
        """The tokenizer of a loaded checkpoint; BOS/EOS/add-BOS settings come from its ModelConfig."""
        meta = checkpoint.tokenizer_metadata
        if "tokenizer.ggml.model" in meta:
            tokenizer = cls.from_gguf_metadata(meta)
        elif meta.get("tokenizer_json"):
            tokenizer = cls.from_hf_files(meta["tokenizer_json"], meta.get("tokenizer_config_json"))
        else:
            raise ValueError(f"{checkpoint.path} has no tokenizer (no GGUF vocabulary and no tokenizer.json)")
        config = checkpoint.config
        tokenizer.bos_token_id = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
        tokenizer.eos_token_ids = config.eos_token_ids or tokenizer.eos_token_ids
        tokenizer.add_bos_token = config.add_bos_token and tokenizer.bos_token_id is not None
        return tokenizer

    # ------------------------------------------------------------------ encoding / decoding
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, BOS first when the model adds one (never twice)."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ------------------------------------------------------------------ chat
    @property
    def chat_template(self) -> str | None:
        """The file's template, else a minimal turn format when the vocabulary has Gemma or ChatML turn tokens."""
        if self._template_source is not None:
            return self._template_source
        if self.token_to_id("<start_of_turn>") is not None and self.token_to_id("<end_of_turn>") is not None:
            return _GEMMA_TEMPLATE
        if self.token_to_id("<|im_start|>") is not None and self.token_to_id("<|im_end|>") is not None:
            return _CHATML_TEMPLATE
        return None

    def apply_chat_template(self, messages: list[dict[str, object]], add_generation_prompt: bool = True,
                            **extra: object) -> str:
        """Render the chat template (sandboxed Jinja, as transformers does: ``raise_exception``, ``strftime_now``,
        ``tojson``; ``bos_token`` / ``eos_token`` variables).

        Raises:
            ValueError: when the model has no chat template or the template rejects the messages.
        """
        if self._template is None:
            source = self.chat_template
            if source is None:
                raise ValueError("this model has no chat template; send a plain prompt instead of chat messages")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(source)
            except TemplateError as error:
                raise ValueError(f"the model's chat template does not compile: {error}") from None
        bos = self.backend.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos or "", eos_token=eos or "", **extra)
        except TemplateError as error:
            raise ValueError(f"chat template error: {error}") from None

    def encode_chat(self, messages: list[dict[str, object]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; BOS once, whether or not the template writes it."""
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
        if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids


class IncrementalDetokenizer:
    """Streams text for one request as token ids arrive, decoding only a short trailing window per call.

    The window trick of vLLM's ``detokenize_incrementally`` and HF's ``TextStreamer``: keep ``prefix_offset`` (start
    of the already-emitted context kept for correct spacing) and ``read_offset`` (end of emitted text); the new text is
    ``decode(ids[prefix:]) - decode(ids[prefix:read])``. A trailing U+FFFD means a UTF-8 character split across
    byte tokens: hold it back until the character completes. Cost per call is O(window + new tokens).
    """

    # A UTF-8 character is at most 4 byte tokens; past this many held tokens the bytes are invalid: emit them.
    MAX_HELD_TOKENS = 8

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 context_tokens: int = 5) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # A few prompt tokens give the first output token its left context (SentencePiece leading-space rules).
        self.ids: list[int] = list(prompt_ids[-context_tokens:]) if context_tokens else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, new_ids: Sequence[int]) -> str:
        """Append token ids; return the text they completed ("" while a character is still incomplete).

        Several ids at once (a multi-step decode) give the text one push each would: decoded together when it is
        all valid, else one by one, since where invalid bytes become U+FFFD depends on where decoding cuts."""
        if len(new_ids) > 1:
            saved = (list(self.ids), self.prefix_offset, self.read_offset)
            self.ids.extend(int(i) for i in new_ids)
            text = self._advance(force=False)
            if "\ufffd" not in text and self.read_offset == len(self.ids):
                return text
            self.ids, self.prefix_offset, self.read_offset = saved
            return "".join(self.push([token]) for token in new_ids)
        self.ids.extend(int(i) for i in new_ids)
        return self._advance(force=False)

    def flush(self) -> str:
        """Text still held back at the end of the request (invalid bytes come out as U+FFFD)."""
        return self._advance(force=True)

    def _advance(self, force: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full_text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        complete = len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd")
        # Hold back an incomplete character, and keep the context while only invisible tokens (skipped specials)
        # arrived, so a decoder that strips a leading space still sees the text before.
        if not (complete or force or len(self.ids) - self.read_offset >= self.MAX_HELD_TOKENS):
            return ""
        new_text = full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        # NOTE: ids before prefix_offset are never decoded again; drop them so memory stays O(window).
        del self.ids[:self.prefix_offset]
        self.read_offset -= self.prefix_offset
        self.prefix_offset = 0
        return new_text
