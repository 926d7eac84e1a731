"""Fixtures of the SLURM tests: a one-node cluster (session-wide), a run server, job helpers."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import Cluster, Jobs

from preemptwatch.client.api import ApiClient
from preemptwatch.server.testing import ServerProcess

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A running one-node SLURM cluster (munged, slurmctld, slurmd), stopped afterwards."""
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A real ``preemptwatch server`` on SQLite: ``(url, api_key)``."""
    root = tmp_path_factory.mktemp("server")
    with ServerProcess(
        f"sqlite:///{root / 'runs.db'}",
        api_key=secrets.token_hex(16),
        workdir=root,
        args=["--heartbeat-timeout", "60"],
        env={"PREEMPTWATCH_DATA_DIR": str(root)},
    ) as proc:
        yield proc.url, proc.api_key


@pytest.fixture
def api(server: tuple[str, str]) -> Iterator[ApiClient]:
    """A client of the test server."""
    client = ApiClient(server[0], server[1], timeout=5, retry_budget=5)
    yield client
    client.close()


@pytest.fixture
def jobs(cluster: Cluster, server: tuple[str, str], tmp_path: Path) -> Iterator[Jobs]:
    """Job helpers; jobs see the test server and the training script under ``train.py``."""
    (tmp_path / "train.py").write_text((HERE / "slurm_train.py").read_text())
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("SLURM_JOB", "PREEMPTWATCH_"))}
    env.update(PREEMPTWATCH_SERVER=server[0], PREEMPTWATCH_API_KEY=server[1])
    j = Jobs(cluster, tmp_path, env)
    yield j
    j.cancel_all()
