"""The auto-resume file: ``.preemptwatch/run.json`` in the working directory.

It names the run last started from this directory; a clean finish (exit code 0) removes
it, so ``resume="auto"`` resumes exactly the runs that did not finish.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .spool import write_atomic

log = logging.getLogger("preemptwatch.client")

DIRNAME = ".preemptwatch"
FILENAME = "run.json"


def resume_file(root: Path | None = None) -> Path:
    """The auto-resume file for ``root`` (default: the working directory)."""
    return (root or Path.cwd()) / DIRNAME / FILENAME


def read_last_run(server: str, root: Path | None = None) -> str | None:
    """The ID of the unfinished run last started here against ``server``, if any."""
    path = resume_file(root)
    try:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        run_id = record["id"]
        if record.get("server") != server:
            log.info("preemptwatch: %s names a run of another server; not resuming it", path)
            return None
        return str(run_id)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("preemptwatch: ignoring unreadable %s: %s", path, exc)
        return None


def record_run(server: str, run_id: str, incarnation: int, root: Path | None = None) -> None:
    """Remember ``run_id`` as the run last started here (never raises)."""
    path = resume_file(root)
    try:
        write_atomic(
            path,
            {
                "id": run_id,
                "server": server,
                "incarnation": incarnation,
                "pid": os.getpid(),
                "started_at": time.time(),
            },
        )
    except OSError as exc:
        log.warning("preemptwatch: cannot write %s (resume='auto' will not work): %s", path, exc)


def clear_run(run_id: str, root: Path | None = None) -> None:
    """Forget ``run_id`` after a clean finish, unless a later run took its place."""
    path = resume_file(root)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if json.loads(path.read_text(encoding="utf-8"))["id"] == run_id:
            path.unlink()
