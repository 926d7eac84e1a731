"""The SLURM helpers and `SlurmSource`: pure parsing, then against a real job's times."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
from slurm_cluster import GRACE_TIME, KILL_WAIT, Cluster, Jobs

from preemptwatch import slurm
from preemptwatch.notice import utcnow
from preemptwatch.sources.signals import SignalSource
from preemptwatch.sources.slurm import SlurmSource
from preemptwatch.watcher import Watcher

ARRAY_ENV = {
    "SLURM_JOB_ID": "107",
    "SLURM_ARRAY_JOB_ID": "100",
    "SLURM_ARRAY_TASK_ID": "7",
    "SLURM_CLUSTER_NAME": "big.cluster",
    "SLURM_RESTART_COUNT": "2",
    "SLURM_JOB_PARTITION": "low",
}


def test_job_and_run_ids_are_array_aware_and_stable() -> None:
    assert slurm.job_id(ARRAY_ENV) == "100_7"
    assert slurm.run_id(ARRAY_ENV) == "big-cluster-100_7"
    plain = {"SLURM_JOB_ID": "42", "SLURM_CLUSTER_NAME": "c"}
    assert slurm.job_id(plain) == "42" and slurm.run_id(plain) == "c-42"
    assert slurm.restart_count(ARRAY_ENV) == 2 and slurm.restart_count(plain) == 0
    assert slurm.run_id({}) is None and not slurm.in_job({})
    meta = slurm.job_meta(ARRAY_ENV)
    assert meta["slurm_restart_count"] == 2 and meta["slurm_job_id"] == "100_7"


def test_durations_and_times_parse_like_squeue_prints_them() -> None:
    assert slurm.parse_duration("1-02:03:04") == 93784
    assert slurm.parse_duration("02:03:04") == 7384
    assert slurm.parse_duration("3:04") == 184
    assert slurm.parse_duration("5") == 300
    assert slurm.parse_duration("1-02") == 93600
    for never in ("UNLIMITED", "INVALID", "NOT_SET", ""):
        assert slurm.parse_duration(never) is None
    assert slurm.parse_time("Unknown") is None and slurm.parse_time("None") is None
    assert slurm.parse_time("2024-05-01T12:00:00") is not None


def test_requeue_outside_a_job_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(slurm.RequeueError, match="not inside a SLURM job"):
        slurm.requeue()
    with pytest.raises(ValueError, match="cannot be SIGTERM"):
        SlurmSource("TERM")


def _fake_job(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        if key != "SLURM_CONF":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_notices_for_warning_preemption_time_limit_and_own_requeue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_job(monkeypatch, ARRAY_ENV)
    source = SlurmSource()
    now = utcnow()
    source.end_time, source.grace_time, source.kill_wait = now + timedelta(minutes=2), 45.0, 7.0

    warning = source.notice_for(signal.SIGUSR1, now)
    assert warning is not None and warning.kind == "time-limit"
    assert warning.deadline == source.end_time and warning.raw["job_id"] == "100_7"

    term = source.notice_for(signal.SIGTERM, now)
    assert term is not None and term.kind == "preempt"
    assert term.deadline == now + timedelta(seconds=45)

    at_end = source.notice_for(signal.SIGTERM, source.end_time)
    assert at_end is not None and at_end.kind == "time-limit"
    assert at_end.deadline == source.end_time + timedelta(seconds=7)
    assert term.id == at_end.id  # the second SIGTERM of one job is the same event

    monkeypatch.setattr(slurm, "_self_requeued_at", time.monotonic())
    assert source.notice_for(signal.SIGTERM, now) is None  # our own requeue's echo
    assert source.notice_for(signal.SIGUSR1, now) is not None


@pytest.mark.slurm
def test_real_job_times_and_signals_through_the_watcher(
    cluster: Cluster, jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = jobs.sbatch("sleep 300\n", "-p", "low", "--time=3", "-o", "/dev/null", name="sleeper")
    fields = jobs.wait_state(job, ("RUNNING",), 30)
    _fake_job(monkeypatch, {"SLURM_JOB_ID": job, "SLURM_JOB_PARTITION": "low"})
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}

    generic, source = SignalSource(), SlurmSource()
    # As start_watcher() orders them inside a job: the generic source first.
    watcher = Watcher([generic, source], mark=False)
    watcher.start_in_thread()
    try:
        deadline = time.monotonic() + 20
        while source.end_time is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source.end_time == slurm.parse_time(fields["EndTime"])
        assert source.grace_time == GRACE_TIME and source.kill_wait == KILL_WAIT
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watcher.wait(5)
        deadline = time.monotonic() + 5
        while len(watcher.notices) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        watcher.stop()
    first = watcher.notice
    assert first is not None and (first.source, first.kind) == ("slurm", "time-limit")
    assert first.deadline == source.end_time
    assert [n.source for n in watcher.notices] == ["slurm", "signal"]  # chained, one handler
    # Ours is gone; what it replaced is back (the generic source's, now inert).
    assert all(signal.getsignal(s) != source._handle for s in before)
    for sig, handler in before.items():  # leave the test process as it was
        signal.signal(sig, handler)


@pytest.mark.slurm
def test_requeue_of_an_unknown_job_fails_clearly(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    with pytest.raises(slurm.RequeueError, match="Invalid job id"):
        slurm.requeue("999999", timeout=10)
    assert not slurm.self_requeued_recently()
