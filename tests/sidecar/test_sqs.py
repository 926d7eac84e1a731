"""The SQS consumer against moto's server: EventBridge events mark instances."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import boto3
import pytest

from preemptwatch.notice import Notice
from preemptwatch.server.sqs import SqsConsumer, parse_event


def make_queue(name: str, visibility: int = 30) -> tuple[Any, str]:
    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": str(visibility)})
    return sqs, url["QueueUrl"]


def event(detail_type: str, **detail: str) -> str:
    return json.dumps(
        {
            "version": "0",
            "id": f"ev-{detail_type[:8]}-{detail.get('state', detail.get('instance-action', ''))}",
            "detail-type": detail_type,
            "source": "aws.ec2",
            "account": "123456789012",
            "time": "2026-11-23T17:00:00Z",
            "region": "us-east-1",
            "resources": [],
            "detail": detail,
        }
    )


def remaining(sqs: Any, url: str) -> int:
    attrs = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


class Recorder:
    """A handler that records calls; fails the first ``fail`` ones; knows one instance."""

    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[str, Notice]] = []
        self.fail = fail

    async def __call__(self, instance_id: str, notice: Notice) -> list[str]:
        self.calls.append((instance_id, notice))
        if self.fail:
            self.fail -= 1
            raise ConnectionError("database unavailable")
        return ["run-a", "run-b"] if instance_id == "i-known" else []


async def drain(consumer: SqsConsumer, sqs: Any, url: str, rounds: int = 5) -> None:
    for _ in range(rounds):
        await consumer.poll_once()
        if remaining(sqs, url) == 0:
            return


async def test_each_event_type_marks_its_instance(aws: str) -> None:
    sqs, url = make_queue("events-types")
    bodies = [
        event(
            "EC2 Spot Instance Interruption Warning",
            **{"instance-id": "i-known", "instance-action": "terminate"},
        ),
        event(
            "EC2 Spot Instance Interruption Warning",
            **{"instance-id": "i-2", "instance-action": "hibernate"},
        ),
        event("EC2 Instance Rebalance Recommendation", **{"instance-id": "i-3"}),
        *(
            event("EC2 Instance State-change Notification", **{"instance-id": f"i-{s}", "state": s})
            for s in ("stopping", "stopped", "shutting-down", "terminated", "running", "pending")
        ),
        event("AWS API Call via CloudTrail", **{"instance-id": "i-9"}),
    ]
    for body in bodies:
        sqs.send_message(QueueUrl=url, MessageBody=body)
    recorder = Recorder()
    consumer = SqsConsumer(url, recorder, wait_time=1)
    await drain(consumer, sqs, url)
    got = {(i, n.kind) for i, n in recorder.calls}
    assert got == {
        ("i-known", "terminate"),
        ("i-2", "hibernate"),
        ("i-3", "rebalance"),
        ("i-stopping", "stop"),
        ("i-stopped", "stop"),
        ("i-shutting-down", "terminate"),
        ("i-terminated", "terminate"),
    }
    assert remaining(sqs, url) == 0
    assert consumer.counts == {"handled": 7, "ignored": 3, "malformed": 0, "failed": 0}
    spot = next(n for i, n in recorder.calls if i == "i-known")
    assert spot.source == "ec2" and spot.deadline is not None
    assert spot.deadline.isoformat() == "2026-11-23T17:02:00+00:00"
    assert spot.raw["detail"]["instance-id"] == "i-known"


async def test_malformed_messages_are_logged_and_deleted(
    aws: str, caplog: pytest.LogCaptureFixture
) -> None:
    sqs, url = make_queue("events-malformed")
    for body in (
        "not json at all",
        "[1, 2]",
        json.dumps({"detail-type": "EC2 Instance Rebalance Recommendation"}),
        json.dumps(
            {"detail-type": "EC2 Instance Rebalance Recommendation", "detail": {"instance-id": 7}}
        ),
        event("EC2 Spot Instance Interruption Warning", **{"instance-id": "i-ok"}),
    ):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    recorder = Recorder()
    consumer = SqsConsumer(url, recorder, wait_time=1)
    await drain(consumer, sqs, url)
    assert [i for i, _ in recorder.calls] == ["i-ok"]
    assert consumer.counts["malformed"] == 4 and consumer.counts["handled"] == 1
    assert remaining(sqs, url) == 0
    assert "deleting malformed SQS message" in caplog.text


async def test_a_failed_handling_is_redelivered(aws: str) -> None:
    sqs, url = make_queue("events-redeliver", visibility=1)
    sqs.send_message(
        QueueUrl=url,
        MessageBody=event(
            "EC2 Instance State-change Notification",
            **{"instance-id": "i-known", "state": "stopping"},
        ),
    )
    recorder = Recorder(fail=1)
    consumer = SqsConsumer(url, recorder, wait_time=1)
    assert await consumer.poll_once() == 0
    assert remaining(sqs, url) == 1  # left in the queue, invisible for a while
    for _ in range(10):
        if await consumer.poll_once():
            break
    assert [i for i, _ in recorder.calls] == ["i-known", "i-known"]
    assert consumer.counts["failed"] == 1 and consumer.counts["handled"] == 1
    assert remaining(sqs, url) == 0


async def test_unknown_instances_are_fine_and_run_survives_outages(aws: str) -> None:
    sqs, url = make_queue("events-unknown")
    sqs.send_message(
        QueueUrl=url,
        MessageBody=event("EC2 Instance Rebalance Recommendation", **{"instance-id": "i-nobody"}),
    )
    recorder = Recorder()
    consumer = SqsConsumer(url, recorder, wait_time=1, max_backoff=0.2)
    task = asyncio.ensure_future(consumer.run())
    try:
        for _ in range(100):
            if consumer.counts["handled"]:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert consumer.counts["handled"] == 1 and remaining(sqs, url) == 0
    # An unreachable queue: run() keeps retrying instead of dying.
    broken = SqsConsumer(
        f"{aws}/123456789012/no-such-queue", recorder, wait_time=0, max_backoff=0.1
    )
    task = asyncio.ensure_future(broken.run())
    await asyncio.sleep(0.5)
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_sns_wrapped_events_and_bad_arguments() -> None:
    inner = event("EC2 Instance Rebalance Recommendation", **{"instance-id": "i-1"})
    parsed = parse_event(json.dumps({"Type": "Notification", "Message": inner}))
    assert parsed is not None and parsed.instance_id == "i-1" and parsed.notice.kind == "rebalance"
    with pytest.raises(ValueError, match="URL"):
        SqsConsumer("my-queue", Recorder(), client=object())
    with pytest.raises(ValueError, match="WaitTimeSeconds"):
        SqsConsumer("http://q", Recorder(), client=object(), wait_time=25)
