"""Helpers for code running inside a SLURM job: job and run IDs, the job's end time,
grace times, and requeueing the job from inside itself.

Everything reads the environment SLURM gives a job (``SLURM_JOB_ID``,
``SLURM_ARRAY_JOB_ID``, ``SLURM_ARRAY_TASK_ID``, ``SLURM_CLUSTER_NAME``,
``SLURM_RESTART_COUNT``...) or runs ``scontrol``/``squeue`` with a timeout. Queries return
None when SLURM cannot answer; `requeue` raises `RequeueError` with a message that says
what to do.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from .errors import PreemptwatchError

log = logging.getLogger("preemptwatch.slurm")

#: Default seconds between SIGTERM and SIGKILL when ``scontrol show config`` cannot say.
DEFAULT_KILL_WAIT = 30.0
#: Seconds after our own ``scontrol requeue`` during which a SIGTERM is taken as its echo.
REQUEUE_ECHO_WINDOW = 120.0

Env = Mapping[str, str]

_self_requeued_at: float | None = None


class RequeueError(PreemptwatchError):
    """``scontrol requeue`` failed; the message says why and what to do."""


class RequeueDisabled(RequeueError):
    """The job cannot be requeued (submitted with ``--no-requeue``, or ``JobRequeue=0``)."""


def _env(env: Env | None) -> Env:
    return os.environ if env is None else env


def in_job(env: Env | None = None) -> bool:
    """Whether this process runs inside a SLURM job."""
    return bool(_env(env).get("SLURM_JOB_ID"))


def in_step(env: Env | None = None) -> bool:
    """Whether this process runs in an ``srun`` step (not in the batch script itself)."""
    return bool(_env(env).get("SLURM_STEP_ID"))


def job_id(env: Env | None = None) -> str | None:
    """The array-aware job ID: ``ARRAYJOB_TASK`` for an array task, else ``SLURM_JOB_ID``.

    Requeueing ``SLURM_JOB_ID`` of one array task can requeue the whole array, so every
    command aimed at "this job" uses this form.
    """
    e = _env(env)
    array_job, task = e.get("SLURM_ARRAY_JOB_ID"), e.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return e.get("SLURM_JOB_ID") or None


def run_id(env: Env | None = None) -> str | None:
    """A run ID that survives requeues: ``<cluster>-<array-aware job ID>``, normalised
    as the server does (non-word characters become dashes, at most 64 characters)."""
    e = _env(env)
    jid = job_id(e)
    if jid is None:
        return None
    cluster = e.get("SLURM_CLUSTER_NAME") or "slurm"
    raw = re.sub(r"[^\w]", "-", f"{cluster}-{jid}")
    return raw[-64:]  # keep the job ID, which is what makes it unique


def restart_count(env: Env | None = None) -> int:
    """How many times the job was requeued (``SLURM_RESTART_COUNT``; 0 on the first run)."""
    try:
        return int(_env(env).get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def job_meta(env: Env | None = None) -> dict[str, object]:
    """What a run records about its job: cluster, job ID, restart count, partition, node."""
    e = _env(env)
    meta: dict[str, object] = {
        "slurm_cluster": e.get("SLURM_CLUSTER_NAME"),
        "slurm_job_id": job_id(e),
        "slurm_restart_count": restart_count(e),
        "slurm_partition": e.get("SLURM_JOB_PARTITION"),
        "slurm_node": e.get("SLURMD_NODENAME"),
    }
    return {k: v for k, v in meta.items() if v is not None}


# --------------------------------------------------------------------- queries


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _query(argv: list[str], timeout: float) -> str | None:
    """stdout of a SLURM command, or None (logged) when it fails or times out."""
    try:
        out = _run(argv, timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s failed: %s", " ".join(argv), exc)
        return None
    if out.returncode != 0:
        log.debug("%s failed (%d): %s", " ".join(argv), out.returncode, out.stderr.strip())
        return None
    return out.stdout


def parse_fields(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of ``scontrol show ... -o`` output (first occurrence wins)."""
    fields: dict[str, str] = {}
    for key, value in re.findall(r"(?:^|\s)([A-Za-z][\w/:]*)=(\S*)", text):
        fields.setdefault(key, value)
    return fields


