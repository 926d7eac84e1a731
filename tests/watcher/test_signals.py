"""The signal source, in this process (main thread) and in subprocesses for the cases
where the process is meant to die."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import FrameType

import pytest

from preemptwatch import Notice, Watcher
from preemptwatch.sources import make_source
from preemptwatch.sources.signals import SignalSource, parse_signal


def test_signal_is_recorded_first_then_the_python_handler_is_chained() -> None:
    events: list[object] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        events.append(("previous", signum))

    signal.signal(signal.SIGUSR1, previous)
    src = SignalSource(["SIGUSR1"])
    src.prepare(events.append)
    try:
        signal.raise_signal(signal.SIGUSR1)
    finally:
        src.close()
    assert len(events) == 2
    notice, chained = events
    assert isinstance(notice, Notice)
    assert (notice.source, notice.kind, notice.raw) == ("signal", "signal", {"signal": "SIGUSR1"})
    assert chained == ("previous", signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_watcher_gets_signal_notice_and_stop_restores_handlers() -> None:
    def previous(signum: int, frame: FrameType | None) -> None:
        pass

    signal.signal(signal.SIGUSR2, previous)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    got: list[Notice] = []
    w = Watcher([make_source("signal")], [got.append]).start_in_thread()
    try:
        assert all(signal.getsignal(s) != before[s] for s in before)
        signal.raise_signal(signal.SIGUSR2)
        assert w.wait(2) and w.wait_handled(2)
    finally:
        w.stop()
    assert w.notice is not None and w.notice.raw == {"signal": "SIGUSR2"}
    assert got == [w.notice]
    assert {s: signal.getsignal(s) for s in before} == before


def test_repeated_signal_is_one_notice() -> None:
    w = Watcher([SignalSource(["SIGUSR1"])]).start_in_thread()
    try:
        for _ in range(3):
            signal.raise_signal(signal.SIGUSR1)
        assert w.wait_handled(2)
    finally:
        w.stop()
    assert len(w.notices) == 1


def test_ignored_signal_stays_ignored_but_is_recorded() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    got: list[Notice] = []
    src = SignalSource(["SIGUSR2"])
    src.prepare(got.append)
    signal.raise_signal(signal.SIGUSR2)  # the process is still here afterwards
    src.close()
    assert [n.raw for n in got] == [{"signal": "SIGUSR2"}]
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN


def test_off_the_main_thread_nothing_is_installed(caplog: pytest.LogCaptureFixture) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    src = SignalSource(["SIGUSR1"])
    caplog.set_level(logging.WARNING, "preemptwatch")
    recorded: list[Notice] = []
    t = threading.Thread(target=src.prepare, args=(recorded.append,))
    t.start()
    t.join()
    assert not src.installed
    assert signal.getsignal(signal.SIGUSR1) is before
    assert "only be installed from the main thread" in caplog.text


def test_close_off_the_main_thread_leaves_an_inert_handler_passing_signals_on() -> None:
    calls: list[int] = []
    recorded: list[Notice] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)

    signal.signal(signal.SIGUSR1, previous)
    src = SignalSource(["SIGUSR1"])
    src.prepare(recorded.append)
    t = threading.Thread(target=src.close)
    t.start()
    t.join()
    signal.raise_signal(signal.SIGUSR1)
    assert recorded == [] and calls == [signal.SIGUSR1]
    src.close()  # from the main thread it can restore
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_a_handler_installed_over_ours_is_kept_on_close() -> None:
    def theirs(signum: int, frame: FrameType | None) -> None:
        pass

    recorded: list[Notice] = []
    src = SignalSource(["SIGUSR1"])
    src.prepare(recorded.append)
    signal.signal(signal.SIGUSR1, theirs)
    src.close()
    assert signal.getsignal(signal.SIGUSR1) is theirs


def test_bad_signal_names_are_refused_before_anything_is_installed() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        SignalSource(["SIGUSR1", "SIGNOPE"])
    with pytest.raises(ValueError, match="cannot be caught"):
        SignalSource(["KILL"])
    assert signal.getsignal(signal.SIGUSR1) is before
    assert parse_signal("usr2") is signal.SIGUSR2 and parse_signal("15") is signal.SIGTERM


def test_signals_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREEMPTWATCH_SIGNALS", "SIGUSR2, SIGHUP")
    assert SignalSource().signals == (signal.SIGUSR2, signal.SIGHUP)
    monkeypatch.setenv("PREEMPTWATCH_SIGNALS", "SIGBOGUS")
    with pytest.raises(ValueError, match="SIGBOGUS"):
        SignalSource()


def _run(script: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run(
        [sys.executable, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_after_stop_off_the_main_thread_the_default_action_still_applies(
    script_env: dict[str, str], tmp_path: Path
) -> None:
    """A watcher stopped from another thread cannot restore handlers; the inert handler
    restores the default on delivery, so SIGUSR1 still kills as it would have."""
    script = """
        import os, signal, threading, time
        from preemptwatch import Watcher
        from preemptwatch.sources.signals import SignalSource

        w = Watcher([SignalSource(["SIGUSR1"])]).start_in_thread()
        t = threading.Thread(target=w.stop)
        t.start(); t.join()
        assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(5)
        print("survived")
    """
    result = _run(script, script_env, tmp_path)
    assert result.returncode == -signal.SIGUSR1, result.stderr
    assert "survived" not in result.stdout


def test_sigterm_no_longer_kills_at_once(script_env: dict[str, str], tmp_path: Path) -> None:
    script = """
        import os, signal, sys, time
        import preemptwatch

        w = preemptwatch.start_watcher(sources=["signal"])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        print("alive", w.wait(5), w.preempting, w.notice.raw["signal"])
        w.stop()
        os.kill(os.getpid(), signal.SIGTERM)   # restored: the default action again
        time.sleep(5)
        print("survived")
    """
    result = _run(script, script_env, tmp_path)
    assert result.stdout.split() == ["alive", "True", "True", "SIGTERM"], result.stderr
    assert result.returncode == -signal.SIGTERM


def test_a_failing_report_never_reaches_the_interrupted_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(notice: Notice) -> None:
        raise RuntimeError("watcher gone")

    src = SignalSource(["SIGUSR1"])
    src.prepare(broken)
    signal.raise_signal(signal.SIGUSR1)  # would raise here if the handler let it out
    src.close()
    assert "a signal could not be recorded: RuntimeError('watcher gone')" in caplog.text


def test_prepare_again_after_an_inert_close_chains_once() -> None:
    calls: list[int] = []
    recorded: list[Notice] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)

    signal.signal(signal.SIGUSR1, previous)
    src = SignalSource(["SIGUSR1"])
    src.prepare(recorded.append)
    t = threading.Thread(target=src.close)  # off the main thread: left inert
    t.start()
    t.join()
    src.prepare(recorded.append)
    signal.raise_signal(signal.SIGUSR1)
    src.close()
    assert len(recorded) == 1 and calls == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) is previous
