"""Instance identity: environment first, then the cloud metadata service, then the host."""

from __future__ import annotations

import socket

import pytest
from tests.conftest import free_port

from preemptwatch import platform
from preemptwatch.simulate import SimulatorThread
from preemptwatch.simulate.ec2 import EC2Simulator


@pytest.fixture
def no_clouds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every metadata service URL points at a port where nothing listens."""
    monkeypatch.delenv("PREEMPTWATCH_INSTANCE_ID")
    for cloud in ("EC2", "GCP", "AZURE"):
        monkeypatch.setenv(f"PREEMPTWATCH_{cloud}_METADATA_URL", f"http://127.0.0.1:{free_port()}")
    platform.reset_cache()


def test_the_environment_wins() -> None:
    assert platform.instance_id() == "i-test"


def test_the_ec2_identity_document(no_clouds: None, monkeypatch: pytest.MonkeyPatch) -> None:
    simulator = EC2Simulator(instance_id="i-0feedfacecafe0001")
    with SimulatorThread(simulator) as url:
        monkeypatch.setenv("PREEMPTWATCH_EC2_METADATA_URL", url)
        assert platform.instance_id() == "i-0feedfacecafe0001"
        served = simulator.requests
        assert platform.instance_id() == "i-0feedfacecafe0001"  # cached: not asked again
        assert simulator.requests == served


def test_the_host_name_when_no_cloud_answers(no_clouds: None) -> None:
    assert platform.instance_id(timeout=0.5) == socket.gethostname()
    assert platform.host_name() == socket.gethostname()
