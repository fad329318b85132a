"""Prometheus metrics for ``GET /metrics``, split by whether ablation was on.

Each app gets its own registry (several servers can live in one process, as in tests). Engine
gauges (running and waiting requests) are read from the engine at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


def ablation_label(active: bool) -> str:
    return "on" if active else "off"


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "abliserve_requests",
            "Finished generation requests",
            ["endpoint", "ablation", "finish_reason"],
            registry=self.registry,
        )
        self.errors = Counter(
            "abliserve_request_errors",
            "Requests refused or failed, by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "abliserve_prompt_tokens",
            "Prompt tokens processed",
            ["ablation"],
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "abliserve_generation_tokens",
            "Tokens generated",
            ["ablation"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "abliserve_request_latency_seconds",
            "Time from request to last token",
            ["ablation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "abliserve_time_to_first_token_seconds",
            "Time from request to first token",
            ["ablation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        running = Gauge(
            "abliserve_requests_running", "Requests in the running batch", registry=self.registry
        )
        waiting = Gauge(
            "abliserve_requests_waiting", "Requests queued for a batch slot", registry=self.registry
        )
        running.set_function(lambda: engine_stats().get("running", 0.0))
        waiting.set_function(lambda: engine_stats().get("waiting", 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
