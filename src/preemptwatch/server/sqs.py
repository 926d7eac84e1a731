"""The cloud event queue: EC2 events from EventBridge, through SQS, mark runs preempting.

``preemptwatch server --sqs-queue URL`` long-polls the queue (``WaitTimeSeconds`` 20, up
to 10 messages) with boto3 in a worker thread (``AWS_ENDPOINT_URL_SQS`` or
``AWS_ENDPOINT_URL`` point it elsewhere, as boto3 itself does) and marks every running
run of the event's instance preempting, in every project. Events acted on:

- ``EC2 Spot Instance Interruption Warning`` -> kind ``terminate``/``stop``/``hibernate``
  (``detail.instance-action``), deadline two minutes after the event's ``time``;
- ``EC2 Instance Rebalance Recommendation`` -> kind ``rebalance``;
- ``EC2 Instance State-change Notification`` with ``detail.state`` stopping or stopped
  (kind ``stop``), shutting-down or terminated (kind ``terminate``).

Events wrapped in an SNS notification are unwrapped. **Deletion rule:** a message is
deleted once handled (an instance with no runs is handled too), and when it can never be
handled: malformed messages (not JSON, not an EventBridge event, no instance ID) are
logged with their start and deleted, events of other types or states are deleted
quietly. When marking fails (database down) the message is left alone; SQS delivers it
again after the queue's visibility timeout, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from ..errors import ConfigError
from ..notice import Notice, _parse_iso
from ..sidecar.threads import in_daemon_thread

log = logging.getLogger("preemptwatch.server.sqs")

SPOT_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"
STATE_CHANGE = "EC2 Instance State-change Notification"
STATE_KINDS = {
    "stopping": "stop",
    "stopped": "stop",
    "shutting-down": "terminate",
    "terminated": "terminate",
}
SPOT_ACTIONS = ("terminate", "stop", "hibernate")
SPOT_LEAD = timedelta(minutes=2)

#: ``handler(instance_id, notice)`` marks the instance's runs; returns their IDs.
Handler = Callable[[str, Notice], Awaitable[list[str]]]


class MalformedEvent(ValueError):
    """A message that can never be handled."""


@dataclass(frozen=True)
class InstanceEvent:
    """One EC2 event that concerns an instance's runs."""

    instance_id: str
    notice: Notice


def parse_event(body: str) -> InstanceEvent | None:
    """The event in an SQS message body; None for an event we do not act on;
    `MalformedEvent` for anything else."""
    try:
        event = json.loads(body)
    except (TypeError, ValueError) as exc:
        raise MalformedEvent(f"not JSON: {exc}") from None
    if isinstance(event, dict) and event.get("Type") == "Notification" and "Message" in event:
        return parse_event(str(event["Message"]))  # EventBridge -> SNS -> SQS
    if not isinstance(event, dict) or not isinstance(event.get("detail-type"), str):
        raise MalformedEvent("not an EventBridge event (no detail-type)")
    kind_of = event["detail-type"]
    if kind_of not in (SPOT_WARNING, REBALANCE, STATE_CHANGE):
        return None
    detail = event.get("detail")
    if not isinstance(detail, dict):
        raise MalformedEvent(f"{kind_of} without a detail object")
    instance_id = detail.get("instance-id")
    if not isinstance(instance_id, str) or not re.fullmatch(r"[\w.:-]{1,128}", instance_id):
        raise MalformedEvent(f"{kind_of} without a valid detail.instance-id")
    when = None
    if isinstance(event.get("time"), str):
        try:
            when = _parse_iso(event["time"])
        except ValueError:
            raise MalformedEvent(f"bad time {event['time']!r}") from None
    if kind_of == SPOT_WARNING:
        action = detail.get("instance-action")
        kind = action if action in SPOT_ACTIONS else "terminate"
        deadline = when + SPOT_LEAD if when else None
    elif kind_of == REBALANCE:
        kind, deadline = "rebalance", None
    else:
        state = detail.get("state")
        if state not in STATE_KINDS:
            return None
        kind, deadline = STATE_KINDS[state], when
    event_id = str(event.get("id") or "")
    notice = Notice("ec2", kind, deadline=deadline, raw=event, id=event_id)
    return InstanceEvent(instance_id, notice)


