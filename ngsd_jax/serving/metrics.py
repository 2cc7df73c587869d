"""The server's Prometheus metrics, in a registry of their own (one per service)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# The kinds of request the server turns away (the HTTP layer's error kinds).
REJECTIONS = ("invalid_request", "context_length", "max_tokens", "not_found", "queue_full", "unavailable")


class Metrics:
    def __init__(self, slots: int):
        self.registry = registry = CollectorRegistry()
        self.queue_depth = Gauge("ngsd_queue_depth", "Requests waiting for a decode slot", registry=registry)
        self.running = Gauge("ngsd_running_slots", "Decode slots holding a request", registry=registry)
        Gauge("ngsd_slots", "Decode slots", registry=registry).set(slots)
        self.tokens_per_second = Gauge("ngsd_tokens_per_second",
                                       "Generated tokens per second over the last generate calls (about 5 s)",
                                       registry=registry)
        self.tokens = Counter("ngsd_generated_tokens", "Generated tokens", registry=registry)
        self.prompt_tokens = Counter("ngsd_prompt_tokens", "Prompt tokens prefilled", registry=registry)
        self.ttft = Histogram("ngsd_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.per_token = Histogram("ngsd_time_per_output_token_seconds",
                                   "Mean time between a request's tokens after the first", buckets=PER_TOKEN_BUCKETS,
                                   registry=registry)
        self.spikes = Counter("ngsd_spikes", "Steps at which a request's neuron fired", registry=registry)
        self.steered = Counter("ngsd_steered_tokens", "Tokens the expert changed from the base's own choice",
                               registry=registry)
        self.alpha = Counter("ngsd_requests_by_alpha", "Requests started, by the alpha they decode with",
                             ["alpha"], registry=registry)
        self.finished = Counter("ngsd_requests_finished", "Requests ended, by finish reason", ["finish_reason"],
                                registry=registry)
        self.model_refusals = Counter("ngsd_model_refusals",
                                      "Completions that open with a refusal phrase (refusals.EXPERT_OPENINGS)",
                                      ["mode"], registry=registry)
        self.rejected = Counter("ngsd_rejected_requests", "Requests turned away, by kind", ["kind"],
                                registry=registry)
        for kind in REJECTIONS:
            self.rejected.labels(kind)
        self._window: list[tuple[float, int]] = []

    def generated(self, count: int, now: float | None = None) -> None:
        """Counts a generate call's tokens and updates the rate over the last few seconds."""
        now = time.monotonic() if now is None else now
        self.tokens.inc(count)
        self._window.append((now, count))
        while len(self._window) > 1 and now - self._window[0][0] > 5.0:
            self._window.pop(0)
        span = now - self._window[0][0]
        if len(self._window) > 1 and span > 0:
            self.tokens_per_second.set(sum(n for _, n in self._window[1:]) / span)

    def idle(self) -> None:
        self._window.clear()
        self.tokens_per_second.set(0.0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
