"""``preemptwatch server``: the run server; ``preemptwatch server create-key``: a new API key."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..server.config import ServerConfig

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``1048576``, ``512M``, ``10GiB``, ``2g`` (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1048576, 512M or 10G")
    power = " kmgt".index(match.group(2).lower() or " ")
    return int(match.group(1)) * 1024**power


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``server`` (and ``server create-key``)."""
    from ..server import config as cfg

    parser = sub.add_parser(
        "server",
        help="run the run server (heartbeats, exit statuses, reaper, run queues, checkpoints)",
        description="Serve the run API of docs/http-api.md. On an empty database the first "
        "project ('default') and API key are created: the key is PREEMPTWATCH_API_KEY when "
        "set, else a new one printed once. Several replicas may share one PostgreSQL "
        "database.",
        epilog=f"data directory: {cfg.data_dir()} (PREEMPTWATCH_DATA_DIR). S3 storage honours "
        "the usual AWS_* variables, including AWS_ENDPOINT_URL.",
    )
    parser.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB (default: a SQLite file in "
        "the data directory)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port, 0 for any (%(default)s)")
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=cfg.DEFAULT_HEARTBEAT_TIMEOUT,
        metavar="SECONDS",
        help="a running run silent this long is reaped as preempted or crashed (%(default)g)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="checkpoint files: a directory or s3://bucket/prefix (default: 'files' in the "
        "data directory)",
    )
    parser.add_argument(
        "--max-file-size",
        type=parse_size,
        default=cfg.DEFAULT_MAX_FILE_SIZE,
        metavar="BYTES",
        help="largest checkpoint file accepted, e.g. 512M, 10G (default 10G)",
    )
    parser.add_argument(
        "--reap-interval",
        type=float,
        default=cfg.DEFAULT_REAP_INTERVAL,
        metavar="SECONDS",
        help="seconds between reaper passes (%(default)g)",
    )
    cloud = parser.add_argument_group("cloud integrations")
    cloud.add_argument(
        "--sqs-queue",
        metavar="URL",
        help="SQS queue fed by EventBridge with EC2 spot interruption, rebalance and "
        "state-change events: the runs of that instance are marked preempting "
        "(AWS_ENDPOINT_URL and the usual AWS_* variables apply)",
    )
    cloud.add_argument(
        "--gcp-identity-audience",
        metavar="AUDIENCE",
        help="also accept GCE VM identity tokens issued for AUDIENCE (usually this "
        "server's URL) as credentials; the instance ID comes from the token",
    )
    cloud.add_argument(
        "--gcp-identity-certs",
        metavar="URL_OR_FILE",
        help="certificates that sign identity tokens (default: Google's)",
    )
    cloud.add_argument(
        "--gcp-identity-project",
        default="default",
        metavar="NAME",
        help="project that identity-token callers act in (%(default)s)",
    )
    cloud.add_argument(
        "--gcp-identity-allow",
        action="append",
        default=[],
        metavar="GCP_PROJECT_ID",
        help="accept tokens only from VMs of this GCP project (repeatable; default: any)",
    )
    parser.set_defaults(func=run_server)

    actions = parser.add_subparsers(dest="server_action", metavar="ACTION")
    key = actions.add_parser(
        "create-key",
        help="create a project (if new) and an API key for it; prints the key",
        description="Create an API key for PROJECT (created when it does not exist) and "
        "print it. Migrates the database first.",
    )
    key.add_argument("--project", required=True, help="project name (1-64 characters)")
    key.add_argument("--db", dest="key_db", default=None, metavar="URL", help="as for server")
    key.set_defaults(func=create_key)


def _config(args: argparse.Namespace) -> ServerConfig:
    from ..server.config import ServerConfig, default_db_url, default_storage_url

    return ServerConfig(
        db_url=args.db or default_db_url(),
        host=args.host,
        port=args.port,
        heartbeat_timeout=args.heartbeat_timeout,
        storage_url=args.storage or default_storage_url(),
        max_file_size=args.max_file_size,
        reap_interval=args.reap_interval,
        sqs_queue=args.sqs_queue,
        gcp_identity_audience=args.gcp_identity_audience,
        gcp_identity_certs=args.gcp_identity_certs,
        gcp_identity_project=args.gcp_identity_project,
        gcp_identity_projects=tuple(args.gcp_identity_allow),
    )


def run_server(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT."""
    if args.verbose < 2:  # alembic logs at INFO on import and on every start
        logging.getLogger("alembic").setLevel(logging.WARNING)
    from ..server.serve import serve

    try:
        config = _config(args)
        env_key = os.environ.get("PREEMPTWATCH_API_KEY") or None
        return asyncio.run(serve(config, env_key=env_key))
    except ConfigError as exc:
        print(f"preemptwatch server: {exc}", file=sys.stderr)
        return 2


def create_key(args: argparse.Namespace) -> int:
    """Print a new key for the project."""
    from ..server.config import default_db_url
    from ..server.db import Database
    from ..server.store import RunStore

    project = args.project.strip()
    if not 0 < len(project) <= 64:
        print("preemptwatch server create-key: --project must be 1-64 characters", file=sys.stderr)
        return 2
    db_url = args.key_db or args.db or default_db_url()

    async def main() -> str:
        db = Database(db_url, pool_size=1)
        try:
            await db.migrate()
            return await RunStore(db).create_key(project)
        finally:
            await db.dispose()

    try:
        print(asyncio.run(main()), flush=True)
    except ConfigError as exc:
        print(f"preemptwatch server create-key: {exc}", file=sys.stderr)
        return 2
    return 0
