"""LLM: the offline facade, shaped like vLLM's (``LLM(model).generate(prompts, SamplingParams)``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from longfit.config import EngineConfig
from longfit.engine.llm_engine import LLMEngine
from longfit.outputs import RequestOutput
from longfit.sampling_params import SamplingParams


class LLM:
    """Generate with a model through longfit's paged KV cache.

    Args:
        model: short name (``smollm2-135m``, ``gemma3-270m``, ``tiny-llama``), GGUF path or HF directory.
        dtype: ``"bfloat16"`` (default) or ``"float32"``.
        kv_compression: default KV-compression spec for every request.
        **config: any field of CacheConfig, SchedulerConfig or RuntimeConfig (``block_size=16``,
            ``max_num_seqs=8``, ``memory_bytes=2**30``, ``weights="int8"`` ...).
    """

    def __init__(self, model: str = "smollm2-135m", dtype: str = "bfloat16", kv_compression: str | None = None,
                 **config) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, dtype=dtype, kv_compression=kv_compression, **config))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _add(self, prompts: Sequence[str | list[int]], params: SamplingParams | Sequence[SamplingParams] | None,
             kv_compression: str | None) -> list[str]:
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(None, prompt, p, kv_compression))
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return ids

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 kv_compression: str | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of ``prompts``."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        ids = self._add(list(prompts), sampling_params, kv_compression)
        finished: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(ids), desc="generate", unit="req")
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if progress is not None:
                            progress.update(1)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finally:
            if progress is not None:
                progress.close()
        return [finished[request_id] for request_id in ids]

    def generate_stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                        kv_compression: str | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that added tokens (text is cumulative; the last
        one has ``finished`` set). Closing the iterator early aborts the request and frees its pages."""
        (request_id,) = self._add([prompt], sampling_params, kv_compression)
        done = False
        try:
            while not done and self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.request_id == request_id:
                        done = output.finished
                        yield output
        finally:
            if not done:
                self.engine.abort_request(request_id)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             kv_compression: str | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.render_chat(conversation) for conversation in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, kv_compression)

    def render_chat(self, messages: list[dict]) -> list[int]:
        """Chat template → token ids (special tokens in the template are parsed, BOS not added twice)."""
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"messages[{index}] must be a dict with 'role' and 'content'")
        tokenizer = self.engine.tokenizer
        if hasattr(tokenizer, "encode_chat"):  # adds BOS when the model wants one and the template does not write it
            return tokenizer.encode_chat(messages, add_generation_prompt=True)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    def kv_usage(self) -> dict[str, int | float]:
        return self.engine.kv_usage()
