"""Prometheus metrics of the sidecar, fed by a `Watcher` listener."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..notice import Notice, _parse_iso

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..watcher import Watcher

#: How far ahead of ``time`` EC2 publishes a spot instance-action (its "two-minute warning").
EC2_SPOT_LEAD = timedelta(minutes=2)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def published_at(notice: Notice) -> datetime | None:
    """When the provider published ``notice``, where its body says so: a rebalance
    recommendation's ``noticeTime``; an EC2 spot instance-action's ``time`` minus the
    two-minute lead. None for everything else."""
    raw = notice.raw if isinstance(notice.raw, dict) else {}
    try:
        if notice.source == "ec2" and notice.kind == "rebalance" and raw.get("noticeTime"):
            return _parse_iso(str(raw["noticeTime"]))
        if notice.source == "ec2" and raw.get("action") and raw.get("time"):
            return _parse_iso(str(raw["time"])) - EC2_SPOT_LEAD
    except ValueError:
        return None
    return None


class _HealthCollector(Collector):
    """Reads ``Watcher.health`` at scrape time."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def collect(self) -> Iterable[GaugeMetricFamily]:
        last_ok = GaugeMetricFamily(
            "preemptwatch_last_successful_poll_timestamp_seconds",
            "Unix time of the last successful poll, by source.",
            labels=["source"],
        )
        up = GaugeMetricFamily(
            "preemptwatch_source_up", "1 while the source is running, by source.", labels=["source"]
        )
        for name, health in list(self.watcher.health.items()):
            if health.last_ok is not None:
                last_ok.add_metric([name], health.last_ok)
            up.add_metric([name], 1.0 if health.running else 0.0)
        yield last_ok
        yield up


class Metrics:
    """The sidecar's metrics in their own registry (``/metrics`` serves only these)."""

    def __init__(self, watcher: Watcher) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.notices = Counter(
            "preemptwatch_notices",
            "Notices seen, by source and kind.",
            ["source", "kind"],
            registry=r,
        )
        self.poll_errors = Counter(
            "preemptwatch_poll_errors", "Failed polls, by source.", ["source"], registry=r
        )
        self.preempting = Gauge(
            "preemptwatch_preempting", "1 once a notice that counts has arrived.", registry=r
        )
        self.detection_latency = Histogram(
            "preemptwatch_detection_latency_seconds",
            "Seconds from the provider publishing a notice to the sidecar seeing it "
            "(only for notices whose body tells when they were published).",
            ["source"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.seconds_left = Gauge(
            "preemptwatch_notice_seconds_left",
            "Seconds to the deadline when the first counting notice was seen.",
            registry=r,
        )
        self.actions = Counter(
            "preemptwatch_actions",
            "Actions taken on a notice, by action and outcome.",
            ["action", "outcome"],
            registry=r,
        )
        self.action_latency = Histogram(
            "preemptwatch_action_latency_seconds",
            "Seconds from detection to an action's completion, by action.",
            ["action"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        r.register(_HealthCollector(watcher))

    def listener(self, event: str, data: Any) -> None:
        """`Watcher.add_listener` hook."""
        if event == "notice":
            notice: Notice = data
            self.notices.labels(notice.source, notice.kind).inc()
            published = published_at(notice)
            if published is not None:
                latency = (notice.detected_at - published).total_seconds()
                self.detection_latency.labels(notice.source).observe(max(0.0, latency))
        elif event == "poll_error":
            self.poll_errors.labels(data[0]).inc()
        elif event == "preempting":
            self.preempting.set(1)
            left = data.seconds_left()
            if left is not None:
                self.seconds_left.set(left)

    def action_done(self, action: str, ok: bool, notice: Notice) -> None:
        """Count one action's outcome and how long after detection it finished."""
        self.actions.labels(action, "ok" if ok else "failed").inc()
        self.action_latency.labels(action).observe(time.monotonic() - notice.detected_monotonic)

    def render(self) -> bytes:
        """The text exposition."""
        return generate_latest(self.registry)
