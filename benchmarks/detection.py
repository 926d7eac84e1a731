"""Detection benchmark: how fast a notice reaches the callback, and what watching costs.

Prints, per source (ec2, gcp, azure, signal):

- notice-to-callback latency, p50 / p99 / max over ``--notices`` notices. Cloud sources run
  against their simulators over real HTTP on loopback; the clock starts just before the
  simulator makes the notice visible (``sim.schedule(kind)`` on the simulator's loop) and
  stops when the callback runs. Each notice arrives at a random phase of the polling cycle.
  For signals the clock starts just before ``os.kill(own pid, SIGTERM)``, with the main
  thread idle (blocked in a wait, as in a GPU-bound step) and busy (a pure-Python loop);
- idle CPU seconds per hour of a default ``start_watcher()`` in a fresh process on a
  machine whose metadata service is the simulator with nothing scheduled (the other
  providers' addresses refuse connections), and the metadata requests it makes per minute;
- RSS added by that watcher (after ``import preemptwatch`` vs. watching), and how long
  the ``start_watcher()`` call itself took (probing goes on in the background);
- ``import preemptwatch`` time in a fresh interpreter (median of ``--imports`` runs).

Targets: EC2 and Azure p99 <= poll interval + 50 ms; GCP p99 <= 25 ms; signals p99 <= 5 ms;
idle CPU <= 0.1 % of one core (3.6 s/h); RSS added <= 20 MB; import <= 150 ms.

    python benchmarks/detection.py              # full run (200 notices each, ~3-4 min)
    python benchmarks/detection.py --quick      # 30 notices, shorter idle window

Each latency run is a subprocess of its own. EC2 and Azure (mostly waiting for their next
poll) run side by side; GCP and signals, which measure milliseconds, run alone afterwards.
Numbers depend on what else the machine runs: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

CLOUDS = ("ec2", "gcp", "azure")
KIND = {"ec2": "terminate", "gcp": "preempt", "azure": "preempt"}
SIMULATOR_CLASS = {"ec2": "EC2Simulator", "gcp": "GCPSimulator", "azure": "AzureSimulator"}
URL_ENV = {p: f"PREEMPTWATCH_{p.upper()}_METADATA_URL" for p in CLOUDS}
MS = 1000.0


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def closed_url() -> str:
    """A loopback URL where nothing listens (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def make_simulator(provider: str) -> Any:
    """A fresh simulator for ``provider``; ImportError when it is not written yet."""
    module = importlib.import_module(f"preemptwatch.simulate.{provider}")
    return getattr(module, SIMULATOR_CLASS[provider])()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.002)


# ------------------------------------------------------------------ latency workers


def cloud_latency(provider: str, notices: int, interval: float | None) -> dict[str, Any]:
    """Latency of ``notices`` notices through a fresh watcher each, in this process."""
    from preemptwatch import Watcher
    from preemptwatch.simulate import SimulatorThread
    from preemptwatch.sources import make_source

    sim = make_simulator(provider)
    thread = SimulatorThread(sim)
    thread.start()
    kind = KIND[provider]
    samples: list[float] = []
    used_interval = 0.0

    def schedule_now() -> float:
        t0 = time.monotonic()
        sim.schedule(kind)
        return t0

    try:
        for _ in range(notices):
            called = threading.Event()
            stamp: list[float] = []

            def callback(notice: Any, stamp: list[float] = stamp, ev: Any = called) -> None:
                stamp.append(time.monotonic())
                ev.set()

            options: dict[str, Any] = {"url": thread.url}
            if interval is not None:
                options["interval"] = interval
            source = make_source(provider, **options)
            used_interval = float(getattr(source, "interval", 0.0))
            watcher = Watcher([source], [callback]).start_in_thread(wait=5)
            try:
                # Steady state first (GCP: both plain GETs done, hanging GETs under way),
                # then a random phase of the polling cycle.
                polls = 2 if provider == "gcp" else 1
                wait_until(
                    lambda w=watcher, n=polls: (
                        provider in w.health  # type: ignore[misc]
                        and w.health[provider].polls >= n
                    )
                )
                phase = 0.05 if provider == "gcp" else used_interval
                time.sleep(random.uniform(0.005, phase))
                t0 = thread.call(schedule_now)
                if not called.wait(used_interval + 10):
                    raise TimeoutError(f"{provider}: no callback within {used_interval + 10}s")
                samples.append(stamp[0] - t0)
            finally:
                watcher.stop()
                thread.call(sim.clear)
    finally:
        thread.stop()
    return {"samples": samples, "interval": used_interval}


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(200))  # pure Python: holds the GIL between switches


