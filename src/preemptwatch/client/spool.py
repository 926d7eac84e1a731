"""The spool: marks that could not reach the server wait here on disk.

One JSON file per mark in ``PREEMPTWATCH_SPOOL_DIR`` (default: the ``spool`` folder of the
user's state directory), written atomically. The next client that starts, or the sidecar,
calls `deliver_spool`; a mark is removed once the server took it, or refused it for good.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ApiError, ApiUnavailable
from ..notice import Notice
from .api import ApiClient, notice_body
from .settings import normalize_server, spool_dir

log = logging.getLogger("preemptwatch.client")

#: Spooled run marks are named ``run-mark-*.json`` (the sidecar keeps its own ``mark-*``).
PREFIX = "run-mark-"


def write_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to ``path`` so that readers see either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(data, out, default=str)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def spool_mark(
    server: str,
    run_id: str,
    incarnation: int,
    notice: Notice | Mapping[str, Any] | None = None,
    directory: Path | None = None,
) -> Path:
    """Write one undelivered mark to the spool; returns its file."""
    directory = directory or spool_dir()
    name = f"{PREFIX}{time.time_ns()}-{run_id}-{incarnation}.json"
    path = directory / name
    write_atomic(
        path,
        {
            "server": normalize_server(server),
            "run_id": run_id,
            "incarnation": incarnation,
            "notice": notice_body(notice),
            "spooled_at": time.time(),
        },
    )
    return path


def spooled_marks(directory: Path | None = None) -> list[Path]:
    """The spooled mark files, oldest first."""
    directory = directory or spool_dir()
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"{PREFIX}*.json"))


def deliver_spool(
    api_client: ApiClient,
    directory: Path | None = None,
    *,
    run_id: str | None = None,
    budget: float = 5.0,
) -> int:
    """Deliver the spooled marks meant for ``api_client``'s server; returns how many the
    server took. Marks it refuses for good (run unknown, resumed since) are removed with a
    warning; when it cannot be reached the rest stay for later. ``run_id`` limits delivery
    to one run's marks. Unreadable files are left alone and reported."""
    delivered = 0
    for path in spooled_marks(directory):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            server = normalize_server(str(record["server"]))
            mark_run = str(record["run_id"])
            incarnation = int(record["incarnation"])
            notice = record.get("notice")
        except FileNotFoundError:
            continue  # another process delivered it meanwhile
        except (ValueError, KeyError, TypeError) as exc:
            log.error("preemptwatch: cannot read spooled mark %s (left in place): %s", path, exc)
            continue
        if server != api_client.server or (run_id is not None and mark_run != run_id):
            continue
        try:
            api_client.mark_preempting(mark_run, incarnation, notice, budget=budget)
        except ApiUnavailable as exc:
            log.warning("preemptwatch: spooled marks wait for the server: %s", exc)
            return delivered
        except ApiError as exc:
            log.warning(
                "preemptwatch: server refused spooled mark of run %s (incarnation %d), "
                "dropping it: %s",
                mark_run,
                incarnation,
                exc,
            )
            path.unlink(missing_ok=True)
            continue
        path.unlink(missing_ok=True)
        delivered += 1
        log.info("preemptwatch: delivered spooled mark of run %s", mark_run)
    return delivered
