"""End to end on a real one-node SLURM cluster, with a real run server: jobs under
``srun preemptwatch run`` get preempted, warned, requeued, and resume their run."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
from slurm_cluster import CLUSTER_NAME, WRAPPER, Cluster, Jobs

from preemptwatch.client.api import ApiClient
from preemptwatch.errors import ApiNotFound

pytestmark = pytest.mark.slurm

CPUS = str(os.cpu_count() or 1)
TRAIN = f"{sys.executable} train.py"


def _run(api: ApiClient, run_id: str) -> dict[str, Any] | None:
    try:
        return api.get_run(run_id)
    except ApiNotFound:
        return None


def _step(api: ApiClient, run_id: str) -> int:
    run = _run(api, run_id)
    return int(run["step"]) if run else -1


def _in_state(api: ApiClient, run_id: str, state: str) -> dict[str, Any] | None:
    run = _run(api, run_id)
    return run if run is not None and run["state"] == state else None


def _assert_complete_history(api: ApiClient, run_id: str, steps: int, incarnations: int) -> None:
    """Every step logged exactly once, in order, each incarnation after the previous one."""
    history = api.history(run_id)
    assert [row["step"] for row in history] == list(range(steps))
    seen = [row["incarnation"] for row in history]
    assert seen == sorted(seen), "an older incarnation logged after a newer one"
    assert sorted(set(seen)) == list(range(1, incarnations + 1))


def _read(jobs: Jobs, name: str) -> str:
    path = jobs.root / name
    return path.read_text() if path.exists() else ""


def _incarnation_lines(output: str) -> list[dict[str, str]]:
    return [
        dict(part.split("=", 1) for part in line.split())
        for line in output.splitlines()
        if line.startswith("incarnation=")
    ]


def test_preempted_job_is_requeued_and_resumes_the_same_run(
    jobs: Jobs, api: ApiClient, cluster: Cluster
) -> None:
    job = jobs.sbatch(
        f"srun {WRAPPER} -- {TRAIN} 40 0.1\n",
        *("-p", "low", "-c", CPUS, "--requeue", "--open-mode=append", "-o", "low.out"),
        name="low",
    )
    run_id = f"{CLUSTER_NAME}-{job}"
    jobs.wait(lambda: _step(api, run_id) >= 5, 60, "the run to log 5 steps")
    high = jobs.sbatch("sleep 1\n", "-p", "high", "-c", CPUS, "-o", "high.out", name="high")

    marked = jobs.wait(lambda: _in_state(api, run_id, "preempted"), 30, "the run to be preempted")
    assert marked["preempting"] is True and marked["exit_code"] != 0
    run = jobs.wait(lambda: _in_state(api, run_id, "finished"), 90, "the resumed run to finish")

    assert run["incarnation"] == 2 and run["resumed"] is True and run["step"] == 39
    _assert_complete_history(api, run_id, 40, 2)
    first, second = _incarnation_lines((jobs.root / "low.out").read_text())
    assert first["resumed"] == "False" and first["restarts"] == "0"
    assert second["resumed"] == "True" and second["restarts"] == "1"
    assert int(second["step"]) == int(marked["step"])  # resumed from its last step
    assert jobs.wait_state(job, ("COMPLETED",), 30)["Restarts"] == "1"
    assert jobs.wait_state(high, ("COMPLETED",), 30)


def test_time_limit_warning_requeues_the_job_itself(
    jobs: Jobs, api: ApiClient, cluster: Cluster
) -> None:
    job = jobs.sbatch(
        f"srun {WRAPPER} -- {TRAIN} 400 0.1 0.01\n",
        *("--time=1", "--signal=USR1@55", "--requeue", "--open-mode=append", "-o", "tl.out"),
        name="timelimit",
    )
    run_id = f"{CLUSTER_NAME}-{job}"
    requeued = jobs.wait(
        lambda: (j := jobs.show(job)).get("Restarts") == "1" and j, 60, "the job to requeue itself"
    )
    # Give the second incarnation room, so it finishes instead of being warned again.
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    # Requeued, not ended: a requeued job passes through COMPLETING on its way back.
    assert requeued["JobState"] in ("COMPLETING", "PENDING", "REQUEUED", "RUNNING", "CONFIGURING")
    preempted = _run(api, run_id)
    assert preempted is not None and preempted["preempting"] is True

    run = jobs.wait(lambda: _in_state(api, run_id, "finished"), 90, "the resumed run to finish")
    assert run["incarnation"] == 2 and run["resumed"] is True
    _assert_complete_history(api, run_id, 400, 2)
    output = (jobs.root / "tl.out").read_text()
    assert "slurm time-limit notice" in output
    assert f"requeued SLURM job {job}" in output
    assert jobs.wait_state(job, ("COMPLETED",), 30)["Restarts"] == "1"


def test_batch_shell_form_gets_the_warning_and_requeues(
    jobs: Jobs, api: ApiClient, cluster: Cluster
) -> None:
    job = jobs.sbatch(
        f"#SBATCH --signal=B:USR1@30\nexec {WRAPPER} -- {TRAIN} 100 0.1 0.01\n",
        *("--time=5", "--requeue", "--open-mode=append", "-o", "batchform.out"),
        name="batchform",
    )
    run_id = f"{CLUSTER_NAME}-{job}"
    jobs.wait(lambda: _step(api, run_id) >= 3, 60, "the run to log 3 steps")
    # The warning as SLURM sends a B: signal: to the batch shell only (the wrapper).
    cluster.run("scancel", "--batch", "--signal=USR1", job)

    run = jobs.wait(lambda: _in_state(api, run_id, "finished"), 90, "the resumed run to finish")
    assert run["incarnation"] == 2 and run["resumed"] is True
    _assert_complete_history(api, run_id, 100, 2)
    output = (jobs.root / "batchform.out").read_text()
    assert "received SIGUSR1" in output and f"requeued SLURM job {job}" in output
    assert "never see the time-limit warning" not in output
    assert jobs.wait_state(job, ("COMPLETED",), 30)["Restarts"] == "1"


def test_command_that_ignores_the_warning_is_requeued_before_the_limit(
    jobs: Jobs, api: ApiClient, cluster: Cluster
) -> None:
    # A command that knows nothing of preemptwatch and ignores SIGUSR1: on its first run
    # it would sleep past the limit; once requeued it succeeds at once.
    (jobs.root / "ignore_warning.sh").write_text(
        'trap "" USR1\ntouch ready\nif [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 300; fi\n'
    )
    job = jobs.sbatch(
        f"srun {WRAPPER} --requeue-margin 55 -- bash ignore_warning.sh\n",
        *("--time=1", "--requeue", "--open-mode=append", "-o", "stubborn.out"),
        name="stubborn",
    )
    run_id = f"{CLUSTER_NAME}-{job}"
    jobs.wait(lambda: (jobs.root / "ready").exists(), 30, "the command to start")
    cluster.run("scancel", "--signal=USR1", job)  # the warning; the limit is < 60 s away

    run = jobs.wait(lambda: _in_state(api, run_id, "finished"), 90, "the resumed run to finish")
    assert run["incarnation"] == 2 and run["exit_code"] == 0
    output = _read(jobs, "stubborn.out")
    assert "the command still runs: requeueing the job now" in output
    assert "preempt notice term-" not in output  # the requeue's own SIGTERM is no notice
    assert f"run {run_id} ended: preempted" in output  # the first attempt, reported by the wrapper
    assert jobs.wait_state(job, ("COMPLETED",), 30)["Restarts"] == "1"


def test_array_job_requeues_only_the_warned_task(
    jobs: Jobs, api: ApiClient, cluster: Cluster
) -> None:
    job = jobs.sbatch(
        f"srun {WRAPPER} -- {TRAIN} 100 0.1 0.01\n",
        *("--array=0-1", "-c", "1", "--time=5", "--requeue", "--open-mode=append"),
        *("-o", "array_%a.out"),
        name="array",
    )
    runs = [f"{CLUSTER_NAME}-{job}_0", f"{CLUSTER_NAME}-{job}_1"]
    jobs.wait(lambda: all(_step(api, r) >= 3 for r in runs), 60, "both tasks to log 3 steps")
    # The time-limit warning, delivered as SLURM delivers it: to the task's steps.
    cluster.run("scancel", "--signal=USR1", f"{job}_1")

    done = [
        jobs.wait(lambda r=r: _in_state(api, r, "finished"), 90, f"run {r} to finish") for r in runs
    ]
    assert [d["incarnation"] for d in done] == [1, 2]
    _assert_complete_history(api, runs[0], 100, 1)
    _assert_complete_history(api, runs[1], 100, 2)
    assert jobs.wait_state(f"{job}_0", ("COMPLETED",), 30)["Restarts"] == "0"
    assert jobs.wait_state(f"{job}_1", ("COMPLETED",), 30)["Restarts"] == "1"


def test_job_without_requeue_reports_the_failure_and_ends_preempted(
    jobs: Jobs, api: ApiClient, cluster: Cluster
) -> None:
    job = jobs.sbatch(
        f"srun {WRAPPER} -- {TRAIN} 200 0.1\n",
        *("--time=5", "--no-requeue", "-o", "norequeue.out"),
        name="norequeue",
    )
    run_id = f"{CLUSTER_NAME}-{job}"
    jobs.wait(lambda: _step(api, run_id) >= 3, 60, "the run to log 3 steps")
    cluster.run("scancel", "--signal=USR1", job)

    finished = jobs.wait_state(job, ("COMPLETED", "FAILED"), 60)
    assert finished["Restarts"] == "0"
    run = _run(api, run_id)
    assert run is not None and run["state"] == "preempted" and run["preempting"] is True
    output = (jobs.root / "norequeue.out").read_text()
    assert "Requested operation is presently disabled" in output
    assert "submit it with `sbatch --requeue`" in output


def test_wrapper_in_the_batch_script_warns_that_the_signal_cannot_reach_it(
    jobs: Jobs, cluster: Cluster
) -> None:
    job = jobs.sbatch(
        f"#SBATCH --signal=USR1@120\n{WRAPPER} -- true\n",
        "-o",
        "batch.out",
        name="batch",
    )
    jobs.wait_state(job, ("COMPLETED",), 60)
    output = (jobs.root / "batch.out").read_text()
    assert "--signal=USR1@120 is sent to srun steps only" in output
    assert "srun preemptwatch run -- CMD" in output
