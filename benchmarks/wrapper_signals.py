"""``preemptwatch run`` overhead: start-up cost, and how long a signal sent to the wrapper
takes to reach the wrapped command.

Measures, with a Python child that prints ``time.monotonic()`` (system-wide on Linux) the
moment its handler runs:

- start-up: wall time of ``preemptwatch run -- python -c pass`` minus ``python -c pass``;
- forwarding: SIGUSR2 sent to the wrapper -> the child's handler, ``--signals`` times on
  one wrapper (p50, p99, max);
- first notice: SIGTERM to a fresh wrapper -> the child's handler, ``--runs`` times (this
  one also goes through the watcher's notice path).

    python benchmarks/wrapper_signals.py
    python benchmarks/wrapper_signals.py --signals 1000 --runs 20
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

CHILD = """
import signal, sys, time
def handler(signum, frame):
    sys.stdout.write(f"{signum} {time.monotonic()}\\n"); sys.stdout.flush()
    if signum == signal.SIGTERM:
        sys.exit(0)
signal.signal(signal.SIGUSR2, handler)
signal.signal(signal.SIGTERM, handler)
print("ready", flush=True)
while True:
    time.sleep(1)
"""

WRAPPER = [sys.executable, "-m", "preemptwatch", "run", "--"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PREEMPTWATCH_"))}


def _start() -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*WRAPPER, sys.executable, "-c", CHILD],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the child did not start")
    return proc


def _latency(proc: subprocess.Popen[str], sig: signal.Signals) -> float:
    assert proc.stdout is not None
    sent = time.monotonic()
    proc.send_signal(sig)
    line = proc.stdout.readline().split()
    return (float(line[1]) - sent) * 1000.0


def _summary(name: str, values: list[float]) -> None:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    print(
        f"{name:<24} n={len(values):<5} p50={statistics.median(values):7.2f} ms  "
        f"p99={p99:7.2f} ms  max={values[-1]:7.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, default=300, help="forwarded signals to time")
    parser.add_argument("--runs", type=int, default=10, help="fresh wrappers for SIGTERM")
    args = parser.parse_args()

    plain, wrapped = [], []
    for _ in range(5):
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        plain.append(time.monotonic() - t)
        t = time.monotonic()
        subprocess.run([*WRAPPER, sys.executable, "-c", "pass"], check=True, env=_env())
        wrapped.append(time.monotonic() - t)
    overhead = (statistics.median(wrapped) - statistics.median(plain)) * 1000
    print(f"{'start-up overhead':<24} {overhead:7.1f} ms (median of 5)")

    proc = _start()
    try:
        forwarded = []
        for _ in range(args.signals):
            forwarded.append(_latency(proc, signal.SIGUSR2))
            time.sleep(0.002)  # one at a time: signals of one kind coalesce
    finally:
        proc.kill()
        proc.wait()
    _summary("SIGUSR2 forwarded", forwarded)

    first = []
    for _ in range(args.runs):
        proc = _start()
        first.append(_latency(proc, signal.SIGTERM))
        proc.wait(30)
    _summary("SIGTERM (first notice)", first)


if __name__ == "__main__":
    main()
