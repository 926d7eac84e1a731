"""A one-node SLURM cluster on loopback, without systemd, for the tests.

munged runs with its own key, socket and logs; slurmctld and slurmd with a ``slurm.conf``
written under a temporary directory (free ports, the real hostname, a preemptible ``low``
partition and a ``high`` one that preempts it). Clients find it through ``SLURM_CONF``.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preemptwatch.server.testing import free_port

#: Seconds a requeued job waits before it may start again (``cred_expire``).
CRED_EXPIRE = 10
#: Seconds between SIGTERM and SIGKILL.
KILL_WAIT = 5
#: Grace time of the preemptible partition: SIGTERM, then this long before the kill.
GRACE_TIME = 10
CLUSTER_NAME = "pwtest"
#: The wrapper, as a job script starts it.
WRAPPER = f"{sys.executable} -m preemptwatch run"


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Cluster:
    """Start with :meth:`start`, stop with :meth:`stop`; ``env`` is what clients need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hostname = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ------------------------------------------------------------------ set-up

    def _write_files(self) -> None:
        munge = self.root / "munge"
        for d in (munge, self.root / "state", self.root / "spool", self.root / "log"):
            d.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        cpus = os.cpu_count() or 1
        r = self.root
        user = getpass.getuser()
        self.conf.write_text(
            f"""\
ClusterName={CLUSTER_NAME}
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
KillWait={KILL_WAIT}
MinJobAge=600
ReturnToService=2
InactiveLimit=0
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=low Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP \
PriorityTier=1 PreemptMode=REQUEUE GraceTime={GRACE_TIME}
PartitionName=high Nodes={self.hostname} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""
        )

    def _spawn(self, *argv: str) -> None:
        log = open(self.root / "log" / f"{Path(argv[0]).name}.out", "ab")  # noqa: SIM115
        self.procs.append(
            subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        )

    def start(self, timeout: float = 40.0) -> None:
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        self._write_files()
        munge = self.root / "munge"
        self._spawn(
            shutil.which("munged") or "/usr/sbin/munged",
            "--foreground",
            "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={munge / 'munge.key'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={munge / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
        )
        _wait_for(self.munge_socket.exists, 10, "munged's socket")
        self._spawn(shutil.which("slurmctld") or "/usr/sbin/slurmctld", "-D", "-i")
        self._spawn(shutil.which("slurmd") or "/usr/sbin/slurmd", "-D", "-N", self.hostname)
        _wait_for(self._node_idle, timeout, "the SLURM node to become idle")

    def _node_idle(self) -> bool:
        self._check_alive()
        out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
        return out.returncode == 0 and out.stdout.strip().startswith("idle")

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{proc.args[0]} exited with {proc.returncode}; see {self.root / 'log'}"
                )

    def stop(self) -> None:
        """Cancel what is left in the queue, then stop the daemons (newest first)."""
        if self.procs and all(p.poll() is None for p in self.procs):
            left = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if left:
                self.run("scancel", *left, check=False)
                deadline = time.monotonic() + 20
                while (
                    time.monotonic() < deadline
                    and self.run("squeue", "-h", check=False).stdout.strip()
                ):
                    time.sleep(0.3)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    # ------------------------------------------------------------------ clients

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, check=check, timeout=timeout
        )


class Jobs:
    """Submits job scripts to the cluster and follows them; cancels them at the end."""

    def __init__(self, cluster: Cluster, root: Path, env: dict[str, str]) -> None:
        self.cluster = cluster
        self.root = root
        self.env = env
        self.ids: list[str] = []

    def sbatch(self, body: str, *options: str, name: str = "job") -> str:
        """Submit ``body`` (a bash script body) with ``options``; returns the job ID."""
        script = self.root / f"{name}.sh"
        script.write_text("#!/bin/bash\n" + textwrap.dedent(body))
        out = subprocess.run(
            ["sbatch", "--parsable", "-D", str(self.root), *options, str(script)],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        job_id = out.stdout.strip().split(";")[0]
        self.ids.append(job_id)
        return job_id

    def show(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` of one job (or array task ``ID_TASK``)."""
        out = self.cluster.run("scontrol", "show", "job", "-o", job_id)
        fields: dict[str, str] = {}
        for key, value in re.findall(r"(?:^|\s)([A-Za-z][\w/:]*)=(\S*)", out.stdout):
            fields.setdefault(key, value)
        return fields

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``predicate`` until it is truthy; fail with ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.3)
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.out"))
        )
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        """Wait until the job is in one of ``states``; returns its fields."""
        return self.wait(
            lambda: (job := self.show(job_id)).get("JobState") in states and job,
            timeout,
            f"job {job_id} to be {'/'.join(states)}",
        )

    def cancel_all(self) -> None:
        for job_id in self.ids:
            self.cluster.run("scancel", job_id, check=False)
        self.wait(
            lambda: not self.cluster.run("squeue", "-h", check=False).stdout.strip(),
            30,
            "the queue to empty",
        )
