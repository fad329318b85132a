"""Prometheus metrics for ``GET /metrics``, split by whether ablation was on.

Each app gets its own registry (several servers can live in one process, as in tests). Engine
gauges (running and waiting requests) are read from the engine at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


def ablation_label(active: bool) -> str:
    return "on" if active else "off"


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        def seconds(name: str, doc: str) -> Histogram:
            return Histogram(
                name, doc, ["ablation"], buckets=LATENCY_BUCKETS, registry=self.registry
            )

        self.requests = counter(
            "abliserve_requests",
            "Finished generation requests",
            "endpoint",
            "ablation",
            "finish_reason",
        )
        self.errors = counter(
            "abliserve_request_errors", "Requests refused or failed, by HTTP status", "status"
        )
        self.prompt_tokens = counter(
            "abliserve_prompt_tokens", "Prompt tokens processed", "ablation"
        )
        self.generation_tokens = counter(
            "abliserve_generation_tokens", "Tokens generated", "ablation"
        )
        self.latency = seconds(
            "abliserve_request_latency_seconds", "Time from request to last token"
        )
        self.first_token = seconds(
            "abliserve_time_to_first_token_seconds", "Time from request to first token"
        )
        running = Gauge(
            "abliserve_requests_running", "Requests in the running batch", registry=self.registry
        )
        waiting = Gauge(
            "abliserve_requests_waiting", "Requests queued for a batch slot", registry=self.registry
        )
        running.set_function(lambda: engine_stats().get("running", 0.0))
        waiting.set_function(lambda: engine_stats().get("waiting", 0.0))

    def record(
        self,
        endpoint: str,
        label: str,
        finish_reasons: list[str],
        prompt_tokens: int,
        generation_tokens: int,
        started: float,
        first_token_at: float | None,
    ) -> None:
        """One finished request (both engines' request paths record through here): its finish
        reasons, tokens, and latencies measured from ``started`` (``time.perf_counter``)."""
        for reason in finish_reasons:
            self.requests.labels(endpoint, label, reason).inc()
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.generation_tokens.labels(label).inc(generation_tokens)
        self.latency.labels(label).observe(time.perf_counter() - started)
        if first_token_at is not None:
            self.first_token.labels(label).observe(first_token_at - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
