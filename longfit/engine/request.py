"""Request: one completion as the scheduler sees it. No torch here.

A request's ``num_computed_tokens`` catches up with ``num_tokens`` (prompt + output) step by step; the
KV bookkeeping of the request (page tables per layer, physical token counts) lives in ``KVCacheManager``.
"""

from __future__ import annotations

import enum
import time

from longfit.outputs import RequestMetrics
from longfit.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """States after PREEMPTED count as finished: ``is_finished`` is ``status > PREEMPTED``."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error"}.get(self)


class Request:
    """Prompt, generated tokens and progress of one completion."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = (), max_tokens: int | None = None,
                 kv_compression: str | None = None, arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.output_token_ids: list[int] = []
        # NOTE: one list holds prompt + output so slicing the next tokens to feed never copies the prompt.
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens if max_tokens is not None else sampling_params.max_tokens
        self.eos_token_ids = eos_token_ids
        # Tokens that end the request once min_tokens are out: EOS (unless ignore_eos) and stop_token_ids
        self.stop_ids = frozenset(sampling_params.stop_token_ids) | frozenset(
            () if sampling_params.ignore_eos else eos_token_ids)
        self.kv_compression = kv_compression
        boundary = sampling_params.kv_compression_boundary
        # Prompt tokens after which compression runs (the rest of the prompt is prefilled uncompressed).
        self.compress_at = min(boundary, self.num_prompt_tokens) if boundary else self.num_prompt_tokens
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.stop_reason: int | str | None = None
        self.metrics = RequestMetrics(arrival_time=arrival_time if arrival_time is not None else time.monotonic())
        # Set by the scheduler: whether the runner already holds this request's block tables.
        self.runner_has_table = False
        self.is_compressed = False  # after compaction the cache no longer mirrors the tokens one to one

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self) -> RequestStatus | None:
        """Token-level stop conditions after a new token: EOS, stop token ids, max_tokens."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens and last in self.stop_ids:
            # EOS reports no stop reason, even when it is also one of the stop token ids
            eos = not params.ignore_eos and last in self.eos_token_ids
            self.stop_reason = None if eos else last
            return RequestStatus.FINISHED_STOPPED
        if self.max_tokens is not None and self.num_output_tokens >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens})")
