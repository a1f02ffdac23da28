"""Turns scheduler progress into RequestOutputs: incremental text, stop strings, logprobs, n > 1 fan-in.

A user request with ``n`` completions runs as ``n`` engine requests (``{id}#{i}``) that share their prompt
pages through the prefix cache; this module gathers them back into one ``RequestOutput``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longfit.engine.request import Request, RequestStatus
from longfit.models.tokenizer import IncrementalDetokenizer
from longfit.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from longfit.sampling_params import SamplingParams


def child_id(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


def parent_id(engine_request_id: str) -> tuple[str, int]:
    head, _, index = engine_request_id.rpartition("#")
    return head, int(index)


@dataclass(slots=True)
class CompletionState:
    stream: IncrementalDetokenizer
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[CompletionState]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    metrics: object = None


class OutputProcessor:
    """Holds per-request text state; ``process`` returns the RequestOutputs that changed this step."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams) -> None:
        completions = [CompletionState(IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                              params.skip_special_tokens),
                                       logprobs=[] if params.logprobs is not None else None,
                                       cumulative_logprob=0.0 if params.logprobs is not None else None)
                       for _ in range(params.n)]
        self.parents[request_id] = ParentState(request_id, prompt, list(prompt_token_ids), params, completions,
                                               prompt_logprobs=[] if params.prompt_logprobs is not None else None)

    def remove(self, request_id: str) -> None:
        self.parents.pop(request_id, None)

    def add_prompt_logprobs(self, engine_request_id: str, entries: list[PositionLogprobs | None]) -> None:
        request_id, index = parent_id(engine_request_id)
        parent = self.parents.get(request_id)
        if parent is not None and index == 0 and parent.prompt_logprobs is not None:
            parent.prompt_logprobs.extend(entries)

    def process(self, request: Request, num_new: int, new_logprobs: list[PositionLogprobs] | None) -> str | None:
        """Fold a request's newest ``num_new`` tokens into its completion. Returns a stop string that was
        hit (the caller then finishes the request), else None."""
        request_id, index = parent_id(request.request_id)
        parent = self.parents.get(request_id)
        if parent is None:
            return None
        params = parent.params
        state = parent.completions[index]
        new_ids = request.output_token_ids[len(request.output_token_ids) - num_new:]
        state.token_ids.extend(new_ids)
        if new_logprobs and state.logprobs is not None:
            state.logprobs.extend(new_logprobs)
            for token, entry in zip(new_ids, new_logprobs):
                state.cumulative_logprob += entry[token].logprob
        # The EOS / stop token itself is not text (vLLM drops it from text; it stays in token_ids).
        emit_ids = new_ids
        if request.is_finished and request.status == RequestStatus.FINISHED_STOPPED and new_ids:
            emit_ids = new_ids[:-1]
        new_text = state.stream.push(emit_ids)
        if request.is_finished:
            new_text += state.stream.flush()
        hit = None
        if params.stop and new_text:
            # A stop string may straddle the old text and the new: search from its longest overlap.
            start = max(0, len(state.text) - max(len(s) for s in params.stop) + 1)
            state.text += new_text
            hit = self._find_stop(state, params, start)
        else:
            state.text += new_text
        if hit is None and request.is_finished:
            state.finish_reason = request.status.finish_reason
            state.stop_reason = request.stop_reason
        return hit

    @staticmethod
    def _find_stop(state: CompletionState, params: SamplingParams, start: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in params.stop:
            position = state.text.find(stop, start)
            if position >= 0 and (best is None or position < best[0]):
                best = (position, stop)
        if best is None:
            return None
        position, stop = best
        state.text = state.text[:position + (len(stop) if params.include_stop_str_in_output else 0)]
        state.finish_reason, state.stop_reason = "stop", stop
        return stop

    def finish_abort(self, engine_request_id: str, reason: str = "abort") -> None:
        request_id, index = parent_id(engine_request_id)
        parent = self.parents.get(request_id)
        if parent is not None and parent.completions[index].finish_reason is None:
            parent.completions[index].finish_reason = reason

    def output(self, request_id: str, metrics=None) -> RequestOutput:
        parent = self.parents[request_id]
        outputs = [CompletionOutput(index=i, text=c.text, token_ids=list(c.token_ids),
                                    cumulative_logprob=c.cumulative_logprob,
                                    logprobs=list(c.logprobs) if c.logprobs is not None else None,
                                    finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for i, c in enumerate(parent.completions)]
        finished = all(c.finish_reason is not None for c in parent.completions)
        return RequestOutput(request_id=request_id, prompt=parent.prompt, prompt_token_ids=parent.prompt_token_ids,
                             outputs=outputs, finished=finished, prompt_logprobs=parent.prompt_logprobs,
                             metrics=metrics)
