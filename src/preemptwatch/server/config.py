"""Server settings, their defaults, and database URL handling."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

#: Default seconds without a heartbeat before the reaper ends a run.
DEFAULT_HEARTBEAT_TIMEOUT = 300.0
#: Default seconds between reaper passes.
DEFAULT_REAP_INTERVAL = 5.0
#: Default limit of one checkpoint file (10 GiB).
DEFAULT_MAX_FILE_SIZE = 10 * 1024**3
#: Limit of a JSON request body.
DEFAULT_JSON_LIMIT = 1024 * 1024


def data_dir() -> Path:
    """Where the default SQLite file and checkpoint files live.

    ``$PREEMPTWATCH_DATA_DIR``, else ``$XDG_DATA_HOME/preemptwatch``, else
    ``~/.local/share/preemptwatch``.
    """
    explicit = os.environ.get("PREEMPTWATCH_DATA_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "preemptwatch"


def default_db_url() -> str:
    """A SQLite file in the data directory."""
    return f"sqlite:///{data_dir() / 'preemptwatch.db'}"


def default_storage_url() -> str:
    """A ``files`` directory in the data directory."""
    return str(data_dir() / "files")


def async_db_url(url: str) -> str:
    """The SQLAlchemy async URL for ``url``: plain ``postgresql://`` and ``sqlite:///`` URLs
    get the asyncpg and aiosqlite drivers. Other schemes are refused with a clear error."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(
            f"database URL {url!r} has no scheme; use sqlite:///PATH or postgresql://HOST/DB"
        )
    base = scheme.split("+", 1)[0].lower()
    if base in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    if base == "sqlite":
        if not rest.startswith("/"):
            raise ConfigError(
                f"SQLite URL {url!r} needs a path: sqlite:///relative or sqlite:////abs"
            )
        return f"sqlite+aiosqlite://{rest}"
    raise ConfigError(f"unsupported database {scheme!r} in {url!r}: use sqlite or postgresql")


def is_sqlite(url: str) -> bool:
    """Whether ``url`` names a SQLite database."""
    return url.split("://", 1)[0].split("+", 1)[0].lower() == "sqlite"


@dataclass
class ServerConfig:
    """Everything the server needs to run."""

    db_url: str = field(default_factory=default_db_url)
    host: str = "127.0.0.1"
    port: int = 8080
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    storage_url: str = field(default_factory=default_storage_url)
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    json_limit: int = DEFAULT_JSON_LIMIT
    reap_interval: float = DEFAULT_REAP_INTERVAL
    #: SQS queue URL of EC2 events from EventBridge (see ``server/sqs.py``).
    sqs_queue: str | None = None
    #: Accept GCP identity tokens for this audience (see ``server/identity.py``).
    gcp_identity_audience: str | None = None
    #: Certificates for identity tokens: a URL or a file (default: Google's).
    gcp_identity_certs: str | None = None
    #: Project that identity-authenticated callers act in.
    gcp_identity_project: str = "default"
    #: GCP project IDs whose VMs are accepted (empty: any).
    gcp_identity_projects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.heartbeat_timeout <= 0:
            raise ConfigError("--heartbeat-timeout must be a positive number of seconds")
        if self.reap_interval <= 0:
            raise ConfigError("--reap-interval must be a positive number of seconds")
        if self.max_file_size <= 0:
            raise ConfigError("--max-file-size must be a positive number of bytes")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port} is not a TCP port")
        async_db_url(self.db_url)
