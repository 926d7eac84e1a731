"""The training loop the example sbatch scripts run: resume, train, checkpoint, exit.

Replace the JSON "model" with your own state and checkpoint format.
"""

import json
import sys
from pathlib import Path

import preemptwatch

watcher = preemptwatch.start_watcher()
run = preemptwatch.init(config={"lr": 1e-3})  # run ID and resume=allow come from the wrapper

state = {"weights": 0.0}
if run.resumed:
    state = json.loads(run.restore("checkpoint.json").read_text())

for step in range(run.step + 1, 100_000):
    state["weights"] += 1e-3  # your training step
    run.log({"loss": 1.0 / (step + 1)}, step=step)
    if watcher.preempting:
        Path("checkpoint.json").write_text(json.dumps(state))
        run.save("checkpoint.json")
        sys.exit(1)  # non-zero after a notice: the run is preempted and resumes later
run.finish(0)
