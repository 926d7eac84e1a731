"""Command-line options that several subcommands share."""

from __future__ import annotations

import argparse
import os


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--server`` and ``--api-key``, defaulting to ``PREEMPTWATCH_SERVER`` and
    ``PREEMPTWATCH_API_KEY``: the options of the commands that talk to the run server."""
    parser.add_argument(
        "--server",
        default=os.environ.get("PREEMPTWATCH_SERVER"),
        help="server URL (default: PREEMPTWATCH_SERVER, else http://127.0.0.1:8080)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("PREEMPTWATCH_API_KEY"),
        help="API key (default: PREEMPTWATCH_API_KEY)",
    )