def _region(queue_url: str) -> str:
    match = re.match(r"https?://sqs[.-]([a-z0-9-]+)\.amazonaws\.com", queue_url)
    if match:
        return match.group(1)
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def make_client(queue_url: str, wait_time: int = 20) -> Any:
    """A boto3 SQS client for ``queue_url``, honouring ``AWS_ENDPOINT_URL(_SQS)``, with
    a read timeout longer than the long poll."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_SQS") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        connect_timeout=5,
        read_timeout=wait_time + 10,
        retries={"mode": "standard", "max_attempts": 2},
    )
    return boto3.client("sqs", region_name=_region(queue_url), endpoint_url=endpoint, config=config)


class SqsConsumer:
    """Long-polls ``queue_url`` and hands each instance event to ``handler``."""

    def __init__(
        self,
        queue_url: str,
        handler: Handler,
        *,
        client: Any = None,
        wait_time: int = 20,
        max_messages: int = 10,
        max_backoff: float = 30.0,
    ) -> None:
        if not queue_url.startswith(("http://", "https://")):
            raise ValueError(f"the SQS queue must be given as its URL, not {queue_url!r}")
        if not 0 <= wait_time <= 20 or not 1 <= max_messages <= 10:
            raise ValueError("SQS allows WaitTimeSeconds 0..20 and 1..10 messages")
        self.queue_url = queue_url
        self.handler = handler
        self.client = client or make_client(queue_url, wait_time)
        self.wait_time = wait_time
        self.max_messages = max_messages
        self.max_backoff = max_backoff
        #: Counters, for logs and tests: handled, ignored, malformed, failed.
        self.counts = {"handled": 0, "ignored": 0, "malformed": 0, "failed": 0}

    async def run(self) -> None:
        """Consume until cancelled; receive errors are retried with jittered backoff."""

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            n = state.attempt_number
            level = logging.WARNING if n == 1 or n % 20 == 0 else logging.DEBUG
            log.log(level, "SQS receive from %s failed (attempt %d): %s", self.queue_url, n, exc)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_random_exponential(multiplier=0.5, max=self.max_backoff),
            before_sleep=before_sleep,
        )
        log.info("consuming EC2 events from %s", self.queue_url)
        while True:
            async for attempt in retrying.copy():
                with attempt:
                    await self.poll_once()

    async def poll_once(self) -> int:
        """One receive (long poll) and the handling of what came; returns how many
        messages were deleted."""
        answer = await in_daemon_thread(
            self.client.receive_message,
            QueueUrl=self.queue_url,
            WaitTimeSeconds=self.wait_time,
            MaxNumberOfMessages=self.max_messages,
        )
        deleted = 0
        for message in answer.get("Messages", []):
            if await self.handle(message):
                await in_daemon_thread(
                    self.client.delete_message,
                    QueueUrl=self.queue_url,
                    ReceiptHandle=message["ReceiptHandle"],
                )
                deleted += 1
        return deleted

    async def handle(self, message: Mapping[str, Any]) -> bool:
        """Handle one message; True when it may be deleted."""
        body = str(message.get("Body", ""))
        try:
            event = parse_event(body)
        except MalformedEvent as exc:
            self.counts["malformed"] += 1
            log.error(
                "deleting malformed SQS message %s (%s): %.200s",
                message.get("MessageId"),
                exc,
                body,
            )
            return True
        if event is None:
            self.counts["ignored"] += 1
            return True
        try:
            marked = await self.handler(event.instance_id, event.notice)
        except Exception as exc:
            self.counts["failed"] += 1
            log.error(
                "could not mark instance %s (SQS will deliver the event again): %s",
                event.instance_id,
                exc,
            )
            return False
        self.counts["handled"] += 1
        log.warning(
            "%s event for instance %s: marked %d run(s) preempting %s",
            event.notice.kind,
            event.instance_id,
            len(marked),
            marked,
        )
        return True


def store_handler(store: Any) -> Handler:
    """A handler marking the instance's running runs in every project of ``store`` (a
    `RunStore`)."""
    from .schema import RUNNING_LITERAL, runs

    async def handler(instance_id: str, notice: Notice) -> list[str]:
        async with store.db.read() as conn:
            result = await conn.execute(
                sa.select(runs.c.project_id)
                .where(runs.c.instance_id == instance_id, runs.c.state == RUNNING_LITERAL)
                .distinct()
            )
            project_ids = sorted(result.scalars())
        marked: list[str] = []
        for project_id in project_ids:
            marked += await store.mark_instance(project_id, instance_id, notice.to_dict())
        return marked

    return handler


def install_sqs_consumer(app: Any) -> None:
    """Run an `SqsConsumer` beside the server app when its config names a queue."""
    from .app import CONTEXT

    ctx = app[CONTEXT]
    queue = ctx.config.sqs_queue
    if not queue:
        return
    try:
        consumer = SqsConsumer(queue, store_handler(ctx.store))
    except ValueError as exc:
        raise ConfigError(f"--sqs-queue: {exc}") from None
    tasks: list[asyncio.Task[None]] = []

    async def start(app: Any) -> None:
        tasks.append(asyncio.ensure_future(consumer.run()))

    async def stop(app: Any) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.on_startup.append(start)
    app.on_cleanup.insert(0, stop)  # before the database closes