def signal_latency(notices: int, busy: bool) -> dict[str, Any]:
    """Latency of SIGTERM sent to this process, through a fresh watcher each time."""
    from preemptwatch import Watcher
    from preemptwatch.sources.signals import SignalSource

    samples: list[float] = []
    for _ in range(notices):
        called = threading.Event()
        stamp: list[float] = []

        def callback(notice: Any, stamp: list[float] = stamp, ev: Any = called) -> None:
            stamp.append(time.monotonic())
            ev.set()

        watcher = Watcher([SignalSource()], [callback]).start_in_thread(wait=5)
        try:
            time.sleep(random.uniform(0.002, 0.01))
            t0 = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            if busy:  # the main thread keeps computing until the callback has run
                while not called.is_set():
                    sum(i * i for i in range(200))
            elif not called.wait(10):
                raise TimeoutError("signal: no callback within 10s")
            samples.append(stamp[0] - t0)
        finally:
            watcher.stop()
    return {"samples": samples, "interval": 0.0}


# ------------------------------------------------------------------ idle cost worker

IDLE_CHILD = """
import json, os, sys, time
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
import preemptwatch
rss0 = rss()
t = time.perf_counter()
w = preemptwatch.start_watcher()
call = time.perf_counter() - t
w.wait_ready(60)  # platform probed
time.sleep(float(sys.argv[1]))  # first polls
names = [s.name for s in w.sources]
print("measuring", flush=True)
c0, t0 = time.process_time(), time.monotonic()
time.sleep(float(sys.argv[2]))
c1, t1 = time.process_time(), time.monotonic()
print(json.dumps({"sources": names, "cpu": c1 - c0, "wall": t1 - t0,
                  "rss_added": rss() - rss0, "call": call}), flush=True)
"""


