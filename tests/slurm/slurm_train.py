"""A training script as a user writes it: resumes from the run's last step, checkpoints
and exits non-zero on a notice. Run under ``preemptwatch run`` in the SLURM tests.

Usage: ``python train.py STEPS SECONDS_PER_STEP [SECONDS_PER_STEP_WHEN_RESUMED]``.
Prints one line per incarnation: ``incarnation=N resumed=B step=S restarts=R run=ID``.
"""

from __future__ import annotations

import os
import sys
import time

import preemptwatch

steps, pause = int(sys.argv[1]), float(sys.argv[2])
watcher = preemptwatch.start_watcher()
run = preemptwatch.init(heartbeat_interval=2.0)
print(
    f"incarnation={run.incarnation} resumed={run.resumed} step={run.step} "
    f"restarts={os.environ.get('SLURM_RESTART_COUNT', '0')} run={run.id}",
    flush=True,
)
if run.resumed and len(sys.argv) > 3:
    pause = float(sys.argv[3])
for step in range(run.step + 1, steps):
    run.log({"loss": 1.0 / (step + 1)}, step=step)
    if watcher.preempting:
        print(f"notice at step {step}: {watcher.notice}", flush=True)
        watcher.wait_handled(10)
        sys.exit(1)  # the run is marked; non-zero after a notice: preempted
    time.sleep(pause)
run.finish(0)
print("finished", flush=True)
