"""Scheduler: a token budget per step, no prefill/decode phases (vLLM v1 / Sarathi-Serve). No torch here.

Each request's ``num_computed_tokens`` catches up with its ``num_tokens`` (prompt + output). A step first
gives every running request what it needs (one token for a decode, a chunk for an unfinished prompt),
then admits waiting requests with prompt chunks while the budget (``max_num_batched_tokens``) and
``max_num_seqs`` allow, so long prompts never stall running decodes. When pages run out, the most
recently admitted running request is preempted (its pages freed, recomputed later with the same result).

Data flow: ``schedule() -> SchedulerOutput`` → ``ModelRunner.execute`` → ``ModelRunnerOutput`` →
``update_from_output`` appends tokens, applies compactions and finishes requests.
"""

from __future__ import annotations

import time
from collections import deque

from longfit.config import SchedulerConfig
from longfit.engine.request import Request, RequestStatus
from longfit.kv.manager import KVCacheManager
from longfit.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_queue``; the caller should retry later."""


class Scheduler:
    """Owns requests and decides what runs each step.

    Args:
        config: budgets.
        kv_manager: page bookkeeping.
        max_model_len: longest prompt + output any request may reach.
    """

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0

    # ------------------------------------------------------------------ admission
    def validate_request(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """Raise ValueError if a request could never run here."""
        if num_prompt_tokens == 0:
            raise ValueError("prompt must contain at least one token")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"prompt has {num_prompt_tokens} tokens; the context (max_model_len) is "
                             f"{self.max_model_len}, so the prompt must have at most {self.max_model_len - 1}")
        peak = self.max_model_len if max_tokens is None else min(self.max_model_len, num_prompt_tokens + max_tokens)
        if not self.kv.can_ever_fit(peak):
            capacity = (self.kv.spec.num_blocks - 1) * self.kv.block_size // max(1, self.kv.num_layers)
            raise ValueError(f"request needs {peak} tokens of KV cache but the whole cache holds about {capacity} "
                             "tokens; raise the KV memory budget or lower max_tokens")

    def add_request(self, request: Request) -> None:
        # Invalid input is refused before a full queue: retrying a request that can never run is pointless.
        self.validate_request(request.num_prompt_tokens, request.max_tokens)
        if self.config.max_queue is not None and len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting (max_queue={self.config.max_queue})")
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_requests(self, request_ids: list[str]) -> list[Request]:
        """Cancel requests at any point; their pages return to the pool at once."""
        aborted = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None and not request.is_finished:
                self.finish_request(request, RequestStatus.FINISHED_ABORTED)
                aborted.append(request)
        return aborted

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        request.metrics.finished_time = time.monotonic()
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        self._finished_ids.add(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ scheduling
    def _num_new_tokens(self, request: Request, budget: int) -> int:
        num_new = min(request.num_tokens - request.num_computed_tokens, budget)
        # NOTE: a compressing request stops its chunk where compression runs (the prompt's end by default).
        if request.kv_compression and not request.is_compressed and request.num_computed_tokens < request.compress_at:
            num_new = min(num_new, request.compress_at - request.num_computed_tokens)
        return num_new

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.is_compressed = False
        request.runner_has_table = False
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self._finished_ids.add(request.request_id)  # the runner drops its state; it is rebuilt on resume
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:  # one function on purpose: the order of the phases is the policy
        budget = self.config.max_num_batched_tokens
        num_tokens: dict[str, int] = {}
        scheduled_running: list[Request] = []
        preempted = False

        # 1. Running requests, oldest first: decodes cost one token, unfinished prompts a chunk.
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._num_new_tokens(request, budget)
            if num_new <= 0:
                index += 1
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status == RequestStatus.PREEMPTED:
                break
            num_tokens[request.request_id] = num_new
            scheduled_running.append(request)
            budget -= num_new
            index += 1

        # 2. Waiting requests (new or preempted), in arrival order, while budget and seats remain.
        scheduled_new: list[Request] = []
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.num_computed_tokens == 0 and request.request_id not in self.kv.requests:
                request.num_computed_tokens = self.kv.get_computed_blocks(request)
                request.metrics.num_cached_prompt_tokens = request.num_computed_tokens
            num_new = self._num_new_tokens(request, budget)
            if not self.kv.allocate_slots(request, num_new):
                # Give back any prefix pages taken for it; it will look again next step.
                self.kv.free(request)
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.monotonic()
            self.running.append(request)
            scheduled_new.append(request)
            num_tokens[request.request_id] = num_new
            budget -= num_new

        num_steps = 1 if preempted or scheduled_new else self._decode_steps(scheduled_running)
        scheduled = [self._scheduled_request(r, num_tokens[r.request_id]) for r in scheduled_running + scheduled_new]
        finished = self._finished_ids
        self._finished_ids = set()
        return SchedulerOutput(scheduled=scheduled, finished_request_ids=finished,
                               num_batched_tokens=sum(num_tokens.values()), num_steps=num_steps)

    def _decode_steps(self, scheduled: list[Request]) -> int:
        """Steps the runner may take this time (multi-step decoding, vLLM's ``num_scheduler_steps``): up to
        ``decode_steps`` while nobody waits for a free seat and every scheduled request decodes over plain pages (no KV
        compression, no sliding window: those read or rewrite pages between tokens) with output that token ids
        alone finish (no stop strings, penalties, logit bias or grammar, which need each token's text or the
        output so far); never past a request's ``max_tokens`` or the context. Pages for the extra tokens are
        reserved here (none if the pool is short: then one step)."""
        steps = self.config.decode_steps
        # A waiting request with a free seat could be admitted next step: one step. Without a seat it waits for a
        # request to finish, and a loop ends at the step where one does (a stop token, max_tokens): no delay.
        blocked = not self.waiting or len(self.running) >= self.config.max_num_seqs
        if steps == 1 or not blocked or not scheduled or any(w is not None for w in self.kv.spec.layer_windows):
            return 1
        for request in scheduled:
            params = request.sampling_params
            if (request.num_computed_tokens != request.num_tokens - 1 or request.is_prefilling
                    or request.kv_compression or params.stop
                    or params.needs_penalties or params.logit_bias or params.structured_output is not None):
                return 1
            if request.max_tokens is not None:
                steps = min(steps, request.max_tokens - request.num_output_tokens)
            steps = min(steps, self.max_model_len - request.num_tokens)
        if steps <= 1 or not all(self.kv.reserve_slots(request, steps - 1) for request in scheduled):
            return 1
        return steps

    def _scheduled_request(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        reset = not request.runner_has_table
        blocks = self.kv.full_tables(request) if reset else self.kv.take_new_blocks(request)
        request.runner_has_table = True
        cached_after = self.kv.num_cached_tokens(request)
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start:start + num_new],
            num_computed_tokens=start,
            num_cached_tokens=[count - num_new for count in cached_after],
            new_block_ids=blocks,
            reset_block_table=reset,
            num_prompt_tokens=request.num_prompt_tokens,
            sampling_params=request.sampling_params,
            do_sample=start + num_new == request.num_tokens,
            output_token_ids=request.output_token_ids,
            prompt_token_ids=request.prompt_token_ids,
            kv_compression=None if request.is_compressed else request.kv_compression,
            compress_at=request.compress_at,
            stop_ids=request.stop_ids,
        )

    # ------------------------------------------------------------------ results
    def update_from_output(self, scheduler_output: SchedulerOutput, result: ModelRunnerOutput) -> list[Request]:
        """Advance computed tokens, append sampled tokens, apply compactions, finish requests.

        Returns the requests that produced a token or finished this step (for the output processor).
        """
        touched: list[Request] = []
        compactions = {c.request_id: c for c in result.compactions}
        now = time.monotonic()
        for item in scheduler_output.scheduled:
            request = self.requests.get(item.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted or preempted while the step ran
            request.num_computed_tokens += len(item.token_ids)
            compaction = compactions.get(item.request_id)
            if compaction is not None:
                self.kv.apply_compaction(request, compaction)
            request.metrics.kv_bytes = self.kv.request_bytes(request.request_id)
            token_ids = result.sampled_token_ids.get(item.request_id)
            if not item.do_sample or not token_ids:
                continue
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            status = None
            if request.max_tokens == 0:  # prompt only (e.g. echo + prompt logprobs): nothing to append
                status = RequestStatus.FINISHED_LENGTH
                token_ids = []
            appended = 0
            for token_id in token_ids:
                request.append_output_token(token_id)
                appended += 1
                status = request.check_stop()
                if status is None and request.num_tokens >= self.max_model_len:
                    status = RequestStatus.FINISHED_LENGTH
                if status is not None:
                    break
            if appended < len(token_ids):  # a multi-step decode ran past a stop: its later tokens are dropped
                result.sampled_token_ids[item.request_id] = token_ids[:appended]
                if item.request_id in result.logprobs:
                    result.logprobs[item.request_id] = result.logprobs[item.request_id][:appended]
            if appended > 1 and status is None:
                # The tokens fed back within the step are computed now, and their slots (reserved) are counted.
                if not self.kv.allocate_slots(request, appended - 1):
                    raise RuntimeError("a multi-step decode's reserved pages are missing")
                request.num_computed_tokens += appended - 1
            touched.append(request)
            if status is not None:
                self.finish_request(request, status)
        return touched
