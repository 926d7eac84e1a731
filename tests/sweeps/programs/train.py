"""A short training for the end-to-end sweep test: resumes from the run's last step,
watches EC2 (the simulator of its "machine"), and on a notice marks the run preempting and
exits non-zero. Every step it logs is flushed to the server, then recorded locally."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import preemptwatch

STEPS = int(os.environ.get("SWEEP_TEST_STEPS", "15"))
EVENTS = Path(os.environ["SWEEP_TEST_OUT"]) / f"{os.getpid()}.jsonl"


def record(**event: Any) -> None:
    with open(EVENTS, "a") as out:
        out.write(json.dumps({**event, "pid": os.getpid(), "agent": os.getppid()}) + "\n")


params = {k: float(v) for k, v in (a[2:].split("=", 1) for a in sys.argv[1:])}
run = preemptwatch.init(config=params, heartbeat_interval=0.3)
watcher = preemptwatch.start_watcher(sources=["ec2"], poll_interval=0.1)
record(
    event="start",
    run=run.id,
    resumed=run.resumed,
    step=run.step,
    incarnation=run.incarnation,
    params=params,
)
for step in range(run.step + 1, STEPS):
    if watcher.preempting:
        run.mark_preempting(watcher.notice)
        record(event="preempted", run=run.id, step=step, incarnation=run.incarnation)
        run.finish(1)
        sys.exit(1)
    time.sleep(0.05)
    run.log({"loss": (params["a"] - 3) ** 2 + params["b"] / (step + 1)}, step=step)
    run.flush()
    record(event="log", run=run.id, step=step, incarnation=run.incarnation)
run.finish(0)
record(event="finished", run=run.id, incarnation=run.incarnation)
