"""The run client: `init`, `Run`, `mark_preempting`, and the lower-level `ApiClient`."""

from __future__ import annotations

from .api import ApiClient
from .run import Run, active_run, init, mark_preempting
from .settings import Settings, normalize_run_id
from .spool import deliver_spool

__all__ = [
    "ApiClient",
    "Run",
    "Settings",
    "active_run",
    "deliver_spool",
    "init",
    "mark_preempting",
    "normalize_run_id",
]
