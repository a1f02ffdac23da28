"""`longfit bench decode`: prefill tokens/s at a prompt length and decode tokens/s at several batch sizes.

Each figure is the median of ``repeats`` runs; the first run of each shape is a warm-up and discarded.
Prompts are random token ids (no tokenizer cost), generation ignores EOS so every run decodes the same
number of tokens.
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from dataclasses import dataclass

from longfit.llm import LLM
from longfit.sampling_params import SamplingParams


@dataclass(slots=True)
class DecodeBenchResult:
    model: str
    prompt_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: dict[int, float]  # batch size → aggregate generated tokens/s
    peak_rss_bytes: int

    def lines(self) -> list[str]:
        out = [f"model {self.model}",
               f"prefill  {self.prompt_tokens:>5} tokens: {self.prefill_tokens_per_s:8.1f} tok/s"]
        for batch, rate in self.decode_tokens_per_s.items():
            out.append(f"decode   batch {batch:>3}   : {rate:8.1f} tok/s (aggregate)")
        out.append(f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")
        return out


def _random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(100, vocab_size - 1) for _ in range(length)]


def bench_decode(llm: LLM, prompt_tokens: int = 512, decode_tokens: int = 64, batch_sizes: tuple[int, ...] = (1,),
                 repeats: int = 3, seed: int = 0) -> DecodeBenchResult:
    engine = llm.engine
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    # Prefill: one request, one output token; time to first token over the prompt length.
    prefill_params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rates = []
    for run in range(repeats + 1):
        engine.kv_manager.reset_prefix_cache()
        prompt = _random_prompt(rng, prompt_tokens, vocab)
        started = time.perf_counter()
        llm.generate([prompt], prefill_params)
        if run:
            rates.append(prompt_tokens / (time.perf_counter() - started))
    prefill = statistics.median(rates)

    decode: dict[int, float] = {}
    params = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
    for batch in batch_sizes:
        rates = []
        for run in range(repeats + 1):
            prompts = [_random_prompt(rng, 16, vocab) for _ in range(batch)]
            ids = [engine.add_request(None, p, params) for p in prompts]
            # Run until every prompt is in and decoding, then time pure decode steps.
            while any(r.is_prefilling or r.status.name == "WAITING" for r in engine.scheduler.requests.values()):
                engine.step()
            produced_before = engine.stats["generation_tokens"]
            started = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            elapsed = time.perf_counter() - started
            if run:
                rates.append((engine.stats["generation_tokens"] - produced_before) / elapsed)
            assert not ids or not engine.has_unfinished_requests()
        decode[batch] = statistics.median(rates)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return DecodeBenchResult(engine.config.model, prompt_tokens, prefill, decode, peak)
