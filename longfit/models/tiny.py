"""Tiny random-weight models and a byte tokenizer, built in-process for tests and demos (no files)."""

from __future__ import annotations

from longfit.config import ModelConfig

TINY_PRESETS = ("tiny-llama", "tiny-gemma3")


def tiny_model_config(name: str) -> ModelConfig:
    if name not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {name!r}; known: {TINY_PRESETS}")
    return ModelConfig.tiny("gemma3" if name == "tiny-gemma3" else "llama")


class ByteTokenizer:
    """Token id = byte value (vocab 256); id 1 is BOS and id 2 EOS (control bytes, absent from text)."""

    vocab_size = 256
    bos_token_id = 1
    eos_token_ids = (2,)

    def __init__(self, add_bos: bool = False) -> None:
        self.add_bos = add_bos

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens and self.add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        special = {self.bos_token_id, *self.eos_token_ids}
        data = bytes(i for i in ids if not (skip_special_tokens and i in special) and 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [bytes([i]).decode("latin-1") for i in ids]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")
