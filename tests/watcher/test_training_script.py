"""A plain synchronous training script, run as a subprocess: it adds one line, gets a
notice (from the EC2 simulator over HTTP, or a SIGTERM), checkpoints in its callback and
exits non-zero so the run is requeued."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from preemptwatch.simulate import SimulatorThread
from preemptwatch.simulate.ec2 import EC2Simulator

RunScript = Callable[..., "subprocess.CompletedProcess[str]"]

TRAIN = """
    import json, sys, time
    import preemptwatch

    state = {"step": 0}

    def checkpoint(notice):
        with open("checkpoint.json", "w") as f:
            json.dump({"step": state["step"], "source": notice.source, "kind": notice.kind,
                       "seconds_left": notice.seconds_left()}, f)

    watcher = preemptwatch.start_watcher(checkpoint, poll_interval=0.1)
    print("ready", flush=True)
    for step in range(1, 100_000):
        state["step"] = step
        time.sleep(0.01)  # one training step
        if watcher.preempting:
            watcher.wait_handled(60)
            print("preempted at step", step, flush=True)
            sys.exit(1)
    print("finished", flush=True)
"""


def test_ec2_notice_checkpoints_and_exits_nonzero(
    ec2: tuple[EC2Simulator, SimulatorThread],
    script_env: dict[str, str],
    tmp_path: Path,
    run_script: RunScript,
) -> None:
    sim, thread = ec2
    env = dict(script_env, PREEMPTWATCH_EC2_METADATA_URL=thread.url)
    result = run_script(TRAIN, env, lambda _: thread.call(sim.schedule, "terminate", 0.3))
    assert result.returncode == 1, result.stderr
    assert "preempted at step" in result.stdout
    saved = json.loads((tmp_path / "checkpoint.json").read_text())
    assert saved["source"] == "ec2" and saved["kind"] == "terminate"
    assert saved["step"] > 1
    assert 100 < saved["seconds_left"] <= 120  # EC2 gives two minutes


def test_sigterm_checkpoints_and_exits_nonzero(
    script_env: dict[str, str], tmp_path: Path, run_script: RunScript
) -> None:
    result = run_script(TRAIN, script_env, lambda proc: proc.send_signal(signal.SIGTERM))
    assert result.returncode == 1, result.stderr  # not -SIGTERM: it was not killed at once
    saved = json.loads((tmp_path / "checkpoint.json").read_text())
    assert saved == {
        "step": saved["step"],
        "source": "signal",
        "kind": "signal",
        "seconds_left": None,
    }


def test_a_failing_callback_never_crashes_the_script(
    script_env: dict[str, str], tmp_path: Path, run_script: RunScript
) -> None:
    script = """
        import sys, time
        import preemptwatch

        def checkpoint(notice):
            raise OSError("disk full")

        watcher = preemptwatch.start_watcher(checkpoint)
        print("ready", flush=True)
        while not watcher.preempting:
            time.sleep(0.01)
        print("handled", watcher.wait_handled(10), flush=True)
        sys.exit(1)
    """
    result = run_script(script, script_env, lambda proc: proc.send_signal(signal.SIGUSR1))
    assert result.returncode == 1
    assert result.stdout.split() == ["ready", "handled", "True"]
    assert "OSError: disk full" in result.stderr
