"""What the sidecar does on a notice: signals, the exec hook, the webhook."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sidecar_helpers import Receiver, Trigger

from preemptwatch.notice import Notice, utcnow
from preemptwatch.sidecar import (
    ExecHook,
    Sidecar,
    SidecarConfig,
    SignalTargets,
    Webhook,
    load_template,
    parse_signal,
)
from preemptwatch.sidecar.webhook import render

CHILD = """
import signal, sys, time
def got(*_):
    print("got", signal.Signals(_[0]).name, flush=True)
    sys.exit(0)
signal.signal(signal.SIGUSR1, got)
signal.signal(signal.SIGTERM, got)
print("ready", flush=True)
time.sleep(60)
sys.exit(3)
"""


def child(new_session: bool = False) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def notice(seconds: float = 120.0, kind: str = "terminate") -> Notice:
    deadline = utcnow() + timedelta(seconds=seconds)
    return Notice("ec2", kind, deadline=deadline, raw={"action": kind}, id=f"n-{kind}")


def config(trigger: Trigger, **kwargs: object) -> SidecarConfig:
    options: dict[str, object] = {"port": 0, "instance_id": "i-test", **kwargs}
    return SidecarConfig(sources=[trigger], **options)  # type: ignore[arg-type]


async def test_signals_pids_pid_files_and_process_groups(tmp_path: Path) -> None:
    by_pid, by_file, by_group = child(), child(), child(new_session=True)
    pid_file = tmp_path / "train.pid"
    pid_file.write_text(f"{by_file.pid}\n")
    targets = SignalTargets(
        sig=parse_signal("usr1"),
        pids=[by_pid.pid],
        pid_files=[pid_file, tmp_path / "missing.pid"],
        pgids=[by_group.pid],
    )
    trigger = Trigger()
    try:
        async with Sidecar(config(trigger, signals=targets)):
            await trigger.fire(notice())
            for proc in (by_pid, by_file, by_group):
                code = await asyncio.to_thread(proc.wait, 10)
                assert code == 0
                assert proc.stdout is not None
                assert proc.stdout.read().strip() == "got SIGUSR1"
    finally:
        for proc in (by_pid, by_file, by_group):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_signal_targets_refuse_bad_input() -> None:
    assert parse_signal("TERM") is signal.SIGTERM
    assert parse_signal("SIGUSR2") is signal.SIGUSR2
    assert parse_signal("10") is signal.Signals(10)
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal("SIGNOPE")
    with pytest.raises(ValueError, match="above 1"):
        SignalTargets(pids=[1])
    with pytest.raises(ValueError, match="above 1"):
        SignalTargets(pgids=[0])


async def test_exec_hook_gets_the_notice_in_its_environment(tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    script = (
        "import json, os, sys; "
        "json.dump({k: v for k, v in os.environ.items() if k.startswith('PREEMPTWATCH_')}, "
        f"open({str(out)!r}, 'w'))"
    )
    trigger = Trigger()
    n = notice(90)
    async with Sidecar(config(trigger, exec_hook=ExecHook([sys.executable, "-c", script]))) as sc:
        await trigger.fire(n)
        for _ in range(200):
            if out.exists() and out.stat().st_size:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        metrics = sc.metrics.render().decode()
    env = json.loads(out.read_text())
    assert json.loads(env["PREEMPTWATCH_NOTICE"])["id"] == n.id
    assert env["PREEMPTWATCH_NOTICE_SOURCE"] == "ec2"
    assert env["PREEMPTWATCH_NOTICE_KIND"] == "terminate"
    assert env["PREEMPTWATCH_NOTICE_ID"] == n.id
    assert env["PREEMPTWATCH_INSTANCE_ID"] == "i-test"
    assert 80 <= int(env["PREEMPTWATCH_NOTICE_SECONDS_LEFT"]) <= 90
    assert env["PREEMPTWATCH_NOTICE_DEADLINE"] == n.deadline.isoformat()  # type: ignore[union-attr]
    assert 'preemptwatch_actions_total{action="exec",outcome="ok"} 1.0' in metrics


async def test_exec_hook_is_killed_at_its_timeout(tmp_path: Path) -> None:
    hook = ExecHook([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    started = asyncio.get_running_loop().time()
    assert await hook.run(notice(), "i-1") is None
    assert asyncio.get_running_loop().time() - started < 5
    missing = ExecHook([str(tmp_path / "no-such-program")])
    assert await missing.run(notice(), "i-1") is None
    with pytest.raises(ValueError, match="needs a command"):
        ExecHook([])


async def test_webhook_retries_until_delivered_once(receiver: Receiver) -> None:
    receiver.statuses = [503, 502]
    template = load_template('{"text": "${kind} on ${instance_id}", "n": "${notice}", "x": 1}')
    trigger = Trigger()
    webhook = Webhook(receiver.url, template=template, timeout=2)
    async with Sidecar(config(trigger, webhook=webhook)):
        await trigger.fire(notice())
        await asyncio.wait_for(receiver.got.wait(), 10)
        await trigger.fire(notice(kind="stop"))  # a second notice: no second webhook
        await asyncio.sleep(0.3)
    assert receiver.attempts == 3
    assert len(receiver.bodies) == 1
    body = receiver.bodies[0]
    assert body["text"] == "terminate on i-test"
    assert body["n"]["kind"] == "terminate" and body["n"]["id"] == "n-terminate"
    assert body["x"] == 1


async def test_webhook_gives_up_on_client_errors_and_slow_answers(receiver: Receiver) -> None:
    receiver.statuses = [404]
    hook = Webhook(receiver.url, timeout=1, attempts=3)
    assert not await hook.post(notice(), "i-1")
    assert receiver.attempts == 1  # a 404 is not retried
    receiver.attempts, receiver.delay = 0, 2.0
    assert not await Webhook(receiver.url, timeout=0.3, attempts=2).post(notice(), "i-1")
    assert receiver.attempts == 2


def test_webhook_templates_are_checked() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        load_template("{nope")
    with pytest.raises(ValueError, match="unknown placeholder"):
        load_template('{"a": "${typo}"}')
    with pytest.raises(ValueError, match="http"):
        Webhook("ftp://example")
    rendered = render({"${kind}": ["${seconds_left}", "left: ${seconds_left}"]}, notice(60), None)
    assert isinstance(rendered["terminate"][0], int)
    assert rendered["terminate"][1].startswith("left: ")
