"""``longfit eval --peer kvpress``: the same samples through NVIDIA kvpress's presses on the same model.

The model is the same GGUF file, loaded by transformers (dequantized, fp32). Inputs are the *same token ids* longfit
used: the press pipeline's ``_forward`` is called with ``context_ids`` / ``questions_ids`` built by the harness
(``[BOS] + context | question + answer_prefix``), which bypasses the pipeline's own tokenization and chat template
(transformers' SmolLM2 GGUF tokenizer differs slightly from llama.cpp's, and a chat template hurts small models).
kvpress then does what longfit does: prefill the context under the press (compression at the end of the context
prefill), prefill the question uncompressed, decode greedily.

Spec → press, at the *same* ratio: kvpress's ``compression_ratio`` is the fraction of context KV removed, so per
sample ``cr = 1 - mean_layer(kept tokens) / context tokens`` with longfit's own counting
(``kept_tokens_per_layer``): snapkv → SnapKVPress(window_size, kernel_size), streaming → StreamingLLMPress(n_sink),
knorm → KnormPress, tova → TOVAPress, pyramidkv → PyramidKVPress(window_size, kernel_size), chunkkv →
ChunkKVPress(SnapKVPress(window_size), chunk_length) (not the same selection: kvpress ranks chunks by SnapKV's
pooled scores, window included, and keeps ``int(C * keep)`` whole chunks). Specs without a kvpress counterpart are
skipped. Rows get ``engine="kvpress"``; the full-cache row runs without a press.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from longfit.compression.spec import kept_tokens_per_layer, parse_spec

ENGINE = "kvpress"
_PRESSES = {"snapkv": "SnapKVPress", "streaming_llm": "StreamingLLMPress", "knorm": "KnormPress",
            "tova": "TOVAPress", "pyramidkv": "PyramidKVPress", "chunkkv": "ChunkKVPress"}


def missing_packages() -> list[str]:
    return [name for name in ("kvpress", "transformers") if importlib.util.find_spec(name) is None]


def press_for(spec: str, context_tokens: int, num_layers: int) -> Any | None:
    """The kvpress press matching ``spec`` at the same compression ratio, or None if kvpress has no match."""
    import kvpress

    parsed = parse_spec(spec)
    if len(parsed.stages) != 1 or parsed.stages[0].name not in _PRESSES:
        return None
    stage = parsed.stages[0]
    kept = kept_tokens_per_layer(parsed, num_layers, context_tokens)
    ratio = min(max(1.0 - sum(kept) / (len(kept) * context_tokens), 0.0), 0.999)
    press_class = getattr(kvpress, _PRESSES[stage.name])
    params = stage.as_dict()
    if stage.name in ("snapkv", "pyramidkv"):
        return press_class(compression_ratio=ratio, window_size=params["window"], kernel_size=params["kernel"])
    if stage.name == "chunkkv":
        return press_class(press=kvpress.SnapKVPress(compression_ratio=ratio, window_size=params["window"]),
                           chunk_length=params["chunk"])
    if stage.name == "streaming_llm":
        return press_class(compression_ratio=ratio, n_sink=params["sinks"])
    return press_class(compression_ratio=ratio)


def load_pipeline(model_path: str) -> Any:
    """kvpress's text-generation pipeline over transformers' fp32 load of the GGUF at ``model_path``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    path = Path(model_path)
    if path.suffix != ".gguf":
        raise ValueError(f"--peer kvpress needs a GGUF model file, got {model_path}")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")


def run_peer(handle: Any, store: Any, options: Any) -> str | None:
    """Run the stored samples through kvpress; returns a message when skipped (missing packages), else None."""
    missing = missing_packages()
    if missing:
        return f"--peer kvpress skipped: {', '.join(missing)} not installed (pip install kvpress)"
    import torch
    from tqdm import tqdm

    from longfit.eval import tasks as task_registry
    from longfit.eval.harness import FULL, load_samples

    pipe = None
    specs = [FULL] + [s for s in options.specs if press_for(s, 1024, handle.model_config.num_layers) is not None]
    skipped = [s for s in options.specs if s not in specs]
    total = len(options.lengths) * len(options.tasks) * len(specs) * options.samples
    with tqdm(total=total, desc="kvpress", unit="sample") as bar:
        for length in options.lengths:
            for task in options.tasks:
                samples = load_samples(store, handle, task, length, options.samples, options.seed)
                for spec in specs:
                    for sample in samples:
                        bar.update(1)
                        if store.has(ENGINE, "task", task, length, spec, sample.index):
                            continue
                        if pipe is None:
                            pipe = load_pipeline(str(handle.llm.engine.model_path))
                        ids, boundary = handle.sample_ids(sample)
                        press = None if spec == FULL else press_for(spec, boundary, handle.model_config.num_layers)
                        budget = sample.max_new_tokens if options.max_new_tokens is None else min(
                            options.max_new_tokens, sample.max_new_tokens)
                        inputs = {"context_ids": torch.tensor([ids[:boundary]]),
                                  "questions_ids": [torch.tensor([ids[boundary:]])]}
                        with torch.no_grad():
                            prediction = pipe._forward(inputs, max_new_tokens=budget, press=press)[0]
                        store.add({"engine": ENGINE, "kind": "task", "task": task, "length": length, "spec": spec,
                                   "index": sample.index, "status": "ok", "prediction": prediction,
                                   "score": task_registry.score(sample, prediction), "prompt_tokens": len(ids),
                                   "context_tokens": boundary, "kv_bytes": handle.kv_bytes(spec, boundary),
                                   "kv_bytes_full": handle.kv_bytes(FULL, boundary), "answers": list(sample.answers),
                                   "compression_ratio": None if press is None else press.compression_ratio})
                    store.save()
    return f"--peer kvpress: no matching press for {', '.join(skipped)}" if skipped else None
