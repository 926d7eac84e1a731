"""Client settings: arguments first, then ``PREEMPTWATCH_*`` environment variables."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

#: Where ``preemptwatch server`` listens when started without flags.
DEFAULT_SERVER = "http://127.0.0.1:8080"
#: Resume modes the server knows; ``auto`` is resolved by the client.
SERVER_RESUME_MODES = ("never", "allow", "must")
RESUME_MODES = (*SERVER_RESUME_MODES, "auto")
MAX_RUN_ID = 64


def normalize_run_id(run_id: str) -> str:
    """A run ID as the server stores it: every non-word character becomes a dash.

    Raises `ConfigError` for an empty ID or one longer than 64 characters.
    """
    if not isinstance(run_id, str):
        raise ConfigError(f"a run ID must be a string, not {type(run_id).__name__}")
    normalized = re.sub(r"[^\w]", "-", run_id)
    if not normalized:
        raise ConfigError("a run ID must not be empty")
    if len(normalized) > MAX_RUN_ID:
        raise ConfigError(
            f"run ID {run_id!r} is {len(normalized)} characters long; at most {MAX_RUN_ID}"
        )
    return normalized


def normalize_resume(resume: str | bool | None) -> str:
    """``True`` -> ``auto``, ``None``/``False`` -> ``never``; anything unknown is refused."""
    if resume is None or resume is False:
        return "never"
    if resume is True:
        return "auto"
    value = str(resume).strip().lower()
    if value in ("true", "1", "yes"):
        return "auto"
    if value in ("false", "0", "no", ""):
        return "never"
    if value not in RESUME_MODES:
        raise ConfigError(
            f"resume must be one of {', '.join(RESUME_MODES)} or True, not {resume!r}"
        )
    return value


def normalize_server(server: str) -> str:
    """The server's base URL without a trailing slash; refuses anything but http(s)."""
    server = server.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", server):
        raise ConfigError(f"server URL must look like http://host:port, not {server!r}")
    return server


def state_dir() -> Path:
    """The user's state directory for preemptwatch (``$XDG_STATE_HOME/preemptwatch``)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "preemptwatch"


def spool_dir() -> Path:
    """Where marks that could not be delivered wait: ``PREEMPTWATCH_SPOOL_DIR`` or the
    ``spool`` folder of the state directory."""
    env = os.environ.get("PREEMPTWATCH_SPOOL_DIR")
    return Path(env) if env else state_dir() / "spool"


@dataclass(frozen=True)
class Settings:
    """What `init` works with once arguments and environment are merged and checked."""

    server: str
    api_key: str | None
    project: str | None
    run_id: str | None
    resume: str
    sweep_id: str | None

    @classmethod
    def resolve(
        cls,
        *,
        server: str | None = None,
        api_key: str | None = None,
        project: str | None = None,
        run_id: str | None = None,
        resume: str | bool | None = None,
        sweep_id: str | None = None,
    ) -> Settings:
        """Merge arguments with ``PREEMPTWATCH_*`` variables; raise `ConfigError` on bad input."""
        env = os.environ
        if resume is None:
            resume = env.get("PREEMPTWATCH_RESUME") or None
        raw_id = run_id if run_id is not None else env.get("PREEMPTWATCH_RUN_ID") or None
        return cls(
            server=normalize_server(server or env.get("PREEMPTWATCH_SERVER") or DEFAULT_SERVER),
            api_key=api_key or env.get("PREEMPTWATCH_API_KEY") or None,
            project=project or env.get("PREEMPTWATCH_PROJECT") or None,
            run_id=normalize_run_id(raw_id) if raw_id is not None else None,
            resume=normalize_resume(resume),
            sweep_id=sweep_id or env.get("PREEMPTWATCH_SWEEP_ID") or None,
        )
