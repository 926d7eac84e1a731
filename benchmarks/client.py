"""Run client benchmark: what the client costs a training loop, against a real server.

Prints:

- ``run.log()`` call time in the training thread, p50 / p99 / max over ``--logs`` calls
  (entries are sent in the background), and how long until the server has them all;
- ``run.log()`` call time while the server is down (entries wait in the queue);
- ``mark_preempting()`` round trip to the server, p50 / p99 over ``--marks`` runs;
- ``init()`` time (create a run, fresh each time), p50 / p99 over the same runs.

A ``preemptwatch server`` subprocess serves a SQLite database in a temporary directory on
a free loopback port (`preemptwatch.server.testing.ServerProcess`).

    python benchmarks/client.py            # 5000 logs, 30 marks
    python benchmarks/client.py --quick    # 1000 logs, 10 marks
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

API_KEY = "bench-key"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(values: list[float]) -> str:
    return (
        f"p50 {statistics.median(values) * 1e3:.3f} ms, p99 {pct(values, 0.99) * 1e3:.3f} ms, "
        f"max {max(values) * 1e3:.3f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=int, default=5000)
    parser.add_argument("--marks", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.logs, args.marks = 1000, 10

    import preemptwatch
    from preemptwatch.server.testing import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.chdir(workdir)
        db_url = f"sqlite:///{workdir / 'bench.db'}"
        server = ServerProcess(db_url, api_key=API_KEY, workdir=workdir)
        os.environ.update(
            PREEMPTWATCH_SERVER=server.url,
            PREEMPTWATCH_API_KEY=API_KEY,
            PREEMPTWATCH_INSTANCE_ID="i-bench",
            PREEMPTWATCH_SPOOL_DIR=str(workdir / "spool"),
        )
        server.start()
        try:
            run = preemptwatch.init(id="bench-logs")
            calls = []
            started = time.perf_counter()
            for i in range(args.logs):
                t0 = time.perf_counter()
                run.log({"loss": 1.0 / (i + 1), "acc": i / args.logs, "lr": 0.001})
                calls.append(time.perf_counter() - t0)
            assert run.flush(600)
            total = time.perf_counter() - started
            print(f"log() call, server up ({args.logs} calls): {ms(calls)}")
            print(
                f"all {args.logs} entries on the server after {total:.2f} s "
                f"({args.logs / total:.0f} entries/s)"
            )

            server.stop()
            down = []
            for i in range(1000):
                t0 = time.perf_counter()
                run.log({"loss": float(i)})
                down.append(time.perf_counter() - t0)
            print(f"log() call, server down (1000 calls): {ms(down)}")
            server.start()
            t0 = time.perf_counter()
            assert run.flush(600)
            print(f"queued entries delivered {time.perf_counter() - t0:.2f} s after restart")
            run.finish(0)

            inits, marks = [], []
            for i in range(args.marks):
                t0 = time.perf_counter()
                run = preemptwatch.init(id=f"bench-mark-{i}")
                inits.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert run.mark_preempting()
                marks.append(time.perf_counter() - t0)
                run.finish(1)
            print(f"init() ({args.marks} runs): {ms(inits)}")
            print(f"mark_preempting() round trip, incl. spool write ({args.marks}): {ms(marks)}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
