"""LLMEngine: wires tokenizer, scheduler, KV manager and model runner into ``add_request`` / ``step``.

One ``step()`` = schedule → execute → update → fold outputs. Exceptions inside a step finish every
request of that step with an error and free its pages before propagating, so no page leaks.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import replace

import torch

from longfit.config import EngineConfig, env_num_threads
from longfit.engine.output_processor import OutputProcessor, child_id, parent_id
from longfit.engine.request import Request, RequestStatus
from longfit.engine.scheduler import Scheduler
from longfit.kv.manager import KVCacheManager
from longfit.models.loader import load_model
from longfit.outputs import RequestOutput
from longfit.runtime.compactor import validate_engine_spec
from longfit.runtime.decode_graph import DecodeGraph
from longfit.runtime.host_memory import configure_host_allocator
from longfit.runtime.structured import GrammarCompiler
from longfit.runtime.kv_store import resolve_kv_spec
from longfit.runtime.model_runner import ModelRunner
from longfit.sampling_params import SamplingParams

logger = logging.getLogger("longfit")


def configure_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads once (physical cores by default; LONGFIT_NUM_THREADS overrides), and the host
    allocator's thresholds (``runtime.host_memory``: freed temporaries stay in the heap)."""
    configure_host_allocator()
    count = num_threads or env_num_threads() or max(1, (os.cpu_count() or 2))
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