def show_job(jid: str | None = None, timeout: float = 10.0) -> dict[str, str] | None:
    """``scontrol show job -o`` of this job (or ``jid``) as a dict, or None."""
    jid = jid or job_id()
    if jid is None:
        return None
    out = _query(["scontrol", "show", "job", "-o", jid], timeout)
    return parse_fields(out) if out else None


def parse_time(value: str | None) -> datetime | None:
    """A SLURM timestamp (``2024-05-01T12:00:00``, cluster-local time) in UTC, or None
    for ``Unknown``, ``None``, ``N/A`` and the like."""
    if not value or not value[:1].isdigit():
        return None
    try:
        return datetime.fromisoformat(value).astimezone(timezone.utc)
    except ValueError:
        return None


def parse_duration(value: str) -> float | None:
    """``squeue %L``/``TimeLimit`` durations (``[D-]HH:MM:SS``, ``MM:SS``, ``M``) in
    seconds, or None for ``UNLIMITED``, ``INVALID``, ``NOT_SET``."""
    value = value.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not m:
        return None
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        parts = [*parts, 0, 0][:3]  # D-HH[:MM[:SS]]
    elif len(parts) == 1:
        parts = [0, parts[0], 0]  # plain minutes
    elif len(parts) == 2:
        parts = [0, *parts]  # MM:SS
    h, mi, s = parts
    return float(int(days or 0) * 86400 + h * 3600 + mi * 60 + s)


def end_time(jid: str | None = None, timeout: float = 10.0) -> datetime | None:
    """When the job hits its time limit (UTC), or None for no limit or no answer.

    Reads ``EndTime`` from ``scontrol show job``; falls back to now + ``squeue -o %L``.
    """
    jid = jid or job_id()
    if jid is None:
        return None
    job = show_job(jid, timeout)
    if job is not None:
        if job.get("TimeLimit", "").upper() in ("UNLIMITED", "INFINITE"):
            return None
        parsed = parse_time(job.get("EndTime"))
        if parsed is not None:
            return parsed
    out = _query(["squeue", "-h", "-j", jid, "-o", "%L"], timeout)
    left = parse_duration(out) if out else None
    return datetime.now(timezone.utc) + timedelta(seconds=left) if left is not None else None


def kill_wait(timeout: float = 10.0) -> float:
    """``KillWait`` (seconds from SIGTERM to SIGKILL), default 30 s."""
    out = _query(["scontrol", "show", "config"], timeout)
    if out:
        m = re.search(r"^KillWait\s*=\s*(\d+)", out, re.M)
        if m:
            return float(m.group(1))
    return DEFAULT_KILL_WAIT


def grace_time(partition: str | None = None, timeout: float = 10.0) -> float | None:
    """The partition's preemption ``GraceTime`` in seconds (None when unknown)."""
    partition = partition or os.environ.get("SLURM_JOB_PARTITION")
    if not partition:
        return None
    out = _query(["scontrol", "show", "partition", "-o", partition], timeout)
    if not out:
        return None
    value = parse_fields(out).get("GraceTime")
    return float(value) if value and value.isdigit() else None


def was_preempted(job: Mapping[str, str] | None) -> bool:
    """Whether ``show_job`` output says SLURM preempted the job (``PreemptTime`` set)."""
    return job is not None and parse_time(job.get("PreemptTime")) is not None


def already_requeued(job: Mapping[str, str], restarts: int) -> bool:
    """Whether SLURM has put the job back in the queue since this run of it started
    (a batch-only job is requeued at once on preemption)."""
    try:
        more_restarts = int(job.get("Restarts", "0")) > restarts
    except ValueError:
        more_restarts = False
    return more_restarts or job.get("JobState", "").startswith(("PENDING", "REQUEUE"))


def requeueable(job: Mapping[str, str] | None) -> bool:
    """Whether the job may be requeued (``Requeue=1``)."""
    return job is not None and job.get("Requeue") == "1"


def batch_signal(jid: str | None = None, timeout: float = 10.0) -> str | None:
    """The ``--signal`` value of the job's batch script (``#SBATCH --signal=...``), if any."""
    jid = jid or job_id()
    if jid is None:
        return None
    out = _query(["scontrol", "write", "batch_script", jid, "-"], timeout)
    if not out:
        return None
    found = None
    for line in out.splitlines():
        m = re.match(r"#SBATCH\s+.*--signal[=\s]+(\S+)", line)
        if m:
            found = m.group(1)
    return found


