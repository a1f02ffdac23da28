"""`longfit generate | chat | bench | plan`: flags for engine options are generated from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing

from longfit.config import CacheConfig, RuntimeConfig, SchedulerConfig, parse_bytes

DEFAULT_PROMPT = "Explain in one short paragraph why the KV cache limits how many users an LLM server can handle."
_FLAG_ALIASES = {"memory_bytes": "--kv-cache-memory"}
_ENGINE_CONFIGS = (CacheConfig, SchedulerConfig, RuntimeConfig)


def _flag_type(hint, name: str):
    if name == "memory_bytes":
        return lambda text: parse_bytes(text, "--kv-cache-memory")
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if typing.get_origin(base) is typing.Annotated:
        base = typing.get_args(base)[0]
    inner = [a for a in typing.get_args(base) if a is not type(None)]
    return inner[0] if inner else base


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of CacheConfig, SchedulerConfig and RuntimeConfig, help text from Annotated."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="GGUF path, Hugging Face directory, or short name: smollm2-135m (default), gemma3-270m")
    parser.add_argument("--kv-compression", default=None, help="KV compression spec, e.g. snapkv:keep=0.25+kivi:bits=2")
    for config in _ENGINE_CONFIGS:
        group = parser.add_argument_group(config.__name__)
        hints = typing.get_type_hints(config, include_extras=True)
        for field in dataclasses.fields(config):
            hint = hints[field.name]
            help_text = typing.get_args(hint)[1] if typing.get_origin(hint) is typing.Annotated else field.name
            flag = _FLAG_ALIASES.get(field.name, "--" + field.name.replace("_", "-"))
            kind = _flag_type(hint, field.name)
            if kind is bool:
                group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                   help=f"{help_text} (default: {field.default})")
            else:
                group.add_argument(flag, dest=field.name, type=kind, default=None,
                                   help=f"{help_text} (default: {field.default})")


def engine_kwargs(args: argparse.Namespace) -> dict:
    names = {f.name for config in _ENGINE_CONFIGS for f in dataclasses.fields(config)}
    return {name: value for name, value in vars(args).items() if name in names and value is not None}


def _build_llm(args: argparse.Namespace):
    from longfit.llm import LLM

    return LLM(args.model, kv_compression=args.kv_compression, **engine_kwargs(args))


def _sampling(args: argparse.Namespace):
    from longfit.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop or None, structured_output=_structured(args))


def _structured(args: argparse.Namespace):
    """The ``--json-schema / --json / --regex / --choice / --grammar`` constraint, or None (``@path`` reads a file)."""
    from longfit.sampling_params import StructuredOutput

    def text(flag: str, value: str) -> str:
        if not value.startswith("@"):
            return value
        try:
            with open(value[1:], encoding="utf-8") as handle:
                return handle.read()
        except OSError as error:
            raise ValueError(f"{flag}: cannot read {value[1:]}: {error.strerror}") from None

    given = {"json_schema": args.json_schema and text("--json-schema", args.json_schema),
             "json_object": args.json or False, "regex": args.regex, "choice": tuple(args.choice or ()) or None,
             "grammar": args.grammar and text("--grammar", args.grammar)}
    given = {name: value for name, value in given.items() if value not in (None, False)}
    return StructuredOutput(**given) if given else None


def _add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    group.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    group.add_argument("--stop", action="append", help="stop string (repeatable)")
    constrain = parser.add_argument_group("structured output (one of; needs llguidance, the serve extra)")
    constrain.add_argument("--json-schema", help="JSON schema the output must follow (JSON text, or @file)")
    constrain.add_argument("--json", action="store_true", default=None, help="any JSON object")
    constrain.add_argument("--regex", help="regular expression the output must match")
    constrain.add_argument("--choice", action="append", help="one allowed output (repeatable)")
    constrain.add_argument("--grammar", help="Lark grammar of the output (text, or @file)")


def _stream(llm, prompt, params) -> tuple[object, float, float, float]:
    """Print text as it comes; return the final output, start time, first-token time, end time."""
    started = time.perf_counter()
    first = None
    printed = 0
    final = None
    for output in llm.generate_stream(prompt, params):
        if first is None:
            first = time.perf_counter()
        text = output.outputs[0].text
        sys.stdout.write(text[printed:])
        sys.stdout.flush()
        printed = len(text)
        final = output
    return final, started, first or time.perf_counter(), time.perf_counter()


def _summary(llm, output, started: float, first: float, ended: float) -> str:
    generated = len(output.outputs[0].token_ids)
    prompt_tokens = len(output.prompt_token_ids)
    prefill = prompt_tokens / max(first - started, 1e-9)
    decode = (generated - 1) / (ended - first) if generated > 1 and ended > first else 0.0
    kv_bytes = output.metrics.kv_bytes if output.metrics is not None else 0  # pages held at the last step
    return (f"[prompt {prompt_tokens} tok | generated {generated} tok | prefill {prefill:.1f} tok/s | "
            f"decode {decode:.1f} tok/s | KV {kv_bytes / 2**20:.2f} MiB ({kv_bytes} B) | "
            f"finish {output.outputs[0].finish_reason}]")


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else (DEFAULT_PROMPT if sys.stdin.isatty() or
                                                          sys.stdin.closed else sys.stdin.read() or DEFAULT_PROMPT)
    llm = _build_llm(args)
    params = _sampling(args)
    if not args.raw:
        prompt = llm.render_chat([{"role": "user", "content": prompt}])
    output, started, first, ended = _stream(llm, prompt, params)
    print()
    print(_summary(llm, output, started, first, ended), file=sys.stderr if args.quiet_summary else sys.stdout)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _build_llm(args)
    params = _sampling(args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("longfit chat — empty line or /exit to quit; earlier turns stay in the KV cache (prefix cache).")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line or line in ("/exit", "/quit"):
            break
        messages.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        output, started, first, ended = _stream(llm, llm.render_chat(messages), params)
        print()
        print(_summary(llm, output, started, first, ended))
        messages.append({"role": "assistant", "content": output.outputs[0].text})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`bench decode|prefill|context`: longfit (and --peer engines) on the same figures, one table."""
    from longfit.bench.decode import run_micro_bench

    return run_micro_bench(args, _build_llm(args), args.bench)


