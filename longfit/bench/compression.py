"""`longfit bench compression`: what each KV compression spec costs and saves at a context length.

For every context length and spec (the full cache first), one request with a random-token prompt of that length
runs alone: prefill (timed to the first token, compression step included), then ``decode_tokens`` greedy steps.
Reported per spec: KV bytes per context token (exact stored bytes, and whole pages actually held), decode
tokens/s and its ratio to the full cache at the same length, and the prefill overhead relative to the full
cache's prefill. Specs alternate inside each repeat, so machine noise hits them alike; figures are medians. One
warm-up pass over the specs runs before the first context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from longfit.bench.peers import random_ids
from longfit.config import parse_tokens
from longfit.engine.output_processor import child_id
from longfit.llm import LLM
from longfit.sampling_params import SamplingParams

FULL = "none"
# Every method the engine applies, each at about 4x fewer KV bytes (Quest reads 512 tokens' pages of each head and
# frees nothing; ShadowKV keeps the values exact, so it saves at most 2x: rank 48 of SmolLM2's 192 key channels is
# 1.6x), and one composition. DuoAttention needs a head profile (`longfit profile-heads`): pass it with
# --spec duo:heads=PATH.
DEFAULT_SPECS = ("streaming:keep=0.25", "h2o:keep=0.25", "snapkv:keep=0.25", "chunkkv:keep=0.25", "pyramidkv:keep=0.25",
                 "tova:keep=0.25", "knorm:keep=0.25", "kivi:bits=2", "kivi:bits=2,key_bits=4", "kivi:bits=4",
                 "kvquant:bits=4", "int8",
                 "think:channels=0.5", "shadowkv:rank=48", "minicache:start=0", "quest:budget=512,page=32",
                 "snapkv:keep=0.25+kivi:bits=2")


@dataclass(slots=True)
class CompressionRow:
    spec: str
    context: int
    stored_bytes_per_token: float  # exact bytes of the request's KV / context tokens, after compression
    page_bytes_per_token: float  # whole pages held / context tokens
    prefill_seconds: float
    decode_tokens_per_s: float
    decode_ratio: float = 0.0  # vs the full cache at the same context
    prefill_overhead: float = 0.0  # prefill time / full-cache prefill time - 1


@dataclass(slots=True)
class CompressionBenchResult:
    model: str
    rows: list[CompressionRow] = field(default_factory=list)

    def markdown(self, context: int | None = None) -> str:
        """The table; only ``context``'s rows when given (printed as each context finishes)."""
        out = [("| context | spec | KV bytes/token (stored) | KV bytes/token (pages held) | compression | "
                "decode tok/s | decode vs full | prefill s | prefill overhead |"),
               "|---|---|---|---|---|---|---|---|---|"]
        full = {r.context: r for r in self.rows if r.spec == FULL}
        for r in self.rows:
            if context is not None and r.context != context:
                continue
            ratio = full[r.context].stored_bytes_per_token / r.stored_bytes_per_token if r.context in full else 0.0
            out.append(f"| {r.context} | `{r.spec}` | {r.stored_bytes_per_token:,.0f} | "
                       f"{r.page_bytes_per_token:,.0f} | "
                       f"{ratio:.2f}x | {r.decode_tokens_per_s:.1f} | {r.decode_ratio:.2f}x | "
                       f"{r.prefill_seconds:.2f} | {r.prefill_overhead:+.1%} |")
        return "\n".join(out)


def _run_one(llm: LLM, prompt: list[int], spec: str, decode_tokens: int) -> tuple[float, float, int, int]:
    """(prefill seconds, decode tok/s, stored bytes, page bytes) of one request run alone."""
    engine = llm.engine
    engine.kv_manager.reset_prefix_cache()  # every run computes its whole prompt
    params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True)
    request_id = engine.add_request(None, prompt, params, kv_compression=None if spec == FULL else spec)
    engine_id = child_id(request_id, 0)
    started = time.perf_counter()
    while not engine.step():  # steps until the first token comes out
        pass
    first = time.perf_counter()
    stored = engine.kv_manager.stored_bytes(engine_id)
    pages = engine.kv_manager.request_bytes(engine_id)
    produced = engine.stats["generation_tokens"]
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - first
    return first - started, (engine.stats["generation_tokens"] - produced) / elapsed, stored, pages


