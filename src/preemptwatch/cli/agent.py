"""``preemptwatch agent SWEEP_ID [--count N]``: run a sweep's runs on this machine."""

from __future__ import annotations

import argparse
import sys

from ..errors import ApiError, ConfigError
from .options import add_server_options


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``agent``."""
    p = sub.add_parser(
        "agent",
        help="run a sweep's runs here: requeued runs first, then new ones",
        description="Claim runs of a sweep one at a time and run the sweep's program for "
        "each, with PREEMPTWATCH_RUN_ID, PREEMPTWATCH_SWEEP_ID and, for requeued runs, "
        "PREEMPTWATCH_RESUME=allow. SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 are forwarded to "
        "the run; after SIGTERM or SIGINT the agent takes no further runs.",
    )
    p.add_argument("sweep_id", metavar="SWEEP_ID")
    p.add_argument("--count", type=int, metavar="N", help="take at most N runs, then exit")
    add_server_options(p)
    p.add_argument(
        "--poll-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="wait between asks while the sweep is paused or busy (default: %(default)s)",
    )
    p.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="do not watch this machine's cloud metadata for preemption notices (by default "
        "a machine with a notice takes no new runs)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the agent until the sweep ends or ``--count`` runs are done."""
    from ..agent import Agent
    from ..client.api import ApiClient

    if args.count is not None and args.count < 1:
        print("preemptwatch agent: --count must be at least 1", file=sys.stderr)
        return 2
    if args.poll_interval <= 0:
        print("preemptwatch agent: --poll-interval must be positive", file=sys.stderr)
        return 2
    try:
        client = ApiClient(args.server, args.api_key)
        return Agent(
            args.sweep_id,
            client,
            count=args.count,
            poll_interval=args.poll_interval,
            watch=args.watch,
        ).run()
    except (ApiError, ConfigError) as exc:
        print(f"preemptwatch agent: {exc}", file=sys.stderr)
        return 1
