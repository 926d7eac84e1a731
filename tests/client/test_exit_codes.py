"""How a script's end reaches the server: atexit, sys.exit, uncaught exceptions, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from tests.client.conftest import Server, new_id

from preemptwatch.client.api import ApiClient

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import preemptwatch

    def custom_hook(kind, exc, tb):
        print("custom hook saw", kind.__name__, file=sys.stderr, flush=True)

    run_id, mode = sys.argv[1], sys.argv[2]
    if mode == "raise":
        sys.excepthook = custom_hook  # installed before init: must still be called
    run = preemptwatch.init(id=run_id)
    run.log({"loss": 1.0})
    if mode.startswith("mark"):
        run.mark_preempting()
    if mode in ("exit3", "mark-exit3"):
        sys.exit(3)
    if mode in ("mark-raise-systemexit", "raise-systemexit"):  # the README's pattern
        raise SystemExit(1)
    if mode == "mark-nested-systemexit":
        def train():
            raise SystemExit(1)
        train()
    if mode == "thread-exit":  # ends only the thread, not the process
        import threading
        thread = threading.Thread(target=sys.exit, args=(5,))
        thread.start()
        thread.join()
    if mode == "swallowed-then-ok":  # a SystemExit caught on the way does not count
        try:
            sys.exit(4)
        except SystemExit:
            pass
    if mode in ("raise", "mark-raise"):
        raise RuntimeError("boom")
    if mode in ("sigterm", "mark-sigterm"):
        print("ready", flush=True)
        time.sleep(60)
    if mode == "with":
        with run:
            raise ValueError("inside with")
    """
)


def run_script(server: Server, run_id: str, mode: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREEMPTWATCH_SERVER": server.url, "PREEMPTWATCH_API_KEY": server.api_key}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, run_id, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("mode", "returncode", "state", "exit_code"),
    [
        ("ok", 0, "finished", 0),
        ("exit3", 3, "failed", 3),
        ("mark-exit3", 3, "preempted", 3),
        ("raise", 1, "failed", 1),
        ("mark-raise", 1, "preempted", 1),
        ("mark-ok", 0, "finished", 0),
        # ``raise SystemExit(n)`` hides its code: after a mark it counts as non-zero (the
        # run is requeued, not lost), otherwise as 0.
        ("mark-raise-systemexit", 1, "preempted", 1),
        ("mark-nested-systemexit", 1, "preempted", 1),
        ("raise-systemexit", 1, "finished", 0),
        ("thread-exit", 0, "finished", 0),
        ("swallowed-then-ok", 0, "finished", 0),
        ("with", 1, "failed", 1),
    ],
)
def test_the_run_ends_with_the_process_exit_code(
    server: Server, mode: str, returncode: int, state: str, exit_code: int
) -> None:
    run_id = new_id(mode)
    done = run_script(server, run_id, mode)
    assert done.returncode == returncode, done.stderr
    record = ApiClient(server.url, server.api_key).get_run(run_id)
    assert (record["state"], record["exit_code"], record["step"]) == (state, exit_code, 0)
    if mode == "raise":
        assert "custom hook saw RuntimeError" in done.stderr  # the user's hook was chained


@pytest.mark.parametrize(("mode", "state"), [("mark-sigterm", "preempted"), ("sigterm", "failed")])
def test_sigterm_ends_the_run_and_still_kills_the_process(
    server: Server, mode: str, state: str
) -> None:
    run_id = new_id(mode)
    env = {**os.environ, "PREEMPTWATCH_SERVER": server.url, "PREEMPTWATCH_API_KEY": server.api_key}
    child = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, run_id, mode], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == -signal.SIGTERM  # still dies of SIGTERM, as by default
    finally:
        child.kill()
    record = ApiClient(server.url, server.api_key).get_run(run_id)
    assert (record["state"], record["exit_code"]) == (state, 143)
