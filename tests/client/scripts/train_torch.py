"""The seeds' PyTorch resume example, in preemptwatch's names.

Run it with ``PREEMPTWATCH_RUN_ID`` and ``PREEMPTWATCH_RESUME=allow``: a restart resumes the
run, restores the last checkpoint from the server and logs on from the next epoch.
"""

import os
import time

import torch
import torch.nn as nn
import torch.optim as optim

import preemptwatch

CHECKPOINT_PATH = "./checkpoint.tar"
N_EPOCHS = int(os.environ.get("N_EPOCHS", "100"))
EPOCH_SECONDS = float(os.environ.get("EPOCH_SECONDS", "0"))

torch.manual_seed(0)
X = torch.randn(64, 8, requires_grad=True)
Y = torch.empty(64, 1).random_(2)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())
metric = nn.BCELoss()
optimizer = optim.SGD(model.parameters(), lr=0.01)
epoch = 0
run = preemptwatch.init(project="pytorch-resume-run")
if run.resumed:
    checkpoint = torch.load(run.restore(CHECKPOINT_PATH))
    model.load_state_dict(checkpoint["model_state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    epoch = checkpoint["epoch"] + 1
    print(f"resumed at epoch {epoch}, run step {run.step}", flush=True)

model.train()
while epoch < N_EPOCHS:
    optimizer.zero_grad()
    output = model(X)
    loss = metric(output, Y)
    run.log({"loss": loss.item()}, step=epoch)
    loss.backward()
    optimizer.step()
    torch.save(
        {
            "epoch": epoch,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": loss,
        },
        CHECKPOINT_PATH,
    )
    run.save(CHECKPOINT_PATH)
    print(f"epoch {epoch} saved", flush=True)
    epoch += 1
    time.sleep(EPOCH_SECONDS)
run.finish()