def signal_warning(signame: str, env: Env | None = None, timeout: float = 10.0) -> str | None:
    """Why a process here would never see the job's time-limit warning, with the fix;
    None when it will (or when it cannot be told).

    ``--signal=SIG@T`` goes to ``srun`` steps only; ``--signal=B:SIG@T`` to the batch
    shell only, not to its children.
    """
    e = _env(env)
    if not in_job(e) or in_step(e):
        return None
    spec = batch_signal(job_id(e), timeout) or e.get("SBATCH_SIGNAL")
    short = signame.removeprefix("SIG")
    is_shell = e.get("SLURM_TASK_PID") == str(os.getpid())
    fix = (
        f"start it as `srun preemptwatch run -- CMD` (with #SBATCH --signal={short}@120), or "
        f"submit with #SBATCH --signal=B:{short}@120 and `exec preemptwatch run -- CMD`"
    )
    if spec is not None and not spec.startswith("B:"):
        return (
            f"this job's --signal={spec} is sent to srun steps only, and this process runs "
            f"in the batch script: it will never see the time-limit warning; {fix}"
        )
    if spec is not None and not is_shell:
        return (
            f"this job's --signal={spec} reaches only the batch shell itself, not this "
            f"process (a child of it): use `exec preemptwatch run -- CMD` in the script"
        )
    return None


# --------------------------------------------------------------------- requeue


def self_requeued_recently(window: float = REQUEUE_ECHO_WINDOW) -> bool:
    """Whether this process asked SLURM to requeue its job within ``window`` seconds (the
    SIGTERM that follows is that request's echo, not a new notice)."""
    at = _self_requeued_at
    return at is not None and time.monotonic() - at < window


class _Transient(Exception):
    pass


def requeue(jid: str | None = None, timeout: float = 30.0) -> None:
    """``scontrol requeue <array-aware id>``: SLURM kills the job and queues it again
    with the same ID (it starts once ``cred_expire`` has passed).

    Transient failures (slurmctld busy or unreachable) are retried with jittered backoff
    for up to ``timeout`` seconds in all. Raises `RequeueDisabled` for a job that may
    not be requeued and `RequeueError` for any other failure. The SIGTERM that the
    requeue sends this job is recognisable through `self_requeued_recently`.
    """
    global _self_requeued_at
    jid = jid or job_id()
    if jid is None:
        raise RequeueError("not inside a SLURM job (SLURM_JOB_ID is not set): nothing to requeue")
    started = time.monotonic()

    def attempt() -> None:
        global _self_requeued_at
        left = max(1.0, timeout - (time.monotonic() - started))
        _self_requeued_at = time.monotonic()
        try:
            out = _run(["scontrol", "requeue", jid], min(left, 15.0))
        except FileNotFoundError as exc:
            raise RequeueError(f"cannot requeue job {jid}: scontrol not found ({exc})") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _Transient(f"scontrol requeue {jid}: {exc}") from exc
        if out.returncode == 0:
            return
        message = (out.stderr or out.stdout).strip()
        if "presently disabled" in message:
            raise RequeueDisabled(
                f"cannot requeue job {jid}: SLURM says {message!r}. The job was submitted "
                "with --no-requeue (or the cluster sets JobRequeue=0): submit it with "
                "`sbatch --requeue` so it can resume after a preemption or time limit"
            )
        if any(s in message.lower() for s in ("timed out", "unable to contact", "try again")):
            raise _Transient(f"scontrol requeue {jid}: {message}")
        raise RequeueError(f"cannot requeue job {jid}: scontrol says {message!r}")

    try:
        for retry in Retrying(
            retry=retry_if_exception_type(_Transient),
            wait=wait_random_exponential(multiplier=0.5, max=5),
            stop=stop_after_delay(timeout),
            reraise=True,
        ):
            with retry:
                attempt()
    except RequeueError:
        _self_requeued_at = None
        raise
    except _Transient as exc:
        _self_requeued_at = None
        raise RequeueError(f"cannot requeue job {jid} within {timeout:.0f}s: {exc}") from exc
    log.warning("requeued SLURM job %s", jid)
