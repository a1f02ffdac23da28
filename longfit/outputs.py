"""Plain dataclasses that cross the engine/runtime boundary and reach the user. No torch here.

Data flow of one step: ``Request`` (engine) → ``SchedulerOutput`` → ``ModelRunner.execute`` (runtime) →
``ModelRunnerOutput`` → ``Scheduler.update_from_output`` → ``RequestOutput``. The scheduler owns requests
and block ids; the runner owns tensors and a mirror of each running request's block tables, kept in sync
by the page ids in ``ScheduledRequest.new_block_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longfit.sampling_params import SamplingParams


# ---------------------------------------------------------------- user-facing results (vLLM-shaped)
@dataclass(slots=True)
class Logprob:
    """Log-probability of one token, with its rank in the distribution (1 = most likely)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id → Logprob (the sampled/prompt token plus the top-k alternatives).
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    kv_bytes: int = 0  # KV bytes the request held when it last ran


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    metrics: RequestMetrics | None = None


# ---------------------------------------------------------------- scheduler → runner
@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step.

    The runner feeds ``token_ids`` at logical positions ``num_computed_tokens ...
    num_computed_tokens + len(token_ids) - 1``; in layer ``l`` they are written at physical cache slots
    ``num_cached_tokens[l] ...`` (equal to the logical positions unless compression removed tokens).
    ``new_block_ids[l]`` are the pages appended to layer ``l``'s block table this step; when
    ``reset_block_table`` is set they are the whole table (new or resumed request).
    """

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    num_cached_tokens: list[int]
    new_block_ids: list[list[int]]
    reset_block_table: bool
    num_prompt_tokens: int
    sampling_params: SamplingParams
    # Whether this step produces a sampled token (false for a prompt chunk that is not the last).
    do_sample: bool
    # Tokens generated so far (needed for penalties); a reference to the request's own list.
    output_token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    kv_compression: str | None = None
    compress_at: int = 0  # prompt tokens after which compression runs
    stop_ids: frozenset[int] = frozenset()  # ``Request.stop_ids``: a multi-step decode stops at them


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    finished_request_ids: set[str]
    num_batched_tokens: int
    # Pages whose contents must be copied (source, destination) before the step (unused for now).
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Decode steps the runner may take (multi-step decoding): above 1 only when every scheduled request decodes one
    # token, and each has pages for this many tokens. The runner returns 1 to num_steps tokens per request, the same
    # count for all; a request's token ids then run on from the first as its inputs.
    num_steps: int = 1

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


# ---------------------------------------------------------------- runner → scheduler
@dataclass(slots=True)
class CompactionResult:
    """After a compression step: tokens kept per layer (physical), so whole leftover pages can be freed.

    Quantized storage (None: unchanged): per layer, ``quant_tokens`` leading tokens are stored as a byte stream of
    ``quant_bytes`` bytes on the first ``quant_pages`` pages of the table; the rest follow in ordinary pages.
    """

    request_id: str
    num_kept_tokens: list[int]
    quant_tokens: list[int] | None = None
    quant_pages: list[int] | None = None
    quant_bytes: list[int] | None = None


@dataclass(slots=True)
class ModelRunnerOutput:
    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[PositionLogprobs | None]] = field(default_factory=dict)
    compactions: list[CompactionResult] = field(default_factory=list)