def bench_compression(llm: LLM, specs: list[str], contexts: list[int], decode_tokens: int = 32, repeats: int = 3,
                      seed: int = 0, on_context: Callable[[CompressionBenchResult, int], None] | None = None
                      ) -> CompressionBenchResult:
    """Run the full cache and every spec at every context length (see the module docstring).

    ``on_context(result, context)`` is called as each context length finishes (long runs report as they go).
    """
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    specs = [FULL] + [s for s in specs if s != FULL]
    result = CompressionBenchResult(engine.config.model)
    for context in contexts:
        prompt = random_ids(seed * 1_000_003 + context, context, vocab)
        samples: dict[str, list[tuple[float, float, int, int]]] = {s: [] for s in specs}
        # One warm-up pass over every spec, at the first context only: eager code paths (lookup tables, caches)
        # warm up once; a pass per context would double the cost of the long contexts for nothing.
        warm_up = 1 if context == contexts[0] else 0
        for run in range(repeats + warm_up):
            for spec in specs:
                measured = _run_one(llm, prompt, spec, decode_tokens)
                if run >= warm_up:
                    samples[spec].append(measured)
        for spec in specs:
            prefill = statistics.median(m[0] for m in samples[spec])
            decode = statistics.median(m[1] for m in samples[spec])
            stored, pages = samples[spec][-1][2], samples[spec][-1][3]
            result.rows.append(CompressionRow(spec, context, stored / context, pages / context, prefill, decode))
        full = result.rows[-len(specs)]
        for row in result.rows[-len(specs):]:
            row.decode_ratio = row.decode_tokens_per_s / full.decode_tokens_per_s
            row.prefill_overhead = row.prefill_seconds / full.prefill_seconds - 1.0
        if on_context is not None:
            on_context(result, context)
    return result


def add_compression_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bench compression`` (engine flags are added by the CLI)."""
    group = parser.add_argument_group("measurement")
    group.add_argument("--spec", action="append", default=None,
                       help="compression spec to measure (repeatable; default: every method at ~4x, see --help)")
    group.add_argument("--contexts", default="2k,8k", help="prompt lengths, e.g. 2k,8k")
    group.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps per run")
    group.add_argument("--repeats", type=int, default=3, help="measured runs per spec and context")
    group.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    group.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.epilog = "default specs: " + ", ".join(DEFAULT_SPECS)


def run_compression_bench(args: argparse.Namespace, llm: LLM) -> int:
    """Validate the flags, run :func:`bench_compression`, print the markdown table (and write --json)."""

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.decode_tokens < 1:
        raise ValueError(f"--decode-tokens must be >= 1, got {args.decode_tokens}")
    contexts = []
    for part in args.contexts.split(","):
        contexts.append(parse_tokens(part.strip(), "--contexts"))
    limit = llm.engine.max_model_len - args.decode_tokens - 1
    bad = [c for c in contexts if not 1 <= c <= limit]
    if bad:
        raise ValueError(f"--contexts must be between 1 and {limit} tokens (max_model_len minus the decode "
                         f"tokens), got {bad}")
    specs = list(args.spec) if args.spec else list(DEFAULT_SPECS)
    for spec in specs:
        if spec != FULL:  # a spec the engine cannot apply fails before anything runs, naming the problem
            llm.engine.check_kv_compression(spec)
    print(f"model {llm.engine.config.model}, {args.decode_tokens} decode tokens, median of {args.repeats} runs")

    def report(result: CompressionBenchResult, context: int) -> None:
        # Each context's rows as soon as they are measured; the JSON is rewritten with every row so far.
        print(result.markdown(context))
        sys.stdout.flush()
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"model": result.model, "rows": [asdict(r) for r in result.rows]}, out, indent=1)

    bench_compression(llm, specs, contexts, args.decode_tokens, args.repeats, args.seed, on_context=report)
    return 0
