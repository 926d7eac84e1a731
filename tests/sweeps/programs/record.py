"""A sweep program that does not use the run client: it records its arguments, its
environment and the signals it receives, then behaves as ``--mode`` says."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(os.environ["SWEEP_TEST_OUT"])
RUN_ID = os.environ["PREEMPTWATCH_RUN_ID"]
params = dict(arg[2:].split("=", 1) for arg in sys.argv[1:] if arg.startswith("--"))
received: list[str] = []


def write() -> None:
    record: dict[str, Any] = {
        "argv": sys.argv[1:],
        "params": params,
        "env": {k: v for k, v in os.environ.items() if k.startswith("PREEMPTWATCH_")},
        "signals": received,
        "pid": os.getpid(),
    }
    tmp = OUT / f".{RUN_ID}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(OUT / f"{RUN_ID}.json")


def on_signal(signum: int, _frame: Any) -> None:
    received.append(signal.Signals(signum).name)
    write()


for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, on_signal)
write()
mode = params.get("mode", "ok")
if mode == "wait":
    deadline = time.monotonic() + 60
    while not {"SIGTERM", "SIGINT"} & set(received) and time.monotonic() < deadline:
        time.sleep(0.02)
    sys.exit(130 if "SIGINT" in received else 143)
if mode.startswith("exit"):
    sys.exit(int(mode[4:]))