def idle_costs(providers: list[str], seconds: float) -> dict[str, dict[str, Any]]:
    """Run a default ``start_watcher()`` per provider, each in its own process against
    its own simulator (served from this process, so its CPU is not counted); measure
    CPU, requests and RSS while idle. Children start one after the other (each once the
    previous one is idle, so start-ups do not overlap) and then measure side by side."""
    from preemptwatch.simulate import SimulatorThread

    runs: dict[str, tuple[Any, SimulatorThread | None, subprocess.Popen[str], int]] = {}
    for provider in [*providers, "none"]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREEMPTWATCH_")}
        for p in CLOUDS:
            env[URL_ENV[p]] = closed_url()
        sim: Any = None
        thread: SimulatorThread | None = None
        if provider != "none":
            sim = make_simulator(provider)
            thread = SimulatorThread(sim)
            env[URL_ENV[provider]] = thread.start()
        proc = subprocess.Popen(
            [sys.executable, "-c", IDLE_CHILD, "3", str(seconds)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "measuring":
            raise RuntimeError(f"idle child for {provider} failed")
        before = int(thread.call(lambda s=sim: s.requests)) if thread is not None else 0
        runs[provider] = (sim, thread, proc, before)
    results: dict[str, dict[str, Any]] = {}
    for provider, (sim, thread, proc, before) in runs.items():
        assert proc.stdout is not None
        data = json.loads(proc.stdout.readline())
        after = int(thread.call(lambda s=sim: s.requests)) if thread is not None else 0
        data["requests"] = after - before
        proc.wait(30)
        if thread is not None:
            thread.stop()
        results[provider] = data
    return results


def import_time(runs: int) -> list[float]:
    """``import preemptwatch`` in fresh interpreters, seconds each."""
    code = (
        "import time; t = time.perf_counter(); import preemptwatch; print(time.perf_counter() - t)"
    )
    out = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        out.append(float(done.stdout))
    return out


# ------------------------------------------------------------------------- driver


def run_worker(args: argparse.Namespace) -> None:
    logging.getLogger("preemptwatch").setLevel(logging.ERROR)  # no "preempting" lines
    if args.worker == "signal":
        result = signal_latency(args.notices, busy=args.busy)
    else:
        result = cloud_latency(args.worker, args.notices, args.interval)
    print(json.dumps(result), flush=True)


def spawn_worker(name: str, args: argparse.Namespace, busy: bool = False) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--worker", name, "--notices", str(args.notices)]
    if args.interval is not None:
        cmd += ["--interval", str(args.interval)]
    if busy:
        cmd.append("--busy")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen[str]) -> dict[str, Any] | None:
    out, _ = proc.communicate()
    if proc.returncode != 0 or not out.strip():
        return None
    data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return data


def available(provider: str) -> bool:
    try:
        importlib.import_module(f"preemptwatch.simulate.{provider}")
        importlib.import_module(f"preemptwatch.sources.{provider}")
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notices", type=int, default=200, help="notices per source")
    parser.add_argument(
        "--interval",
        type=float,
        default=None,
        help="poll interval for ec2 and azure (default: each source's own default)",
    )
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle window")
    parser.add_argument("--imports", type=int, default=9, help="fresh-interpreter imports")
    parser.add_argument("--quick", action="store_true", help="30 notices, 10 s idle window")
    parser.add_argument("--sources", help="comma-separated subset of ec2,gcp,azure,signal")
    parser.add_argument("--no-idle", action="store_true", help="skip the idle-cost run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.quick:
        args.notices, args.idle_seconds, args.imports = 30, 10.0, 5

    wanted = args.sources.split(",") if args.sources else [*CLOUDS, "signal"]
    providers = [p for p in CLOUDS if p in wanted and available(p)]
    missing = [p for p in CLOUDS if p in wanted and p not in providers]
    t_start = time.monotonic()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"detection benchmark: {args.notices} notices per source, python "
        f"{sys.version.split()[0]}, load average {load} ({os.cpu_count()} CPUs)"
    )
    if missing:
        print(f"not measured (source or simulator missing): {', '.join(missing)}")

    # EC2 and Azure spend most of their time waiting for the next poll: side by side.
    # GCP and signals measure milliseconds: alone, so the others do not disturb them.
    polled = [p for p in providers if p != "gcp"]
    workers = {p: spawn_worker(p, args) for p in polled}
    latencies = {p: collect(proc) for p, proc in workers.items()}
    if "gcp" in providers:
        latencies["gcp"] = collect(spawn_worker("gcp", args))
    if "signal" in wanted:
        latencies["signal"] = collect(spawn_worker("signal", args))
        latencies["signal, busy main thread"] = collect(spawn_worker("signal", args, busy=True))

    print()
    print(
        f"{'source':26} {'n':>4} {'interval':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  target"
    )
    for name, data in latencies.items():
        if data is None:
            print(f"{name:26} failed")
            continue
        ms = [s * MS for s in data["samples"]]
        interval = data["interval"]
        if name.startswith("signal"):
            target, limit = "p99 <= 5 ms", 5.0
        elif name == "gcp":
            target, limit = "p99 <= 25 ms", 25.0
        else:
            limit = interval * MS + 50
            target = f"p99 <= {limit:.0f} ms"
        p99 = percentile(ms, 99)
        verdict = "ok" if p99 <= limit else "MISSED"
        shown = f"{interval:.2f}s" if interval else "-"
        print(
            f"{name:26} {len(ms):4d} {shown:>9} {percentile(ms, 50):8.1f} {p99:8.1f} "
            f"{max(ms):8.1f}  {target} {verdict}"
        )

    if args.no_idle:
        return
    idle = idle_costs(providers, args.idle_seconds)
    print()
    print(
        f"idle cost of a default start_watcher(), {args.idle_seconds:.0f} s window "
        "(target: CPU <= 3.6 s/h = 0.1 % of a core, RSS added <= 20 MB)"
    )
    print(
        f"{'machine':10} {'sources':22} {'CPU s/h':>8} {'% core':>7} {'req/min':>8} "
        f"{'RSS MB':>7} {'start ms':>9}"
    )
    for provider, data in idle.items():
        per_hour = data["cpu"] / data["wall"] * 3600
        pct = data["cpu"] / data["wall"] * 100
        rpm = data["requests"] / data["wall"] * 60
        ok = "ok" if per_hour <= 3.6 and data["rss_added"] <= 20 * 2**20 else "MISSED"
        label = "off-cloud" if provider == "none" else provider
        print(
            f"{label:10} {','.join(data['sources']):22} {per_hour:8.2f} {pct:7.3f} {rpm:8.1f} "
            f"{data['rss_added'] / 2**20:7.1f} {data['call'] * MS:8.1f}  {ok}"
        )

    times = import_time(args.imports)
    med = statistics.median(times) * MS
    print()
    print(
        f"import preemptwatch: median {med:.1f} ms over {len(times)} fresh interpreters "
        f"(min {min(times) * MS:.1f}, max {max(times) * MS:.1f}); target <= 150 ms "
        f"{'ok' if med <= 150 else 'MISSED'}"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\ntotal {time.monotonic() - t_start:.0f} s; "
        f"load average now {load} ({os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