class LLMEngine:
    """The synchronous engine. ``AsyncLLMEngine`` runs its ``step`` in a background loop."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        configure_threads(config.runtime.num_threads)
        if config.runtime.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("RuntimeConfig.device is 'cuda' but CUDA is not available on this machine")
        loaded = load_model(config.model, config.runtime)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.path
        max_model_len = config.scheduler.max_model_len or self.model_config.max_model_len
        if max_model_len > self.model_config.max_model_len:
            raise ValueError(f"SchedulerConfig.max_model_len={max_model_len} exceeds the model's context "
                             f"{self.model_config.max_model_len}")
        self.max_model_len = max_model_len
        self.kv_spec = resolve_kv_spec(self.model_config, config.cache, config.runtime.dtype, max_model_len,
                                       config.scheduler.max_num_seqs)
        self.kv_manager = KVCacheManager(self.kv_spec, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, max_model_len)
        self.runner = ModelRunner(loaded.model, self.model_config, self.kv_spec, max_model_len, config.runtime.device)
        if config.runtime.compile:
            if loaded.model.fused_decode() is not None:
                # Measured faster than the compiled graph (docs/PERFORMANCE.md), and it needs no minutes of compiling.
                logger.info("compile: plain decode steps run the fused C step (models/fused_decode.py); no graph")
            else:
                self.runner.graph = DecodeGraph(loaded.model)
        self.outputs = OutputProcessor(self.tokenizer)
        self.eos_token_ids = tuple(self.model_config.eos_token_ids) or tuple(getattr(self.tokenizer, "eos_token_ids", ()))
        self.runner.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0}
        if self.runner.graph is not None and self.runner.graph.failed is None:
            self._compile_decode_step()

    def _compile_decode_step(self) -> None:
        """Compile the decode graphs now, rather than in users' first decode steps (SmolLM2: minutes each the first
        time; docs/PERFORMANCE.md): a 3-token request alone (batch 1), then two together (batch 2 and up: torch
        specializes size 1 in places, so one row and several rows are two graphs). Their tokens are not counted in
        ``stats``."""
        started = time.perf_counter()
        stats = dict(self.stats)
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        for batch in (1, 2) if self.config.scheduler.max_num_seqs > 1 else (1,):
            for row in range(batch):
                self.add_request(f"compile-warm-up-{batch}-{row}", [row], params)
            while self.has_unfinished_requests():
                self.step()
        self.stats = stats
        logger.info("decode step compiled in %.1f s%s", time.perf_counter() - started,
                    f" (failed, running eager: {self.runner.graph.failed[:200]})" if self.runner.graph.failed else "")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> LLMEngine:
        return cls(EngineConfig.from_kwargs(model, **kwargs))

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.model_config.vocab_size
                   for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {self.model_config.vocab_size})")
        return list(prompt)

    def check_kv_compression(self, spec: str) -> str:
        """The canonical text of a spec this engine can apply to its pages (block size, KV heads, head dim, cache
        dtype), "" for no compression; ValueError naming the problem otherwise."""
        return validate_engine_spec(spec, self.kv_spec.block_size, self.model_config.head_dim,
                                    self.kv_spec.dtype_bytes, self.model_config.num_kv_heads)

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    kv_compression: str | None = None) -> str:
        """Queue a request (``params.n`` completions). Raises ValueError for input it could never serve."""
        params = params or SamplingParams()
        params.validate()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if "#" in request_id:
            raise ValueError(f"request_id must not contain '#', got {request_id!r}")
        if request_id in self.outputs.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_ids = self.tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(token_ids)
        spec = kv_compression if kv_compression is not None else params.kv_compression or self.config.kv_compression
        spec = self.check_kv_compression(spec) if spec else None
        if params.structured_output is not None:
            self.runner.grammars.check(params.structured_output)
        vocab = self.model_config.vocab_size
        outside = [token for token in params.logit_bias or () if token >= vocab]
        if outside:
            raise ValueError(f"logit_bias token id {outside[0]} is outside the vocabulary [0, {vocab})")
        self.outputs.add(request_id, prompt if isinstance(prompt, str) else None, token_ids, params)
        children = []
        for index in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = replace(params, seed=params.seed + index)
            children.append(Request(child_id(request_id, index), token_ids, child_params, self.eos_token_ids,
                                    max_tokens=max_tokens, kv_compression=spec or None))
        try:
            for child in children:
                self.scheduler.add_request(child)
        except Exception:
            self.scheduler.abort_requests([c.request_id for c in children])
            self.outputs.remove(request_id)
            raise
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Cancel a request (all its completions); its pages return to the pool at once."""
        parent = self.outputs.parents.get(request_id)
        if parent is None:
            return
        ids = [child_id(request_id, i) for i in range(parent.params.n)]
        self.scheduler.abort_requests(ids)
        self.outputs.remove(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return the outputs of requests that progressed."""
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty and not scheduler_output.finished_request_ids:
            return []
        started = time.perf_counter()
        try:
            result = self.runner.execute(scheduler_output)
        except Exception:
            # Fail every completion of every parent that had a request in this step (siblings included).
            for parent in {parent_id(item.request_id)[0] for item in scheduler_output.scheduled}:
                state = self.outputs.parents.get(parent)
                for index in range(state.params.n if state else 1):
                    request = self.scheduler.requests.get(child_id(parent, index))
                    if request is not None:
                        self.scheduler.finish_request(request, RequestStatus.FINISHED_ERROR)
                self.outputs.remove(parent)
            raise
        elapsed = time.perf_counter() - started
        num_prefill = sum(len(it.token_ids) for it in scheduler_output.scheduled if not it.do_sample or
                          it.num_computed_tokens < it.num_prompt_tokens)
        self.stats["prompt_tokens"] += num_prefill
        if num_prefill:
            self.stats["prefill_seconds"] += elapsed
        else:
            self.stats["decode_seconds"] += elapsed
        touched = self.scheduler.update_from_output(scheduler_output, result)
        self.stats["generation_tokens"] += sum(len(v) for v in result.sampled_token_ids.values())
        for engine_id, entries in result.prompt_logprobs.items():
            self.outputs.add_prompt_logprobs(engine_id, entries)
        changed: dict[str, Request] = {}
        for request in touched:
            num_new = len(result.sampled_token_ids.get(request.request_id, ()))
            stop = self.outputs.process(request, num_new, result.logprobs.get(request.request_id))
            if stop is not None and not request.is_finished:
                request.stop_reason = stop
                self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
            changed[parent_id(request.request_id)[0]] = request
        outputs = []
        for request_id, request in changed.items():
            if request_id not in self.outputs.parents:
                continue
            output = self.outputs.output(request_id, metrics=request.metrics)
            if output.finished:
                self.outputs.remove(request_id)
            outputs.append(output)
        return outputs

    # ------------------------------------------------------------------ memory
    def kv_usage(self) -> dict[str, int | float]:
        """KV pages and bytes in use/free now, and the prefix-cache hit rate."""
        kv = self.kv_manager
        return {"used_bytes": kv.used_bytes(), "free_bytes": kv.free_bytes(), "total_bytes": self.kv_spec.total_bytes,
                "used_blocks": kv.pool.num_used_blocks, "free_blocks": kv.num_free_blocks,
                "num_blocks": self.kv_spec.num_blocks - 1, "block_size": self.kv_spec.block_size,
                "page_bytes": self.kv_spec.page_bytes, "prefix_hit_rate": kv.prefix_hit_rate}