def cmd_bench_compression(args: argparse.Namespace) -> int:
    from longfit.bench.compression import run_compression_bench

    return run_compression_bench(args, _build_llm(args))


def _plan_model_config(name: str):
    """Short names and tiny presets resolve to a ModelConfig without loading weights."""
    from longfit.models.model_config import load_model_config
    from longfit.models.resolve import resolve_model_path
    from longfit.models.tiny import TINY_PRESETS, tiny_model_config

    if name in TINY_PRESETS:
        return tiny_model_config(name)
    return load_model_config(resolve_model_path(name))


def cmd_plan(args: argparse.Namespace) -> int:
    from longfit.plan.planner import run_plan_command

    return run_plan_command(args, load_model=_plan_model_config)


def cmd_profile_heads(args: argparse.Namespace) -> int:
    from longfit.eval.heads import run_profile_heads

    return run_profile_heads(args, _build_llm(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longfit", description="Long contexts that fit: an LLM engine with a "
                                     "paged, compressible KV cache.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate from a prompt, streaming the text, then a summary line")
    generate.add_argument("prompt", nargs="?", default=None, help="prompt text (default: stdin or a demo prompt)")
    generate.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    generate.add_argument("--quiet-summary", action="store_true", help="print the summary line to stderr")
    _add_sampling_arguments(generate)
    add_engine_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="interactive chat with the model's template")
    chat.add_argument("--system", default=None, help="system message")
    _add_sampling_arguments(chat, max_tokens=256)
    add_engine_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    bench = commands.add_parser("bench", help="measure throughput")
    bench_kind = bench.add_subparsers(dest="bench", required=True)
    from longfit.bench.decode import add_micro_bench_arguments

    for name, text in (("decode", "decode tok/s at --batch-sizes (and prefill at --prompt-tokens), roofline, RSS"),
                       ("prefill", "prefill tok/s at --lengths (default 512,4k), RSS"),
                       ("context", "batch-1 decode tok/s at --depths (default 0,2k,8k), roofline, RSS")):
        micro = bench_kind.add_parser(name, help=text + "; --peer llama.cpp|transformers adds ratios")
        add_micro_bench_arguments(micro, name)
        add_engine_arguments(micro)
        micro.set_defaults(func=cmd_bench)

    from longfit.bench.compression import add_compression_bench_arguments

    compression = bench_kind.add_parser("compression", help="KV bytes/token, decode tok/s and prefill overhead of "
                                        "each --kv-compression spec vs the full cache, at --contexts")
    add_compression_bench_arguments(compression)
    add_engine_arguments(compression)
    compression.set_defaults(func=cmd_bench_compression)

    from longfit.bench.serve import add_bench_serve_arguments, run_bench_serve

    serve_bench = bench_kind.add_parser("serve", help="load-test an OpenAI-compatible server: TTFT/TPOT/ITL, throughput")
    add_bench_serve_arguments(serve_bench)
    serve_bench.set_defaults(func=run_bench_serve)

    from longfit.server.app import add_serve_arguments, run_serve

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, prefix cache)")
    add_serve_arguments(serve)
    add_engine_arguments(serve)
    serve.set_defaults(func=run_serve)

    from longfit.eval.harness import add_eval_arguments, run_eval

    evaluate = commands.add_parser("eval", help="fidelity: full cache vs compression specs on the same samples")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=run_eval)

    from longfit.plan.planner import add_plan_arguments

    plan = commands.add_parser("plan", help="capacity planner: will it fit, how many users, how fast")
    add_plan_arguments(plan)
    plan.set_defaults(func=cmd_plan)

    from longfit.eval.heads import add_profile_heads_arguments

    heads = commands.add_parser("profile-heads", help="score retrieval heads on passkey prompts (for duo_attention)")
    add_profile_heads_arguments(heads)
    add_engine_arguments(heads)
    heads.set_defaults(func=cmd_profile_heads)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:  # bad input: one clear line, no traceback
        print(f"longfit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
