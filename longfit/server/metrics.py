"""Prometheus metrics of one server (``GET /metrics``), in its own registry so several apps can share a process.

Request metrics (counters, latency histograms) are recorded by the handlers when a request ends; engine
state (running/waiting requests, KV blocks, prefix-cache hit rate, preemptions) is read at scrape time
from the snapshot the engine loop publishes after every step (``AsyncLLMEngine.stats``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from longfit.engine.async_engine import RequestStream

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Buckets in seconds, as vLLM's (CPU decode steps are slower, so the tails reach further).
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
# Values of the ``status`` label of longfit_requests_total.
REQUEST_STATUSES = ("success", "aborted", "error", "invalid", "rejected")


class _EngineCollector(Collector):
    """Engine gauges, read from the loop's latest snapshot at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        gauges = (
            ("longfit_num_requests_running", "Requests running in the engine (holding KV blocks)", "num_running"),
            ("longfit_num_requests_waiting", "Requests waiting to be scheduled", "num_waiting"),
            ("longfit_kv_blocks_used", "KV blocks (pages) in use", "kv_blocks_used"),
            ("longfit_kv_blocks_free", "KV blocks free or evictable (cached but unreferenced)", "kv_blocks_free"),
            ("longfit_kv_blocks_total", "KV blocks in the pool", "kv_blocks_total"),
            ("longfit_kv_cache_usage_ratio", "Fraction of KV blocks in use", "kv_usage"),
            ("longfit_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up",
             "prefix_hit_rate"),
        )
        for name, documentation, key in gauges:
            yield GaugeMetricFamily(name, documentation, value=float(stats.get(key, 0.0)))
        counters = (
            ("longfit_num_preemptions", "Requests preempted (recomputed later) because KV blocks ran out",
             "num_preemptions"),
            ("longfit_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "prefix_queries"),
            ("longfit_prefix_cache_hits", "Prompt tokens found in the prefix cache", "prefix_hits"),
            ("longfit_engine_step_errors", "Engine steps that raised (their requests failed)", "num_step_errors"),
        )
        for name, documentation, key in counters:
            yield CounterMetricFamily(name, documentation, value=float(stats.get(key, 0.0)))


class ServerMetrics:
    """Counters and histograms of one server; ``render()`` is the /metrics body."""

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("longfit_requests", "HTTP generation requests by outcome: success, aborted "
                                "(client went away), error (engine failure), invalid (4xx), rejected (queue full)",
                                ["status"], registry=registry)
        for status in REQUEST_STATUSES:
            self.requests.labels(status=status)
        self.finished = Counter("longfit_request_finish", "Finished completions by finish reason (stop, length)",
                                ["reason"], registry=registry)
        self.prompt_tokens = Counter("longfit_prompt_tokens", "Prompt tokens of admitted requests", registry=registry)
        self.generation_tokens = Counter("longfit_generation_tokens", "Generated tokens", registry=registry)
        self.ttft = Histogram("longfit_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_TTFT_BUCKETS, registry=registry)
        self.tpot = Histogram("longfit_time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request", buckets=_TOKEN_BUCKETS, registry=registry)
        self.itl = Histogram("longfit_inter_token_latency_seconds", "Time between consecutive token deliveries",
                             buckets=_TOKEN_BUCKETS, registry=registry)
        self.e2e = Histogram("longfit_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_E2E_BUCKETS, registry=registry)
        registry.register(_EngineCollector(stats))

    def observe_stream(self, stream: RequestStream) -> None:
        """Record the latencies and token counts of one engine request when its consumer is done with it."""
        output = stream.latest
        if output is not None:
            self.prompt_tokens.inc(len(output.prompt_token_ids))
            self.generation_tokens.inc(sum(len(c.token_ids) for c in output.outputs))
            for completion in output.outputs:
                if completion.finish_reason in ("stop", "length"):
                    self.finished.labels(reason=completion.finish_reason).inc()
        events = stream.events
        if not events:
            return
        self.ttft.observe(events[0].time - stream.arrival_time)
        for previous, current in itertools.pairwise(events):
            self.itl.observe(current.time - previous.time)
        if stream.finish_time is not None:
            self.e2e.observe(stream.finish_time - stream.arrival_time)
        # Tokens per completion: with n > 1 every step adds one token to each running completion.
        num_tokens = max((len(c.token_ids) for c in output.outputs), default=0) if output is not None else 0
        if num_tokens > 1:
            self.tpot.observe((events[-1].time - events[0].time) / (num_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
