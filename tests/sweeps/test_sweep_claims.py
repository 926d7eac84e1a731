"""Exactly-once claims: 32 agents against two server replicas sharing one database."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sweep_helpers import start_server_process

from preemptwatch.sweeps.api import SweepApi

AGENTS = 32
QUEUED = 60
RUN_CAP = 100


def test_32_agents_claim_each_run_exactly_once(db_url: str, tmp_path: Path) -> None:
    replicas = [start_server_process(db_url, tmp_path, name=f"replica{i}") for i in range(2)]
    try:
        client = replicas[0].client()
        api = SweepApi(client)
        sweep = api.create(
            {
                "method": "random",
                "program": "train.py",
                "run_cap": RUN_CAP,
                "parameters": {"x": {"min": 0.0, "max": 1.0}},
            }
        )["id"]

        def preempted_run(i: int) -> str:
            run = client.create_run(id=f"queued-{i:03d}", sweep_id=sweep)
            client.mark_preempting(run["id"], run["incarnation"])
            client.finish(run["id"], run["incarnation"], 143)
            return str(run["id"])

        with ThreadPoolExecutor(16) as pool:
            queued = set(pool.map(preempted_run, range(QUEUED)))
        assert api.get(sweep)["queued"] == QUEUED

        barrier = threading.Barrier(AGENTS)
        claims: list[tuple[str, dict[str, Any]]] = []
        lock = threading.Lock()

        def agent(i: int) -> None:
            mine = SweepApi(replicas[i % 2].client())
            agent_id = mine.register_agent(sweep, host=f"agent{i}")["id"]
            barrier.wait(30)
            while True:
                run = mine.next_run(sweep, agent_id)["run"]
                if run is None:
                    return
                with lock:
                    claims.append((agent_id, run))

        with ThreadPoolExecutor(AGENTS) as pool:
            list(pool.map(agent, range(AGENTS)))

        counts = Counter(run["id"] for _, run in claims)
        duplicates = {run_id: n for run_id, n in counts.items() if n > 1}
        assert duplicates == {}
        assert len(claims) == QUEUED + RUN_CAP
        from_queue = [run for _, run in claims if run["requeued"]]
        assert {run["id"] for run in from_queue} == queued
        assert len({agent_id for agent_id, _ in claims}) > 1  # really concurrent
        shown = api.get(sweep)
        assert shown["suggested"] == RUN_CAP and shown["queued"] == 0
    finally:
        for replica in replicas:
            replica.stop()
