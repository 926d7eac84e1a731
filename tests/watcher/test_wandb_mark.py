"""The W&B mark, with the real wandb client in offline mode: after a simulated EC2 notice
the run's ``.wandb`` file holds a ``preempting`` record."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from preemptwatch import Notice
from preemptwatch.marks import mark_wandb_run
from preemptwatch.simulate import SimulatorThread
from preemptwatch.simulate.ec2 import EC2Simulator

RunScript = Callable[..., "subprocess.CompletedProcess[str]"]

FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version
CHUNK_HEADER = struct.Struct("<IHB")  # crc32 of type byte + data, length, type
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[str]:
    """The type of each `Record` in a ``.wandb`` file, checking every chunk's CRC."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    pos, pending = FILE_HEADER.size, b""
    while pos + CHUNK_HEADER.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER.size:  # block trailer: zero padding
            pos += left_in_block
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left_in_block
            continue
        body = data[pos + CHUNK_HEADER.size : pos + CHUNK_HEADER.size + length]
        assert len(body) == length and zlib.crc32(bytes([kind]) + body) == crc, "corrupt chunk"
        pos += CHUNK_HEADER.size + length
        pending = body if kind in (FULL, FIRST) else pending + body
        if kind in (FULL, LAST):
            record = getattr(pb, "Record")()  # noqa: B009 - generated, no stubs
            record.ParseFromString(pending)
            yield str(record.WhichOneof("record_type"))
            pending = b""


SCRIPT = """
    import sys
    import wandb
    import preemptwatch

    run = wandb.init(project="pw-test", config={"lr": 0.1})
    watcher = preemptwatch.start_watcher(poll_interval=0.1)
    print("ready", flush=True)
    for step in range(100_000):
        run.log({"loss": 1.0 / (step + 1)}, step=step)
        if watcher.wait(0.05):
            break
    watcher.wait_handled(30)
    run.finish(exit_code=1)
    sys.exit(1)
"""


def test_ec2_notice_marks_the_offline_wandb_run_preempting(
    ec2: tuple[EC2Simulator, SimulatorThread],
    script_env: dict[str, str],
    tmp_path: Path,
    run_script: RunScript,
) -> None:
    sim, thread = ec2
    env = dict(
        script_env,
        PREEMPTWATCH_EC2_METADATA_URL=thread.url,
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp_path),
        WANDB_SILENT="true",
    )
    result = run_script(SCRIPT, env, lambda _: thread.call(sim.schedule, "terminate"))
    assert result.returncode == 1, result.stderr
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = list(wandb_records(files[0]))
    assert records.count("preempting") == 1, records
    assert records.index("preempting") > records.index("run")
    assert "exit" in records


def test_unmarked_offline_run_has_no_preempting_record(
    script_env: dict[str, str], tmp_path: Path, run_script: RunScript
) -> None:
    """The reader tells the two apart: a run that ends without a notice is not marked."""
    script = """
        import wandb
        import preemptwatch

        run = wandb.init(project="pw-test")
        watcher = preemptwatch.start_watcher(sources=["signal"])
        print("ready", flush=True)
        run.log({"loss": 1.0}, step=0)
        run.finish(exit_code=0)
    """
    env = dict(script_env, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    result = run_script(script, env)
    assert result.returncode == 0, result.stderr
    (file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(file))
    assert "run" in records and "exit" in records and "preempting" not in records


def test_no_wandb_run_means_no_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    notice = Notice("ec2", "terminate")
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    assert mark_wandb_run(notice) is False
