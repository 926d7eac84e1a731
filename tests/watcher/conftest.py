"""Fixtures for the watcher tests: saved signal dispositions, a clean `start_watcher`
state, and the environment a subprocess training script runs in."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import preemptwatch.start as start_module
from preemptwatch.simulate import SimulatorThread
from preemptwatch.simulate.ec2 import EC2Simulator

WATCHED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
ENV_KEYS = (
    "PREEMPTWATCH_SOURCES",
    "PREEMPTWATCH_SIGNALS",
    "PREEMPTWATCH_SIDECAR_URL",
    "PREEMPTWATCH_EC2_METADATA_URL",
    "PREEMPTWATCH_GCP_METADATA_URL",
    "PREEMPTWATCH_AZURE_METADATA_URL",
    "PREEMPTWATCH_SERVER",
    "SLURM_JOB_ID",
)


@pytest.fixture(autouse=True)
def _restore_signals() -> Iterator[None]:
    """Whatever a test does to the watched signals, put the dispositions back."""
    saved = {sig: signal.getsignal(sig) for sig in WATCHED}
    yield
    for sig, handler in saved.items():
        if handler is not None:
            signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def _no_current_watcher(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts without a running `start_watcher()` watcher and a clean env."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    yield
    current = start_module._current
    if current is not None:
        current.stop()
    start_module._current = None


def closed_url() -> str:
    """A loopback URL where nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def off_cloud(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every metadata URL of this process refuses connections (tests then point one
    of them at a simulator)."""
    for provider in ("EC2", "GCP", "AZURE"):
        monkeypatch.setenv(f"PREEMPTWATCH_{provider}_METADATA_URL", closed_url())


@pytest.fixture
def script_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a training script run in a subprocess: off any cloud (every
    metadata URL refuses connections), logs to stderr, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS and not k.startswith("WANDB")}
    env.update(
        PREEMPTWATCH_EC2_METADATA_URL=closed_url(),
        PREEMPTWATCH_GCP_METADATA_URL=closed_url(),
        PREEMPTWATCH_AZURE_METADATA_URL=closed_url(),
        PYTHONUNBUFFERED="1",
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture
def ec2() -> Iterator[tuple[EC2Simulator, SimulatorThread]]:
    """An EC2 metadata simulator served on a free loopback port: ``(sim, thread)``."""
    sim = EC2Simulator()
    thread = SimulatorThread(sim)
    thread.start()
    try:
        yield sim, thread
    finally:
        thread.stop()


@pytest.fixture
def run_script(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_script(source, env, on_ready=None)``: write ``source`` (dedented) to
    ``tmp_path/train.py``, run it, call ``on_ready(process)`` once it prints "ready" on
    its first line, and return the finished process (stdout includes that first line)."""

    def run(
        script: str,
        env: dict[str, str],
        on_ready: Callable[[subprocess.Popen[str]], object] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "train.py"
        path.write_text(textwrap.dedent(script))
        proc = subprocess.Popen(
            [sys.executable, str(path)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                proc.kill()
                raise AssertionError(f"script did not get ready: {line}{proc.stderr.read()}")
            if on_ready is not None:
                on_ready(proc)
            out, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return subprocess.CompletedProcess(proc.args, proc.returncode, line + out, err)

    return run
