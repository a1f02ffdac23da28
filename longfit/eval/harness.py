"""``longfit eval``: what each KV-memory saving costs in quality, measured against the model's own full cache.

Runs the full cache and every compression spec on exactly the same generated samples (RULER-style tasks, paper
"RULER: What's the Real Context Size of Your Long-Context Language Models?"), following kvpress's protocol: the
*context* of each sample is compressed at the end of its prefill (``SamplingParams.kv_compression_boundary`` =
number of context tokens), then ``question + answer_prefix`` is prefilled uncompressed and the answer decoded
greedily. Optional extras: perplexity (``perplexity.py``), agreement with the full cache (``agreement.py``) and the
kvpress peer (``peer_kvpress.py``). Writes ``DIR/results.json`` (every sample and row; resumable),
``DIR/results.md`` and ``DIR/results.png`` (``report.py``).

``--shared-context``: SCBench's multi-turn mode instead (``shared_context.py``): one context, K questions asked in
turn with the golden answers of earlier turns in the prompt; every turn compresses the same tokens (the context, or
with ``--query-aware`` the context + first question), so it sees the same compressed context (rebuilt per turn, not
shared in memory); rows ``kind="shared"`` with a ``turn``.

Token ids fed to the engine: ``[BOS] + encode(context) + encode(question + answer_prefix)`` (no special tokens in
the two encodes), so the boundary is exact and the kvpress peer gets the very same ids.

KV bytes in the rows are ``longfit.compression.storage.kv_bytes`` of the context (exact stored bytes, no page
rounding; the uncompressed question/answer tokens are the same for every spec and are not counted), in the
engine's KV dtype. ``RequestOutput.metrics`` is not filled by the engine yet, so page-level measurements are not
reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longfit.compression.spec import parse_spec
from longfit.compression.storage import kv_bytes
from longfit.config import parse_tokens
from longfit.eval import shared_context
from longfit.eval import tasks as task_registry

FORMAT = "longfit.eval"
FULL = "full"  # spec label of the uncompressed baseline
ENGINE = "longfit"
RowKey = tuple[str, str, str, int, str, int, int]
DEFAULT_TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "vt", "fwe", "passkey")


# ------------------------------------------------------------------------------------------------ results file
def row_key(record: dict[str, Any]) -> RowKey:
    """A row is identified by (engine, kind, task, length, spec, index, turn); ``turn`` is 0 for rows without one
    (every kind but "shared"), so files written before turns existed keep their keys."""
    return (record["engine"], record["kind"], record["task"], int(record["length"]), record["spec"],
            int(record["index"]), int(record.get("turn", 0)))


class ResultStore:
    """The results JSON: ``{"format", "meta", "samples": {"task@length": [Sample dicts]}, "records": [rows]}``.

    Samples are stored so a resumed run (and the kvpress peer) sees exactly the same inputs; rows already present
    are skipped on resume. Saved atomically (temporary file + ``os.replace``) after every batch.
    """

    def __init__(self, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = {}
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self.records: list[dict[str, Any]] = []
        self._keys: dict[RowKey, int] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"--output: {self.path} is not a longfit eval results file")
            self.samples = data.get("samples", {})
            self.meta = data.get("meta", {})
            for record in data.get("records", []):
                self.add(record)
        self.meta.update(meta or {})

    def has(self, engine: str, kind: str, task: str, length: int, spec: str, index: int, turn: int = 0) -> bool:
        return (engine, kind, task, int(length), spec, int(index), int(turn)) in self._keys

    def get(self, engine: str, kind: str, task: str, length: int, spec: str, index: int,
            turn: int = 0) -> dict[str, Any] | None:
        position = self._keys.get((engine, kind, task, int(length), spec, int(index), int(turn)))
        return None if position is None else self.records[position]

    def add(self, record: dict[str, Any]) -> None:
        key = row_key(record)
        if key in self._keys:
            self.records[self._keys[key]] = record
        else:
            self._keys[key] = len(self.records)
            self.records.append(record)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "meta": self.meta, "samples": self.samples, "records": self.records}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------------ options
@dataclass(frozen=True, slots=True)
class EvalOptions:
    """Validated options of one ``longfit eval`` run. ``specs`` are canonical spec texts (no "full")."""

    model: str
    specs: tuple[str, ...]
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    samples: int
    seed: int
    output: str
    dtype: str = "bfloat16"
    max_new_tokens: int | None = None  # cap on each task's answer budget (None: the task's own)
    perplexity: bool = False
    agreement: bool = False
    peer: str | None = None
    query_aware: bool = False  # compress context + question (SnapKV's own protocol), not the context alone
    shared_context: bool = False  # SCBench multi-turn mode (shared_context.py): tasks from its registry
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if not self.lengths:
            raise ValueError("--lengths must name at least one length, e.g. 2k,4k")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.peer not in (None, "kvpress"):
            raise ValueError(f"--peer must be 'kvpress', got {self.peer!r}")
        if self.shared_context and self.peer is not None:
            raise ValueError("--shared-context cannot be combined with --peer (the kvpress peer runs single-question "
                             "samples only)")
        check_task = shared_context.shared_task_spec if self.shared_context else task_registry.task_spec
        for task in self.tasks:
            check_task(task)

    @property
    def all_specs(self) -> tuple[str, ...]:
        return (FULL, *self.specs)


def canonical_specs(texts: Sequence[str] | None) -> tuple[str, ...]:
    """Parse every spec (ValueError names the bad one); drops duplicates and "none"/"full"."""
    specs: list[str] = []
    for text in texts or ():
        if text.strip().lower() in ("none", FULL, ""):
            continue
        canonical = parse_spec(text).text
        if canonical not in specs:
            specs.append(canonical)
    return tuple(specs)


def parse_lengths(text: str) -> tuple[int, ...]:
    return tuple(parse_tokens(part, "--lengths") for part in text.split(",") if part.strip())


def parse_tasks(text: str | None, shared: bool = False) -> tuple[str, ...]:
    if not text:
        return shared_context.DEFAULT_TASKS if shared else DEFAULT_TASKS
    if text.strip() == "all":
        return tuple(shared_context.list_shared_tasks() if shared else task_registry.list_tasks())
    return tuple(part.strip() for part in text.split(",") if part.strip())


# ------------------------------------------------------------------------------------------------ model side
class ModelHandle:
    """The engine plus what the harness needs from it: token counting, prompt ids and KV-byte accounting."""

    def __init__(self, llm: Any, dtype_bytes: int, query_aware: bool = False) -> None:
        self.llm = llm
        self.query_aware = query_aware
        self.tokenizer = llm.get_tokenizer()
        self.model_config = llm.engine.model_config
        self.max_model_len = int(llm.engine.max_model_len)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        self.bos: list[int] = [bos] if bos is not None and getattr(self.tokenizer, "add_bos_token", False) else []
        self.dtype_bytes = dtype_bytes

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def sample_ids(self, sample: task_registry.Sample) -> tuple[list[int], int]:
        """``(prompt ids, boundary)``: BOS + context | question + answer prefix.

        Query-aware: the boundary moves to the last prompt token, so the compressed part holds the question too
        and a SnapKV observation window sees it (the SnapKV paper's setting); the one token left is prefilled
        uncompressed, in longfit and in the kvpress peer alike.
        """
        context = self.bos + self.encode(sample.context)
        ids = context + self.encode(sample.question + sample.answer_prefix)
        return ids, (len(ids) - 1 if self.query_aware else len(context))

    def kv_bytes(self, spec: str, num_tokens: int) -> int:
        return kv_bytes(None if spec == FULL else spec, self.model_config, num_tokens, self.dtype_bytes)


def load_samples(store: ResultStore, handle: ModelHandle, task: str, length: int, count: int,
                 seed: int) -> list[task_registry.Sample]:
    """The stored samples of (task, length), generated (and stored) if missing or too few."""
    key = f"{task}@{length}"
    stored = store.samples.get(key, [])
    if len(stored) < count:
        # NOTE: generation is deterministic and append-only, so regenerating extends the stored list unchanged.
        fresh = task_registry.generate(task, count, length - len(handle.bos), handle.count_tokens, seed)
        stored = stored + [s.to_dict() for s in fresh[len(stored):]]
        store.samples[key] = stored
    return [task_registry.Sample.from_dict(record) for record in stored[:count]]


def unsupported_reason(llm: Any, spec: str) -> str | None:
    """The engine's refusal message for a spec it parses but does not apply (quantization, ...), else None."""
    if spec == FULL:
        return None
    try:
        llm.engine.check_kv_compression(spec)
    except ValueError as error:
        return str(error)
    return None


# ------------------------------------------------------------------------------------------------ tasks
def run_task_group(handle: ModelHandle, store: ResultStore, task: str, length: int, spec: str,
                   samples: Sequence[task_registry.Sample], max_new_tokens: int | None,
                   reason: str | None) -> int:
    """Generate and score the samples of one (task, length, spec) not yet in ``store``; returns rows added."""
    from longfit.sampling_params import SamplingParams

    todo = [s for s in samples if not store.has(ENGINE, "task", task, length, spec, s.index)]
    if not todo:
        return 0
    rows: list[dict[str, Any]] = []
    prompts, params = [], []
    for sample in todo:
        ids, boundary = handle.sample_ids(sample)
        budget = sample.max_new_tokens if max_new_tokens is None else min(max_new_tokens, sample.max_new_tokens)
        prompts.append(ids)
        params.append(SamplingParams(max_tokens=budget, temperature=0.0,
                                     kv_compression_boundary=None if spec == FULL else boundary))
        rows.append({"engine": ENGINE, "kind": "task", "task": task, "length": length, "spec": spec,
                     "index": sample.index, "prompt_tokens": len(ids), "context_tokens": boundary,
                     "kv_bytes": handle.kv_bytes(spec, boundary), "kv_bytes_full": handle.kv_bytes(FULL, boundary),
                     "answers": list(sample.answers), "depth": sample.depth})
    return generate_rows(handle, store, spec, prompts, params, rows, reason,
                         lambda i, prediction: task_registry.score(todo[i], prediction))


def generate_rows(handle: ModelHandle, store: ResultStore, spec: str, prompts: Sequence[list[int]],
                  params: Sequence[Any], rows: list[dict[str, Any]], reason: str | None,
                  score: Callable[[int, str], float]) -> int:
    """Decode ``prompts`` under ``spec`` (greedy ``params``), fill each row with its prediction and
    ``score(i, prediction)``, or mark every row unsupported (``reason``, or the engine's refusal at admission);
    add the rows to ``store`` and save it. Returns the rows added."""
    if reason is not None:
        for row in rows:
            row.update(status="unsupported", message=reason, score=None)
    else:
        try:
            outputs = handle.llm.generate(list(prompts), list(params), kv_compression=None if spec == FULL else spec)
        except ValueError as error:  # refused at admission: record it, keep going with the other specs
            for row in rows:
                row.update(status="unsupported", message=str(error), score=None)
        else:
            for i, (row, output) in enumerate(zip(rows, outputs)):
                prediction = handle.decode(output.outputs[0].token_ids)
                row.update(status="ok", prediction=prediction, score=score(i, prediction),
                           finish_reason=output.outputs[0].finish_reason)
    for row in rows:
        store.add(row)
    store.save()
    return len(rows)


def run_tasks(handle: ModelHandle, store: ResultStore, options: EvalOptions,
              progress: Callable[[int], None]) -> None:
    """Every (length, task, spec) of ``options``, single-question tasks or (``--shared-context``) multi-turn ones;
    progress counts samples."""
    load, run_group = ((shared_context.load_shared_samples, shared_context.run_shared_group)
                       if options.shared_context else (load_samples, run_task_group))
    for length in options.lengths:
        for task in options.tasks:
            samples = load(store, handle, task, length, options.samples, options.seed)
            store.save()
            for spec in options.all_specs:
                run_group(handle, store, task, length, spec, samples, options.max_new_tokens,
                          unsupported_reason(handle.llm, spec))
                progress(len(samples))


# ------------------------------------------------------------------------------------------------ entry points
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``longfit eval``."""
    parser.add_argument("--model", default="smollm2-135m", help="short name, GGUF path or HF directory")
    parser.add_argument("--kv-compression", nargs="+", default=[], metavar="SPEC",
                        help="compression specs to compare with the full cache, e.g. snapkv:keep=0.25 "
                             "streaming:sinks=4,window=256")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated tasks or 'all' (default: {','.join(DEFAULT_TASKS)}); "
                             f"known: {','.join(task_registry.list_tasks())}; with --shared-context: "
                             f"{','.join(shared_context.list_shared_tasks())} (default: all of them)")
    parser.add_argument("--lengths", default="2k", help="comma-separated lengths in tokens, e.g. 2k,4k,8k")
    parser.add_argument("--samples", type=int, default=5, help="samples per task and length")
    parser.add_argument("--seed", type=int, default=42, help="seed of the task generators")
    parser.add_argument("--output", required=True, help="directory for results.json / results.md / results.png")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="engine dtype")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="cap each task's answer budget (faster on CPU; default: the task's own)")
    parser.add_argument("--perplexity", action="store_true", help="also measure perplexity per spec")
    parser.add_argument("--agreement", action="store_true",
                        help="also measure top-1 agreement and KL against the full cache")
    parser.add_argument("--peer", default=None, choices=("kvpress",), help="also run kvpress's presses")
    parser.add_argument("--query-aware", action="store_true",
                        help="compress context + question (SnapKV's own setting; default: the context alone, "
                             "kvpress's question-agnostic protocol); use its own --output. With --shared-context: "
                             "compress up to the end of the first question")
    parser.add_argument("--shared-context", action="store_true",
                        help="SCBench multi-turn mode: one context, several questions in turn (earlier turns "
                             "with their golden answers), every turn on the same compressed context")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="engine batch size")
    parser.add_argument("--kv-cache-memory", default=None, help="engine KV memory, e.g. 2GiB")


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    from longfit.config import parse_bytes

    engine_kwargs: dict[str, Any] = {}
    if getattr(args, "max_num_seqs", None):
        engine_kwargs["max_num_seqs"] = args.max_num_seqs
    if getattr(args, "kv_cache_memory", None):
        engine_kwargs["memory_bytes"] = parse_bytes(args.kv_cache_memory, "--kv-cache-memory")
    specs = args.kv_compression if isinstance(args.kv_compression, list) else [args.kv_compression or ""]
    shared = getattr(args, "shared_context", False)
    return EvalOptions(model=args.model, specs=canonical_specs(specs), tasks=parse_tasks(args.tasks, shared),
                       lengths=parse_lengths(args.lengths), samples=args.samples, seed=args.seed,
                       output=args.output, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                       perplexity=args.perplexity, agreement=args.agreement, peer=args.peer,
                       query_aware=getattr(args, "query_aware", False), shared_context=shared,
                       engine_kwargs=engine_kwargs)


def evaluate(options: EvalOptions, llm: Any | None = None, show_progress: bool = True) -> ResultStore:
    """Run everything ``options`` asks for (skipping rows already in the results file) and write the report."""
    from longfit.eval import report

    if llm is None:
        from longfit.llm import LLM

        llm = LLM(options.model, dtype=options.dtype, **options.engine_kwargs)
    handle = ModelHandle(llm, dtype_bytes=4 if options.dtype == "float32" else 2, query_aware=options.query_aware)
    too_long = [n for n in options.lengths if n > handle.max_model_len]
    if too_long:
        raise ValueError(f"--lengths must be <= the model's context {handle.max_model_len}, got {too_long}")
    out = Path(options.output)
    store = ResultStore(out / "results.json", meta={"model": options.model, "dtype": options.dtype,
                                                    "seed": options.seed, "tasks": list(options.tasks),
                                                    "lengths": list(options.lengths), "specs": list(options.specs),
                                                    "max_new_tokens": options.max_new_tokens})
    if store.records and store.meta.get("query_aware", False) != options.query_aware:  # one protocol per file
        raise ValueError(f"--query-aware: {out / 'results.json'} holds rows of the other protocol "
                         f"(query_aware={store.meta.get('query_aware', False)}); use another --output")
    store.meta["query_aware"] = options.query_aware
    specs = options.all_specs
    total = len(options.lengths) * len(specs) * (
        len(options.tasks) * options.samples + options.samples * (int(options.perplexity) + int(options.agreement)))
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="eval", unit="sample", file=sys.stderr)
    progress = bar.update if bar is not None else (lambda n: None)
    try:
        run_tasks(handle, store, options, progress)
        if options.perplexity:
            from longfit.eval.perplexity import run_perplexity

            run_perplexity(handle, store, options, progress)
        if options.agreement:
            from longfit.eval.agreement import run_agreement

            run_agreement(handle, store, options, progress)
    finally:
        if bar is not None:
            bar.close()
    if options.peer == "kvpress":
        from longfit.eval.peer_kvpress import run_peer

        message = run_peer(handle, store, options)
        if message:
            print(f"longfit eval: {message}", file=sys.stderr)
    store.save()
    report.write_report(store, out)
    return store


def run_eval(args: argparse.Namespace) -> int:
    """CLI entry: ``longfit eval ...``; returns the exit status."""
    options = options_from_args(args)
    store = evaluate(options)
    out = Path(options.output)
    print(f"wrote {out / 'results.json'} ({len(store.records)} rows), {out / 'results.md'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":  # ``python -m longfit.eval.harness ...`` until ``longfit eval`` is wired into the CLI
    _parser = argparse.ArgumentParser(prog="longfit eval", description=__doc__.splitlines()[0])
    add_eval_arguments(_parser)
    sys.exit(run_eval(_parser.parse_args()))
