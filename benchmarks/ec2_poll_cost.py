"""Idle CPU and detection latency of the EC2 source with its default settings.

The EC2 simulator runs in a separate process so only the watcher's own CPU is counted.
Prints the watcher's CPU use as a percentage of one core while idle, the metadata
requests it makes per second, and how long a scheduled spot notice takes to be noticed.

    python benchmarks/ec2_poll_cost.py [--seconds 60] [--notices 10]
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

SERVER = """
import asyncio, sys
from preemptwatch.simulate import serve
from preemptwatch.simulate.ec2 import EC2Simulator

async def main() -> None:
    runner = await serve(EC2Simulator().app(), "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def control(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="idle measurement length")
    parser.add_argument("--notices", type=int, default=10, help="latency samples")
    args = parser.parse_args()

    from preemptwatch import Watcher
    from preemptwatch.sources.ec2 import EC2Source

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"

        # Idle: default intervals, nothing scheduled.
        watcher = Watcher([EC2Source(url=url)], mark=False)
        watcher.start_in_thread()
        time.sleep(2.0)  # let every monitor make its first read
        before = control(url, "/_control/state")["requests"]
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(args.seconds)
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - wall0
        requests = control(url, "/_control/state")["requests"] - before
        watcher.stop()
        print(f"idle CPU: {100 * cpu / wall:.4f} % of one core over {wall:.0f} s")
        print(f"metadata requests: {requests / wall:.2f} per second")
        print(f"CPU per metadata request: {1000 * cpu / max(requests, 1):.2f} ms")

        # Latency: a spot notice at a random moment, noticed by a fresh watcher.
        latencies = []
        for _ in range(args.notices):
            control(url, "/_control/clear", {})
            watcher = Watcher([EC2Source(url=url)], mark=False)
            watcher.start_in_thread()
            time.sleep(1.5 + random.random())
            scheduled = time.monotonic()
            control(url, "/_control/schedule", {"kind": "terminate"})
            if not watcher.wait(10) or watcher.notice is None:
                raise SystemExit("the notice was not seen within 10 s")
            latencies.append(watcher.notice.detected_monotonic - scheduled)
            watcher.stop()
        print(
            f"spot notice latency over {len(latencies)} notices: "
            f"median {statistics.median(latencies) * 1000:.0f} ms, "
            f"max {max(latencies) * 1000:.0f} ms"
        )
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
