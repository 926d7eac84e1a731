"""Prometheus metrics of one server (its own registry, so several apps can share a process)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class Metrics:
    """The server's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "preemptwatch_http_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "preemptwatch_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.heartbeat_batch = Histogram(
            "preemptwatch_heartbeat_batch_size",
            "heartbeats written per statement",
            registry=self.registry,
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
        )
        self.reaped = Counter(
            "preemptwatch_runs_reaped",
            "runs ended by the reaper, by resulting state",
            ["state"],
            registry=self.registry,
        )
        self.queued = Counter(
            "preemptwatch_runs_requeued",
            "runs appended to a sweep's run queue",
            registry=self.registry,
        )
        self.reap_seconds = Histogram(
            "preemptwatch_reaper_pass_seconds",
            "duration of one reaper pass",
            registry=self.registry,
        )

        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe_request(self, request: web.Request, status: int, seconds: float) -> None:
        """Count one request and its latency (label children cached: this is per request)."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        key = (route, request.method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, request.method, str(status)),
                self.latency.labels(route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def exposition(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
