"""The webhook action: POST a JSON body built from a template, with retries."""

from __future__ import annotations

import json
import logging
import socket
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from ..notice import Notice

log = logging.getLogger("preemptwatch.sidecar")

#: The body posted when no template is given.
DEFAULT_TEMPLATE: dict[str, Any] = {
    "text": "preemptwatch: ${kind} notice from ${source} on ${instance_id} (${hostname}), "
    "${seconds_left}s left",
    "notice": "${notice}",
    "instance_id": "${instance_id}",
}

#: Placeholders a template may use.
PLACEHOLDERS = (
    "notice",
    "source",
    "kind",
    "id",
    "deadline",
    "seconds_left",
    "detected_at",
    "instance_id",
    "hostname",
)


class WebhookError(Exception):
    """The webhook answered with an error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"webhook answered {status}: {body[:200]}")
        self.status = status


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, WebhookError):
        return exc.status >= 500 or exc.status in (408, 429)
    return isinstance(exc, (aiohttp.ClientError, TimeoutError))


def _values(notice: Notice, instance_id: str | None) -> dict[str, Any]:
    left = notice.seconds_left()
    return {
        "notice": notice.to_dict(),
        "source": notice.source,
        "kind": notice.kind,
        "id": notice.id,
        "deadline": notice.deadline.isoformat() if notice.deadline else None,
        "seconds_left": None if left is None else round(left),
        "detected_at": notice.detected_at.isoformat(),
        "instance_id": instance_id or "",
        "hostname": socket.gethostname(),
    }


def render(template: Any, notice: Notice, instance_id: str | None) -> Any:
    """``template`` with placeholders filled in. A string that is exactly one
    placeholder (``"${notice}"``) becomes the value itself (an object, a number or null);
    placeholders inside longer strings become text. Keys are filled in too."""
    values = _values(notice, instance_id)
    text = {k: "" if v is None else str(v) for k, v in values.items()}

    def fill(node: Any) -> Any:
        if isinstance(node, str):
            stripped = node.strip()
            if stripped.startswith("${") and stripped.endswith("}") and stripped[2:-1] in values:
                return values[stripped[2:-1]]
            return string.Template(node).substitute(text)
        if isinstance(node, list):
            return [fill(item) for item in node]
        if isinstance(node, dict):
            return {string.Template(str(k)).substitute(text): fill(v) for k, v in node.items()}
        return node

    return fill(template)


def load_template(text: str) -> Any:
    """Parse and check a template (JSON text); ``ValueError`` says what is wrong."""
    try:
        template = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"webhook template is not valid JSON: {exc}") from None
    try:
        render(template, Notice("ec2", "terminate", id="check"), "i-check")
    except KeyError as exc:
        raise ValueError(
            f"webhook template uses unknown placeholder {exc}; known: {', '.join(PLACEHOLDERS)}"
        ) from None
    except ValueError as exc:
        raise ValueError(f"webhook template has a bad placeholder: {exc}") from None
    return template


@dataclass
class Webhook:
    """POSTs the rendered template to ``url``: each attempt bounded by ``timeout``,
    retried with jittered backoff on connection errors, timeouts, 408, 429 and 5xx, for
    at most ``attempts`` tries and never past the notice's deadline."""

    url: str
    template: Any = field(default_factory=lambda: DEFAULT_TEMPLATE)
    timeout: float = 5.0
    attempts: int = 5
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL must start with http:// or https://, not {self.url!r}")
        if self.timeout <= 0 or self.attempts < 1:
            raise ValueError("webhook timeout must be positive and attempts at least 1")

    async def post(self, notice: Notice, instance_id: str | None) -> bool:
        """Deliver once; True when the webhook answered 2xx. Never raises."""
        body = render(self.template, notice, instance_id)
        left = notice.seconds_left()
        stop: Any = stop_after_attempt(self.attempts)
        if left is not None:
            stop = stop | stop_after_delay(max(left, self.timeout))
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception(_retryable),
                    wait=wait_random_exponential(multiplier=0.2, max=5),
                    stop=stop,
                    reraise=True,
                ):
                    with attempt:
                        async with session.post(
                            self.url, json=body, headers=dict(self.headers)
                        ) as resp:
                            if resp.status >= 300:
                                raise WebhookError(resp.status, await resp.text())
            log.info("webhook %s notified", self.url)
            return True
        except Exception as exc:
            log.error("webhook %s failed: %s", self.url, exc)
            return False
