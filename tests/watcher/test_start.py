"""`start_watcher()`: one line, idempotent, quick off-cloud, never raising because of
the environment."""

from __future__ import annotations

import signal
import time

import pytest

import preemptwatch
from preemptwatch import Notice
from preemptwatch.simulate import SimulatorThread
from preemptwatch.simulate.ec2 import EC2Simulator


def test_idempotent_and_adds_new_callbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREEMPTWATCH_SOURCES", "signal")
    first: list[Notice] = []
    second: list[Notice] = []
    w = preemptwatch.start_watcher(first.append)
    assert preemptwatch.start_watcher(second.append) is w
    assert preemptwatch.start_watcher(first.append) is w
    assert preemptwatch.current_watcher() is w
    signal.raise_signal(signal.SIGUSR1)
    assert w.wait_handled(3)
    assert first == second == [w.notice]


def test_off_cloud_returns_at_once_and_watches_signals() -> None:
    """No PREEMPTWATCH_* at all: the real metadata addresses are probed (unreachable
    here) in the background, so the call returns at once and signals still work."""
    t0 = time.monotonic()
    w = preemptwatch.start_watcher()
    assert time.monotonic() - t0 < 0.5
    assert [s.name for s in w.sources] == ["signal"]
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    assert w.wait_ready(3)  # each probe gives up after 1 s at most
    assert time.monotonic() - t0 < 2.5
    assert [s.name for s in w.sources] == ["signal"] and w.running
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 1.0
    assert not w.running and preemptwatch.current_watcher() is None


def test_stop_restores_signal_handlers_and_a_new_call_starts_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PREEMPTWATCH_SOURCES", "signal")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    w = preemptwatch.start_watcher()
    w.stop()
    assert {s: signal.getsignal(s) for s in before} == before
    w2 = preemptwatch.start_watcher()
    assert w2 is not w and w2.running


def test_bad_environment_is_logged_never_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PREEMPTWATCH_SOURCES", "ec3, signal")
    monkeypatch.setenv("PREEMPTWATCH_SIGNALS", "SIGUSR1")
    w = preemptwatch.start_watcher()
    assert [s.name for s in w.sources] == ["signal"]
    assert "unknown source 'ec3'" in caplog.text
    w.stop()
    caplog.clear()

    monkeypatch.setenv("PREEMPTWATCH_SOURCES", "nothing-valid")
    monkeypatch.setenv("PREEMPTWATCH_SIGNALS", "SIGWHAT")
    w = preemptwatch.start_watcher()
    assert w.running and w.sources == []  # the signal source could not be built
    assert "no usable source in PREEMPTWATCH_SOURCES" in caplog.text
    assert "cannot start source signal: unknown signal 'SIGWHAT'" in caplog.text


def test_bad_arguments_raise_and_change_nothing() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match="unknown source"):
        preemptwatch.start_watcher(sources=["signal", "ec3"])
    with pytest.raises(ValueError, match="poll_interval"):
        preemptwatch.start_watcher(poll_interval=0)
    assert preemptwatch.current_watcher() is None
    assert signal.getsignal(signal.SIGTERM) is before


def test_metadata_url_override_is_detected_with_the_given_interval(
    ec2: tuple[EC2Simulator, SimulatorThread], monkeypatch: pytest.MonkeyPatch, off_cloud: None
) -> None:
    sim, thread = ec2
    monkeypatch.setenv("PREEMPTWATCH_EC2_METADATA_URL", thread.url)
    got: list[Notice] = []
    w = preemptwatch.start_watcher(got.append, poll_interval=0.2)
    assert w.wait_ready(5)
    assert [s.name for s in w.sources] == ["signal", "ec2"]
    assert getattr(w.sources[1], "interval", None) == 0.2
    thread.call(sim.schedule, "terminate")
    assert w.wait_handled(5)
    assert got == [w.notice] and w.notice is not None
    assert (w.notice.source, w.notice.kind) == ("ec2", "terminate")


def test_a_hanging_metadata_service_does_not_hold_anything_up(
    ec2: tuple[EC2Simulator, SimulatorThread], monkeypatch: pytest.MonkeyPatch, off_cloud: None
) -> None:
    """The probe answers nothing (a hop-limit hang, a firewall): the call returns at
    once, probing gives up after about a second, and signals are watched meanwhile."""
    sim, thread = ec2
    thread.call(lambda: sim.fault(mode="timeout", count=1000))
    monkeypatch.setenv("PREEMPTWATCH_EC2_METADATA_URL", thread.url)
    t0 = time.monotonic()
    w = preemptwatch.start_watcher()
    assert time.monotonic() - t0 < 0.5
    assert w.wait_ready(3)
    assert time.monotonic() - t0 < 2.5
    assert [s.name for s in w.sources] == ["signal"]
    signal.raise_signal(signal.SIGUSR1)
    assert w.wait(2) and w.notice is not None and w.notice.source == "signal"
