"""``preemptwatch runs list`` / ``runs show ID``: the runs on the server."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import ApiError, ConfigError
from .options import add_server_options

STATES = ("running", "finished", "failed", "preempted", "crashed")
COLUMNS = ("ID", "STATE", "STEP", "INC", "REQUEUES", "HOST", "INSTANCE", "SWEEP", "UPDATED")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``runs list`` and ``runs show``."""
    parser = sub.add_parser(
        "runs",
        help="list or show the runs on the server",
        description="List the runs of the API key's project, or show one run.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    add_server_options(common)
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = actions.add_parser("list", parents=[common], help="list runs, newest first")
    p.add_argument("--state", choices=STATES, help="only runs in this state")
    p.add_argument("--sweep", metavar="SWEEP_ID", help="only runs of this sweep")
    p.add_argument("--instance", metavar="INSTANCE_ID", help="only runs on this instance")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default: 100)")
    p.set_defaults(func=list_runs)

    p = actions.add_parser("show", parents=[common], help="show one run, its files and history")
    p.add_argument("id", metavar="ID", help="the run ID")
    p.add_argument(
        "--history", type=int, default=10, metavar="N", help="last N history rows (default: 10)"
    )
    p.set_defaults(func=show_run)


def _client(args: argparse.Namespace) -> Any:
    from ..client.api import ApiClient

    return ApiClient(args.server, args.api_key, retry_budget=5.0)


def _fail(exc: Exception) -> int:
    print(f"preemptwatch runs: {exc}", file=sys.stderr)
    return 1


def list_runs(args: argparse.Namespace) -> int:
    """``runs list``."""
    if args.limit is not None and args.limit <= 0:
        return _fail(ConfigError("--limit must be positive"))
    try:
        with _client(args) as api:
            runs = api.list_runs(
                state=args.state, sweep_id=args.sweep, instance_id=args.instance, limit=args.limit
            )
    except (ApiError, ConfigError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        print("no runs")
        return 0
    rows = [[_cell(run, col) for col in COLUMNS] for run in runs]
    print(format_table(COLUMNS, rows))
    return 0


def show_run(args: argparse.Namespace) -> int:
    """``runs show ID``."""
    try:
        with _client(args) as api:
            run = api.get_run(args.id)
            files = api.list_files(run["id"])
            history = api.history(run["id"])
    except (ApiError, ConfigError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps({"run": run, "files": files, "history": history}, indent=2))
        return 0
    width = max(len(k) for k in run)
    for key, value in run.items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        print(f"{key:<{width}}  {'-' if shown is None else shown}")
    print()
    if files:
        print(
            format_table(
                ("FILE", "SIZE", "SHA256", "UPDATED"),
                [[f["name"], f["size"], str(f["sha256"])[:12], f.get("updated_at")] for f in files],
            )
        )
    else:
        print("no files")
    print()
    tail = history[-args.history :] if args.history > 0 else []
    if tail:
        print(f"history (last {len(tail)} of {len(history)} steps)")
        print(
            format_table(
                ("STEP", "INC", "DATA"),
                [[h["step"], h.get("incarnation"), json.dumps(h["data"])] for h in tail],
            )
        )
    else:
        print("no history")
    return 0


def _cell(run: dict[str, Any], column: str) -> Any:
    if column == "STATE":
        return f"{run['state']}*" if run.get("preempting") else run["state"]
    key = {"INC": "incarnation", "INSTANCE": "instance_id", "SWEEP": "sweep_id"}.get(column)
    value = run.get(key or column.lower().replace("updated", "updated_at"))
    return value


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; None shows as ``-``."""
    cells = [list(headers)] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)
