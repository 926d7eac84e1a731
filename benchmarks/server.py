"""Run-server benchmarks; prints its figures.

1. Heartbeats/s and latency (p50, p99) under concurrent clients against a real
   ``preemptwatch server`` process on SQLite and on PostgreSQL, next to a bare aiohttp
   handler (reads the JSON body, answers JSON) measured in the same run.
2. The time of one reaper pass over 1,000,000 running runs of which 10,000 are stale
   (bulk-loaded with generate_series on PostgreSQL, a recursive CTE on SQLite).

    python benchmarks/server.py                       # everything
    python benchmarks/server.py --only heartbeat --engines sqlite --duration 5
    python benchmarks/server.py --only reaper --runs 1000000 --stale 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import sqlalchemy as sa
from aiohttp import web

from preemptwatch.server.db import Database
from preemptwatch.server.store import RunStore
from preemptwatch.server.testing import ServerProcess, free_port

KEY = "bench-key"
PG_ADMIN = os.environ.get("PREEMPTWATCH_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")


# -- databases ------------------------------------------------------------------------------


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def fresh_pg() -> str:
    """Create a throw-away database; returns its URL."""
    name = f"pw_bench_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_admin(f"CREATE DATABASE {name}"))
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"


def drop_pg(url: str) -> None:
    asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)"))


# -- heartbeat load -------------------------------------------------------------------------


def _bare_app() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        assert isinstance(body["incarnation"], int)
        return web.json_response({"state": "running", "preempting": False})

    app = web.Application()
    app.router.add_post("/api/v1/runs/{run_id}/heartbeat", handler)
    return app


def _serve_bare(port: int) -> None:
    web.run_app(_bare_app(), host="127.0.0.1", port=port, access_log=None, print=None)


async def _load(
    url: str, run_ids: list[str], clients: int, duration: float, warmup: float
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = json.dumps({"incarnation": 1}).encode()
    latencies: list[float] = []
    errors = 0
    total = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + duration

        async def worker(i: int) -> None:
            nonlocal errors, total
            path = f"{url}/api/v1/runs/{run_ids[i % len(run_ids)]}/heartbeat"
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                async with session.post(path, data=body, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
                t1 = time.perf_counter()
                total += ok
                if t0 >= measure_from:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return {"latencies": latencies, "errors": errors, "duration": duration, "total": total}


def _load_proc(
    url: str, run_ids: list[str], clients: int, duration: float, warmup: float, out: Any
) -> None:
    out.put(asyncio.run(_load(url, run_ids, clients, duration, warmup)))


def measure(url: str, run_ids: list[str], args: argparse.Namespace, pid: int) -> dict[str, float]:
    """Drive ``url`` from ``args.load_procs`` processes; heartbeats/s, latency in ms, and
    the server process's CPU time per heartbeat (robust when the machine is shared)."""
    server = psutil.Process(pid)
    cpu0 = sum(server.cpu_times()[:2])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    per = max(1, args.clients // args.load_procs)
    procs = [
        ctx.Process(target=_load_proc, args=(url, run_ids, per, args.duration, args.warmup, out))
        for _ in range(args.load_procs)
    ]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    cpu = sum(server.cpu_times()[:2]) - cpu0
    latencies = sorted(x for r in results for x in r["latencies"])
    errors = sum(r["errors"] for r in results)
    if not latencies:
        raise RuntimeError(f"no successful heartbeat against {url} ({errors} errors)")
    return {
        "rate": len(latencies) / args.duration,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "errors": errors,
        "cpu_us": cpu / max(1, sum(r["total"] for r in results)) * 1e6,
    }


def create_runs(url: str, n: int) -> list[str]:
    """``n`` running runs to heartbeat."""

    async def main() -> list[str]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            ids = []
            for i in range(n):
                async with s.post(f"{url}/api/v1/runs", json={"id": f"hb{i}"}) as resp:
                    assert resp.status == 201, await resp.text()
                    ids.append(f"hb{i}")
            return ids

    return asyncio.run(main())


def bench_heartbeats(args: argparse.Namespace) -> None:
    print(
        f"== heartbeats: {args.clients} concurrent clients in {args.load_procs} process(es), "
        f"{args.duration:g} s after {args.warmup:g} s warm-up, {args.runs_hb} runs"
    )
    rows: list[tuple[str, dict[str, float]]] = []
    port = free_port()
    bare = mp.get_context("spawn").Process(target=_serve_bare, args=(port,))
    bare.start()
    try:
        time.sleep(1.5)
        run_ids = [f"r{i}" for i in range(args.runs_hb)]
        url = f"http://127.0.0.1:{port}"
        assert bare.pid is not None
        rows.append(("bare aiohttp handler", measure(url, run_ids, args, bare.pid)))
    finally:
        bare.terminate()
        bare.join()
    for engine in args.engines:
        tmp = Path(tempfile.mkdtemp(prefix="pw-bench-"))
        db_url = fresh_pg() if engine == "postgres" else f"sqlite:///{tmp / 'bench.db'}"
        server = ServerProcess(db_url, api_key=KEY, workdir=tmp)
        try:
            server.start()
            run_ids = create_runs(server.url, args.runs_hb)
            assert server.process is not None
            result = measure(server.url, run_ids, args, server.process.pid)
            rows.append((f"preemptwatch server, {engine}", result))
        finally:
            server.stop()
            if engine == "postgres":
                drop_pg(db_url)
    base = rows[0][1]["rate"]
    base_cpu = rows[0][1]["cpu_us"]
    print(
        f"{'target':31} {'hb/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'vs bare':>8} {'errors':>6} "
        f"{'server CPU us/hb':>17} {'CPU vs bare':>12}"
    )
    for name, r in rows:
        print(
            f"{name:31} {r['rate']:7.0f} {r['p50']:7.2f} {r['p99']:7.2f} "
            f"{r['rate'] / base:8.0%} {r['errors']:6.0f} {r['cpu_us']:17.0f} "
            f"{base_cpu / r['cpu_us']:12.0%}"
        )
    print(
        "server CPU us/hb: CPU time of the server process per heartbeat (PostgreSQL's own "
        "CPU not included); 1e6 / it is the rate one free core sustains."
    )


# -- reaper pass ----------------------------------------------------------------------------

_COLUMNS = (
    "project_id, id, state, preempting, step, incarnation, config, meta, requeues, "
    "created_at, updated_at, heartbeat_at, sweep_id"
)


def _bulk_sql(dialect: str, runs: int, stale: int, now: float) -> str:
    """One INSERT ... SELECT of ``runs`` running runs; the first ``stale`` are silent for an
    hour (every other one marked preempting, every fourth in a sweep)."""
    old = now - 3600
    if dialect == "postgresql":
        return (
            f"INSERT INTO runs ({_COLUMNS}) SELECT 1, 'run' || g, 'running', g % 2 = 0, 10, 1, "
            "'{}', '{}', 0, "
            f"{old}, {old}, CASE WHEN g <= {stale} THEN {old} ELSE {now} END, "
            "CASE WHEN g % 4 = 0 THEN 'sweep1' END "
            f"FROM generate_series(1, {runs}) AS g"
        )
    return (
        f"INSERT INTO runs ({_COLUMNS}) WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL "
        f"SELECT x + 1 FROM g WHERE x < {runs}) SELECT 1, 'run' || x, 'running', x % 2 = 0, "
        f"10, 1, '{{}}', '{{}}', 0, {old}, {old}, CASE WHEN x <= {stale} THEN {old} "
        f"ELSE {now} END, CASE WHEN x % 4 = 0 THEN 'sweep1' END FROM g"
    )


async def _reaper_once(db_url: str, runs: int, stale: int) -> dict[str, float]:
    db = Database(db_url)
    store = RunStore(db, heartbeat_timeout=300)
    try:
        await db.migrate(lambda conn: store.bootstrap(conn, KEY))
        now = time.time()
        t0 = time.perf_counter()
        async with db.write() as conn:
            await conn.execute(sa.text(_bulk_sql(db.dialect, runs, stale, now)))
        load = time.perf_counter() - t0
        async with db.write() as conn:
            await conn.exec_driver_sql("ANALYZE")
        t0 = time.perf_counter()
        result = await store.reap(now)
        elapsed = time.perf_counter() - t0
        assert result.reaped == stale, result.reaped
        t0 = time.perf_counter()
        again = await store.reap(now)
        idle = time.perf_counter() - t0
        assert again.reaped == 0
        return {
            "load": load,
            "pass": elapsed,
            "idle": idle,
            "queued": len(result.queued),
        }
    finally:
        await db.dispose()


def bench_reaper(args: argparse.Namespace) -> None:
    print(f"== reaper: one pass over {args.runs:,} running runs, {args.stale:,} of them stale")
    print(
        f"{'engine':10} {'bulk load s':>12} {'reap pass s':>12} {'queued':>8} {'idle pass s':>12}"
    )
    for engine in args.engines:
        tmp = Path(tempfile.mkdtemp(prefix="pw-bench-"))
        db_url = fresh_pg() if engine == "postgres" else f"sqlite:///{tmp / 'reap.db'}"
        try:
            r = asyncio.run(_reaper_once(db_url, args.runs, args.stale))
        finally:
            if engine == "postgres":
                drop_pg(db_url)
        print(
            f"{engine:10} {r['load']:12.2f} {r['pass']:12.3f} {r['queued']:8.0f} {r['idle']:12.4f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["heartbeat", "reaper"], default=None)
    parser.add_argument("--engines", type=lambda s: s.split(","), default=["sqlite", "postgres"])
    parser.add_argument("--clients", type=int, default=64, help="concurrent heartbeat clients")
    parser.add_argument("--load-procs", type=int, default=1, help="load generator processes")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not measured")
    parser.add_argument("--runs-hb", type=int, default=200, help="runs that heartbeat")
    parser.add_argument("--runs", type=int, default=1_000_000, help="runs for the reaper")
    parser.add_argument("--stale", type=int, default=10_000, help="stale runs among them")
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    if args.only in (None, "heartbeat"):
        bench_heartbeats(args)
    if args.only in (None, "reaper"):
        bench_reaper(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
