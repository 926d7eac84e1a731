"""The seeds' PyTorch example: checkpointed with ``run.save``, marked and killed, then
started again from an empty directory with ``resume="allow"``: it restores the checkpoint
and logs on from the next step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.client.conftest import Server, new_id

from preemptwatch.client.api import ApiClient

SCRIPT = Path(__file__).parent / "scripts" / "train_torch.py"


def test_marked_and_killed_then_resumed_from_an_empty_directory(
    server: Server, tmp_path: Path
) -> None:
    run_id = new_id("torch")
    env = {
        **os.environ,
        "PREEMPTWATCH_SERVER": server.url,
        "PREEMPTWATCH_API_KEY": server.api_key,
        "PREEMPTWATCH_RUN_ID": run_id,
        "PREEMPTWATCH_RESUME": "allow",
        "PREEMPTWATCH_INSTANCE_ID": f"i-{run_id}",
        "N_EPOCHS": "8",
    }
    api = ApiClient(server.url, server.api_key)
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()

    first = subprocess.Popen(
        [sys.executable, str(SCRIPT)],
        cwd=first_dir,
        env={**env, "EPOCH_SECONDS": "30"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "epoch 0 saved"
        # The machine is going away: the run is marked (as the sidecar does, by instance),
        # then the process is killed.
        assert api.mark_instance_preempting(f"i-{run_id}") == [run_id]
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == -signal.SIGTERM
    finally:
        first.kill()
    record = api.get_run(run_id)
    assert (record["state"], record["step"]) == ("preempted", 0)

    second = subprocess.run(
        [sys.executable, str(SCRIPT)],
        cwd=second_dir,
        env={**env, "EPOCH_SECONDS": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 0, second.stderr
    lines = second.stdout.splitlines()
    assert lines[0] == "resumed at epoch 1, run step 0"
    assert lines[1:] == [f"epoch {e} saved" for e in range(1, 8)]
    record = api.get_run(run_id)
    assert (record["state"], record["incarnation"], record["step"]) == ("finished", 2, 7)
    history = api.history(run_id)
    assert [(h["step"], h["incarnation"]) for h in history] == [(0, 1)] + [
        (e, 2) for e in range(1, 8)
    ]
