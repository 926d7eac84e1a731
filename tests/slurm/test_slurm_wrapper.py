"""`preemptwatch run` outside SLURM: real child processes, real signals, no cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from preemptwatch.client.api import ApiClient
from preemptwatch.wrapper import Wrapper, WrapperConfig, exit_code_of

RUN = [sys.executable, "-m", "preemptwatch", "run"]

#: A child that records the signals it gets, says it is ready, and exits 143 on SIGTERM
#: (or after ``--linger`` seconds with code 0).
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    out = sys.argv[1]
    got = []
    def handler(signum, frame):
        got.append(signal.Signals(signum).name)
        with open(out, "a") as f:
            f.write(signal.Signals(signum).name + "\\n")
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, handler)
    with open(out + ".ready", "w") as f:
        f.write(f"{os.getpid()} {os.getpgrp()} {os.environ.get('PREEMPTWATCH_RUN_ID', '')}")
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        if "SIGTERM" in got:
            sys.exit(143)
        time.sleep(0.01)
    sys.exit(0)
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PREEMPTWATCH_"))}
    env.update(extra)
    return env


def _wait_file(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout}s")


def _start(tmp_path: Path, *options: str, linger: float = 30.0, env: dict[str, str] | None = None):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "signals.txt"
    proc = subprocess.Popen(
        [*RUN, *options, "--", sys.executable, str(script), str(out), str(linger)],
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready = _wait_file(Path(f"{out}.ready"))
    return proc, out, ready


def _finish(proc: subprocess.Popen[str], timeout: float = 20.0) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_exit_code_is_the_childs(tmp_path: Path) -> None:
    for code in (0, 3):
        done = subprocess.run(
            [*RUN, "--", sys.executable, "-c", f"raise SystemExit({code})"],
            env=_env(),
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == code
    killed = subprocess.run(
        [*RUN, "--", sys.executable, "-c", "import os, signal; os.kill(os.getpid(), 9)"],
        env=_env(),
        capture_output=True,
        timeout=30,
    )
    assert killed.returncode == 128 + 9
    assert exit_code_of(-15) == 143 and exit_code_of(2) == 2


def test_missing_command_and_bad_options_are_clear_errors(tmp_path: Path) -> None:
    none = subprocess.run([*RUN], env=_env(), capture_output=True, text=True, timeout=30)
    assert none.returncode != 0 and "no command to run" in none.stderr
    bad = subprocess.run(
        [*RUN, "--signal", "KILL", "--", "true"], env=_env(), capture_output=True, text=True
    )
    assert bad.returncode == 2 and "SIGKILL cannot be caught" in bad.stderr
    missing = subprocess.run(
        [*RUN, "--", str(tmp_path / "no-such-program")], env=_env(), capture_output=True, text=True
    )
    assert missing.returncode == 127 and "cannot run" in missing.stderr
    with pytest.raises(ValueError, match="no command"):
        WrapperConfig(command=[])


def test_sigterm_is_forwarded_to_the_childs_own_process_group(tmp_path: Path) -> None:
    proc, out, ready = _start(tmp_path)
    child_pid, child_pgid, _ = ready.split(" ", 2)
    assert int(child_pgid) == int(child_pid)  # its own group
    assert int(child_pgid) != os.getpgid(proc.pid)
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    assert code == 143
    assert out.read_text().split() == ["SIGTERM"]
    assert "preempting" in err  # the wrapper's watcher took it as a notice


def test_forward_signal_replaces_the_warning_signal(tmp_path: Path) -> None:
    proc, out, _ = _start(tmp_path, "--forward-signal", "USR2", linger=5)
    proc.send_signal(signal.SIGUSR1)
    _wait_file(out)
    proc.send_signal(signal.SIGINT)  # not a notice signal: passed on as it is
    deadline = time.monotonic() + 10
    while len(out.read_text().split()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    code, _ = _finish(proc)
    assert out.read_text().split() == ["SIGUSR2", "SIGINT", "SIGUSR2"]
    assert code == 0  # the child never saw SIGTERM and ended on its own


def test_no_forward_keeps_signals_from_the_child(tmp_path: Path) -> None:
    proc, out, _ = _start(tmp_path, "--no-forward", linger=1.5)
    proc.send_signal(signal.SIGUSR1)
    code, err = _finish(proc)
    assert code == 0
    assert not out.exists()
    assert "preempting" in err  # still noticed by the wrapper


def test_signal_storm_is_handled_without_losing_the_child(tmp_path: Path) -> None:
    proc, out, _ = _start(tmp_path, linger=3)
    for _ in range(50):
        proc.send_signal(signal.SIGUSR2)
    code, _ = _finish(proc)
    assert code == 0
    got = out.read_text().split()
    assert got and set(got) == {"SIGUSR2"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_env(server: tuple[str, str]) -> dict[str, str]:
    return _env(PREEMPTWATCH_SERVER=server[0], PREEMPTWATCH_API_KEY=server[1])


def test_exit_after_a_notice_is_reported_preempted_even_if_the_child_never_reported(
    tmp_path: Path, server: tuple[str, str], api: ApiClient
) -> None:
    proc, _, ready = _start(tmp_path, "--id", "plain/child 1", env=_server_env(server))
    assert ready.split(" ", 2)[2] == "plain-child-1"  # the child got the normalised run ID
    proc.send_signal(signal.SIGTERM)
    code, _ = _finish(proc)
    assert code == 143
    run = api.get_run("plain-child-1")
    assert (run["state"], run["preempting"], run["exit_code"]) == ("preempted", True, 143)


def test_exit_codes_without_a_notice_end_the_run_finished_or_failed(
    tmp_path: Path, server: tuple[str, str], api: ApiClient
) -> None:
    for run_id, code, state in (("wrapped-ok", 0, "finished"), ("wrapped-bad", 3, "failed")):
        done = subprocess.run(
            [*RUN, "--id", run_id, "--", sys.executable, "-c", f"raise SystemExit({code})"],
            env=_server_env(server),
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == code
        run = api.get_run(run_id)
        assert (run["state"], run["exit_code"], run["preempting"]) == (state, code, False)


def test_unreachable_server_never_changes_the_exit_code(tmp_path: Path) -> None:
    env = _env(PREEMPTWATCH_SERVER=f"http://127.0.0.1:{_closed_port()}")
    done = subprocess.run(
        [*RUN, "--", sys.executable, "-c", "raise SystemExit(4)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 4
    assert "could not report the exit" in done.stderr


def test_bad_run_id_is_refused_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    done = subprocess.run(
        [*RUN, "--id", "x" * 65, "--", "touch", str(marker)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and "at most 64" in done.stderr
    assert not marker.exists()


def test_child_environment_inside_a_job() -> None:
    job_env = {
        "SLURM_JOB_ID": "12",
        "SLURM_ARRAY_JOB_ID": "10",
        "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_CLUSTER_NAME": "hpc",
        "SLURM_RESTART_COUNT": "3",
        "PATH": os.environ["PATH"],
    }
    wrapper = Wrapper(WrapperConfig(command=["train"], env=job_env))
    env = wrapper.child_env()
    assert env["PREEMPTWATCH_RUN_ID"] == "hpc-10_2"
    assert env["PREEMPTWATCH_RESUME"] == "allow"
    assert env["PREEMPTWATCH_SLURM_SIGNAL"] == "SIGUSR1"
    assert wrapper.meta()["slurm_restart_count"] == 3
    given = Wrapper(
        WrapperConfig(
            command=["train"],
            env={**job_env, "PREEMPTWATCH_RESUME": "must"},
            run_id="mine",
            forward_signal=signal.SIGUSR2,
        )
    ).child_env()
    assert (given["PREEMPTWATCH_RUN_ID"], given["PREEMPTWATCH_RESUME"]) == ("mine", "must")
    assert given["PREEMPTWATCH_SLURM_SIGNAL"] == "SIGUSR2"
    outside = Wrapper(WrapperConfig(command=["train"], env={"PATH": os.environ["PATH"]}))
    assert "PREEMPTWATCH_RUN_ID" not in outside.child_env()  # no server: nothing to report
