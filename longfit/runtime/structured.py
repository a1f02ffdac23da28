"""Structured output: per-step token masks that keep generated text inside a grammar.

A request's ``SamplingParams.structured_output`` (a JSON schema, any JSON object, a regex, a choice of strings or a
Lark grammar) becomes an llguidance grammar (the engine behind "Guidance", also used by vLLM and llama.cpp): its
``LLMatcher`` follows the tokens generated so far and says, before each sample, which tokens keep the text a prefix
of some string of the grammar. The runner sets every other token's logit to -inf *before* the LM head's leading
logits are rescored (``DecoderModel.compute_logits(bias=...)``), so greedy decoding picks the best allowed token
under the exact weights, and sampling draws from the model's distribution renormalized over the allowed tokens.
When the grammar is complete only the end-of-text tokens stay allowed, and the request stops as on any EOS.

llguidance is optional (``pip install 'longfit[serve]'``); without it a structured request gets a ValueError saying
so. The tokenizer is converted once per engine, on the first structured request (SmolLM2 0.5 s, Gemma-3's 262k
vocabulary ~4 s).
"""

from __future__ import annotations

import re
import threading
from typing import Any

import numpy as np
import torch

from longfit.sampling_params import StructuredOutput

# JSON as OpenAI's json_object mode and vLLM produce it: compact separators, so a model cannot pad it with
# unbounded whitespace (a small model under a grammar that allows it may emit newlines until max_tokens).
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured_output needs the llguidance package: pip install 'longfit[serve]' "
                         "(or pip install llguidance)") from None
    return llguidance


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar (its JSON form) of ``spec``."""
    matcher = _llguidance().LLMatcher
    if spec.json_schema is not None:
        return matcher.grammar_from_json_schema(spec.json_schema, defaults=_JSON_OPTIONS)
    if spec.json_object:
        return matcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if spec.regex is not None:
        return matcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return matcher.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in spec.choice))
    assert spec.grammar is not None
    return matcher.grammar_from_lark(spec.grammar)


class GrammarCompiler:
    """Builds matchers for one tokenizer and vocabulary; the llguidance tokenizer is made on first use.

    Args:
        tokenizer: longfit's ``Tokenizer`` (its ``tokenizers`` backend is handed over as tokenizer.json text) or any
            object with ``encode``/``vocab_size`` whose ids are bytes (the tiny models' ``ByteTokenizer``).
        vocab_size: the model's logits width (may exceed the tokenizer's: the extra ids are never allowed).
        eos_token_ids: the engine's end-of-text ids, the only tokens allowed once the grammar is complete.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._source = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()  # the server validates on its event loop while the engine thread steps

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._build_tokenizer()
            return self._tokenizer

    def _build_tokenizer(self) -> Any:
        llg = _llguidance()
        if not self.eos_token_ids:
            raise ValueError("structured_output needs the model's end-of-text token, and this tokenizer has none")
        eos = list(self.eos_token_ids)
        backend = getattr(self._source, "backend", None)
        if backend is not None:  # a HF `tokenizers` object: llguidance reads its JSON (byte-level BPE, SentencePiece)
            return llg.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=eos)
        return llg.LLTokenizer(llg.TokenizerWrapper(_ByteVocabulary(self._source, self.vocab_size)),
                               n_vocab=self.vocab_size, eos_token=eos)

    def check(self, spec: StructuredOutput) -> None:
        """Raise ValueError naming the problem if ``spec`` does not compile (bad regex, schema, grammar)."""
        try:
            grammar = grammar_text(spec)
        except ValueError as error:
            raise ValueError(f"structured_output.{spec.kind}: {error}") from None
        is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer())
        if is_error:
            raise ValueError(f"structured_output.{spec.kind} does not compile: {messages[0] if messages else '?'}")

    def matcher(self, spec: StructuredOutput, consumed: list[int]) -> GrammarMatcher:
        """A matcher that has already followed ``consumed`` (the request's output so far, after a preemption)."""
        matcher = GrammarMatcher(_llguidance().LLMatcher(self.tokenizer(), grammar_text(spec), log_level=0),
                                 self.vocab_size)
        for token in consumed:
            matcher.consume(token)
        return matcher


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """bool [V]: the tokens that keep the text inside the grammar (the EOS ids once it is complete)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)  # one bit per token, LSB first
        allowed = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        if not allowed.any():  # an error state (a token it refused): say so rather than sample from nothing
            raise RuntimeError(f"structured output matcher has no allowed token: {self._matcher.get_error()}")
        return torch.from_numpy(allowed)

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"structured output matcher refused token {token}: {self._matcher.get_error()}")


class _ByteVocabulary:
    """What llguidance's ``TokenizerWrapper`` reads, for a tokenizer whose ids 0-255 are bytes (the tiny models')."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.eos_token_id = tokenizer.eos_token_ids[0]
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        specials = {i for i in (self.bos_token_id, *tokenizer.eos_token_ids) if i is not None}
        self.special_token_ids = sorted(specials)
        # Special ids get a name no text contains, so the grammar can never produce them.
        self.tokens = [f"<|special_{i}|>".encode() if i in specials else bytes([i]) if i < 256 else b""
                       for i in range(vocab_size)]
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        return list(data)
