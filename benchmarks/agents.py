"""Sweep agents benchmark: how fast many agents drain a sweep's run queue, and whether any
queued run is ever handed out twice.

For each database (SQLite file; PostgreSQL at 127.0.0.1:5432 in a fresh database, unless
``--sqlite-only``) it starts ``--replicas`` ``preemptwatch server`` processes on one
database, creates a sweep, bulk-loads ``--runs`` preempted runs into its run queue (straight
into the database: seeding is not what is measured), then ``--agents`` agents (threads, each
its own agent ID, spread over the replicas) claim runs over HTTP until the queue is empty.

Prints, per database: claims/s, p50/p99 claim latency, and the number of duplicate claims
(must be 0).

    python benchmarks/agents.py                 # 10,000 queued runs, 32 agents
    python benchmarks/agents.py --runs 2000     # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from preemptwatch.server.testing import ServerProcess

API_KEY = "bench-agents-key-0123456789"
PG = "postgresql://postgres@127.0.0.1:5432"


def start_server(db_url: str, workdir: Path) -> ServerProcess:
    """A ``preemptwatch server`` process on a free loopback port, answering ``/healthz``."""
    from preemptwatch.server.testing import ServerProcess

    env = {"PREEMPTWATCH_DATA_DIR": str(workdir)}
    server = ServerProcess(db_url, api_key=API_KEY, workdir=workdir, env=env)
    try:
        return server.start(timeout=60)
    except RuntimeError as exc:
        raise SystemExit(f"server did not start: {exc}") from exc


async def seed(db_url: str, sweep_id: str, count: int) -> None:
    """Insert ``count`` preempted runs of the sweep and queue them, oldest first."""
    import sqlalchemy as sa

    from preemptwatch.server.db import Database
    from preemptwatch.server.schema import projects, run_queue, runs

    db = Database(db_url)
    now = time.time()
    try:
        async with db.write() as conn:
            project_id = await conn.scalar(
                sa.select(projects.c.id).where(projects.c.name == "default")
            )
            rows = [
                {
                    "project_id": project_id,
                    "id": f"bench-{i:06d}",
                    "state": "preempted",
                    "preempting": True,
                    "step": 10,
                    "incarnation": 1,
                    "config": {"i": i},
                    "meta": {},
                    "sweep_id": sweep_id,
                    "exit_code": 143,
                    "requeues": 1,
                    "created_at": now,
                    "updated_at": now,
                    "heartbeat_at": now,
                    "ended_at": now,
                }
                for i in range(count)
            ]
            for start in range(0, count, 1000):
                await conn.execute(sa.insert(runs), rows[start : start + 1000])
                await conn.execute(
                    sa.insert(run_queue),
                    [
                        {
                            "project_id": project_id,
                            "sweep_id": sweep_id,
                            "run_id": r["id"],
                            "enqueued_at": now,
                        }
                        for r in rows[start : start + 1000]
                    ],
                )
    finally:
        await db.dispose()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench(name: str, db_url: str, args: argparse.Namespace) -> None:
    from preemptwatch.client.api import ApiClient
    from preemptwatch.sweeps.api import SweepApi

    with tempfile.TemporaryDirectory() as tmp:
        servers = [start_server(db_url, Path(tmp)) for _ in range(args.replicas)]
        try:
            api = SweepApi(ApiClient(servers[0].url, API_KEY))
            sweep = api.create(
                {
                    "method": "grid",
                    "program": "train.py",
                    "parameters": {"x": {"values": [1]}},
                }
            )["id"]
            asyncio.run(seed(db_url, sweep, args.runs))
            claims: list[str] = []
            latencies: list[float] = []
            lock = threading.Lock()
            barrier = threading.Barrier(args.agents + 1)

            def agent(i: int) -> None:
                mine = SweepApi(ApiClient(servers[i % len(servers)].url, API_KEY))
                agent_id = mine.register_agent(sweep, host=f"bench{i}")["id"]
                barrier.wait()
                while True:
                    t0 = time.perf_counter()
                    run: dict[str, Any] | None = mine.next_run(sweep, agent_id)["run"]
                    took = time.perf_counter() - t0
                    if run is None or not run["requeued"]:
                        return
                    with lock:
                        claims.append(run["id"])
                        latencies.append(took)

            threads = [threading.Thread(target=agent, args=(i,)) for i in range(args.agents)]
            for t in threads:
                t.start()
            barrier.wait()
            started = time.perf_counter()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            duplicates = sum(n - 1 for n in Counter(claims).values() if n > 1)
            missing = args.runs - len(set(claims))
            print(
                f"{name:<10} {args.runs} queued runs, {args.agents} agents, "
                f"{args.replicas} server(s): {len(claims) / elapsed:8.0f} claims/s, "
                f"claim p50 {statistics.median(latencies) * 1e3:.1f} ms, "
                f"p99 {pct(latencies, 0.99) * 1e3:.1f} ms; "
                f"duplicate claims: {duplicates}, runs never claimed: {missing}",
                flush=True,
            )
        finally:
            for server in servers:
                server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--runs", type=int, default=10_000, help="queued runs (10000)")
    parser.add_argument("--agents", type=int, default=32, help="concurrent agents (32)")
    parser.add_argument("--replicas", type=int, default=1, help="server processes (1)")
    parser.add_argument("--sqlite-only", action="store_true", help="skip PostgreSQL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench("sqlite", f"sqlite:///{Path(tmp) / 'bench.db'}", args)
    if args.sqlite_only:
        return
    name = f"pw_bench_{uuid.uuid4().hex[:8]}"
    psql = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-q", "-c"]
    subprocess.run([*psql, f"CREATE DATABASE {name}"], check=True, capture_output=True)
    try:
        bench("postgres", f"{PG}/{name}", args)
    finally:
        subprocess.run([*psql, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], check=False)


if __name__ == "__main__":
    main()
