"""The web app's counters (GET /metrics, Prometheus text) and its liveness (GET /health, /healthz).

Generations by entry point (the page, chat completions, completions) and how they ended, the tokens
read and written, errors by code, and the standard process_* metrics of the process; a registry per
app. Counts and durations only: never a prompt or an answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from ..server.metrics import CONTENT_TYPE, LATENCY_BUCKETS

PREFIX = "lambdasplit_web_"
ENTRY_POINTS = ("page", "chat_completions", "completions")
FIRST_TOKEN_BUCKETS = LATENCY_BUCKETS[4:] + (30.0,)


class WebMetrics:
    """What one web app counts. `track()` wraps a generation's events (run_chat's) and counts as they pass."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.generations = Counter(PREFIX + "generations_total", "Generations ended, by entry point and why "
                                   "(stop, length, cancelled, error).", ("api", "finish_reason"), registry=registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens_total", "Prompt tokens run through the head.",
                                     ("api",), registry=registry)
        self.completion_tokens = Counter(PREFIX + "completion_tokens_total", "Tokens generated.", ("api",),
                                         registry=registry)
        self.errors = Counter(PREFIX + "errors_total", "Generations that failed, by error code.", ("code",),
                              registry=registry)
        self.first_token = Histogram(PREFIX + "first_token_seconds", "Time from a generation's start to its "
                                     "first token (prefill, the body session's opening).", buckets=FIRST_TOKEN_BUCKETS,
                                     registry=registry)
        self.duration = Histogram(PREFIX + "generation_seconds", "Time of a whole generation.",
                                  buckets=FIRST_TOKEN_BUCKETS + (60.0, 120.0, 300.0), registry=registry)
        for api in ENTRY_POINTS:
            self.prompt_tokens.labels(api)
            self.completion_tokens.labels(api)

    def track(self, api: str, events: Iterator[dict], code_of: Callable[[BaseException], str | None]) -> Iterator[dict]:
        """`events`, unchanged, counted: the start (first token), the done event, or the error raised."""
        started = time.perf_counter()
        try:
            for event in events:
                if event.get("type") == "start":
                    self.first_token.observe(time.perf_counter() - started)
                elif event.get("type") == "done":
                    self.generations.labels(api, event["finish_reason"]).inc()
                    self.prompt_tokens.labels(api).inc(event["prompt_tokens"])
                    self.completion_tokens.labels(api).inc(event["completion_tokens"])
                    self.duration.observe(time.perf_counter() - started)
                yield event
        except Exception as exc:
            self.generations.labels(api, "error").inc()
            self.errors.labels(code_of(exc) or type(exc).__name__).inc()
            raise

    def router(self, check_key: Callable[[Request], None]) -> APIRouter:
        """GET /health and /healthz (no key), GET /metrics (the API key, when the app has one)."""
        api = APIRouter()

        @api.get("/health")
        @api.get("/healthz")
        def health():
            return {"status": "ok"}

        @api.get("/metrics")
        def metrics(request: Request):
            check_key(request)
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE)

        return api
