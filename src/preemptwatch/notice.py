"""The `Notice`: one warning that this machine is about to go away."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

#: Kinds that mean the machine will go away; they always count as preempting.
FINAL_KINDS = frozenset({"terminate", "stop", "hibernate", "preempt", "signal", "time-limit"})
#: Advisory kinds: early or scheduled warnings that count only by the watcher's policy
#: (``migrate``, a live migration that keeps the machine, never counts).
ADVISORY_KINDS = frozenset({"rebalance", "maintenance", "migrate"})
KINDS = FINAL_KINDS | ADVISORY_KINDS

#: Source names, as used in ``PREEMPTWATCH_SOURCES`` and ``Notice.source``.
SOURCE_NAMES = ("ec2", "gcp", "azure", "slurm", "signal", "sidecar")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def body_hash(body: Any) -> str:
    """A short stable hash of a JSON-able body, for notices that carry no ID."""
    if not isinstance(body, (str, bytes)):
        body = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    if isinstance(body, str):
        body = body.encode()
    return hashlib.sha256(body).hexdigest()[:16]


@dataclass(frozen=True)
class Notice:
    """A warning from one source.

    ``id`` identifies the event within its source (the provider's event ID, or a hash
    of the body); the watcher delivers each ``(source, id)`` once.
    ``deadline`` is when the machine goes away, if the source knows it.
    """

    source: str
    kind: str
    deadline: datetime | None = None
    detected_at: datetime = field(default_factory=utcnow)
    raw: Any = None
    id: str = ""
    #: Monotonic clock reading at detection, for latency measurements.
    detected_monotonic: float = field(default_factory=time.monotonic, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown notice kind {self.kind!r}; expected one of {sorted(KINDS)}")
        if not self.id:
            object.__setattr__(self, "id", body_hash([self.kind, self.raw]))

    @property
    def key(self) -> tuple[str, str]:
        """The de-duplication key: ``(source, id)``."""
        return (self.source, self.id)

    @property
    def advisory(self) -> bool:
        """True for early or scheduled warnings (rebalance, maintenance)."""
        return self.kind in ADVISORY_KINDS

    def seconds_left(self, now: datetime | None = None) -> float | None:
        """Seconds until the deadline (never negative), or None when unknown."""
        if self.deadline is None:
            return None
        now = now or utcnow()
        return max(0.0, (self.deadline - now).total_seconds())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (used by the sidecar, spool files and hooks)."""
        return {
            "source": self.source,
            "kind": self.kind,
            "id": self.id,
            "deadline": self.deadline.isoformat() if self.deadline else None,
            "detected_at": self.detected_at.isoformat(),
            "seconds_left": self.seconds_left(),
            "raw": self.raw,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Notice:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on malformed input."""
        try:
            deadline = data.get("deadline")
            detected = data.get("detected_at")
            return cls(
                source=str(data["source"]),
                kind=str(data["kind"]),
                id=str(data.get("id") or ""),
                deadline=_parse_iso(deadline) if deadline else None,
                detected_at=_parse_iso(detected) if detected else utcnow(),
                raw=data.get("raw"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed notice: {exc}") from exc

    def __str__(self) -> str:
        left = self.seconds_left()
        when = f", {left:.0f}s left" if left is not None else ""
        return f"{self.source} {self.kind} notice {self.id}{when}"


def _parse_iso(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed
