"""``preemptwatch sweep create FILE | show ID | list | pause ID | resume ID | cancel ID``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ApiError, ConfigError
from .options import add_server_options


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sweep`` and its actions."""
    parser = sub.add_parser(
        "sweep",
        help="create, show, pause, resume or cancel a sweep",
        description="Manage sweeps on the server. Sweep files use W&B's format (program, "
        "command, method, metric, parameters, run_cap) plus max_requeues and requeue_crashed.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_server_options(common)
    common.add_argument("--json", action="store_true", help="print the sweep as JSON")

    p = actions.add_parser("create", parents=[common], help="create a sweep from a sweep file")
    p.add_argument("file", type=Path, metavar="FILE", help="sweep file (YAML or JSON)")
    p.set_defaults(func=create)
    p = actions.add_parser("list", parents=[common], help="list the project's sweeps")
    p.set_defaults(func=list_sweeps)
    for action, text in (
        ("show", "show a sweep and its counts"),
        ("pause", "stop handing out runs (running runs go on)"),
        ("resume", "hand out runs again"),
        ("cancel", "end the sweep; agents stop their runs"),
    ):
        p = actions.add_parser(action, parents=[common], help=text)
        p.add_argument("id", metavar="SWEEP_ID")
        p.set_defaults(func=show if action == "show" else transition)


def _api(args: argparse.Namespace) -> Any:
    from ..client.api import ApiClient
    from ..sweeps.api import SweepApi

    return SweepApi(ApiClient(args.server, args.api_key, retry_budget=5.0))


def _print(sweep: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(sweep, indent=2, sort_keys=True))
        return
    runs = ", ".join(f"{k} {v}" for k, v in sorted(sweep["runs"].items())) or "none"
    print(f"sweep {sweep['id']}: {sweep['state']} ({sweep['method']})")
    print(f"  suggested {sweep['suggested']}, queued {sweep['queued']}, agents {sweep['agents']}")
    print(f"  runs: {runs}")


def _fail(message: str) -> int:
    print(f"preemptwatch sweep: {message}", file=sys.stderr)
    return 2


def create(args: argparse.Namespace) -> int:
    """Validate the file locally (clear errors, nothing sent), then create the sweep."""
    from ..sweeps.config import SweepConfigError, load_config

    try:
        text = args.file.read_text()
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror or exc}")
    try:
        config = load_config(text)
    except SweepConfigError as exc:
        lines = "\n".join(f"  {path or '(file)'}: {reason}" for path, reason in exc.problems)
        return _fail(f"{args.file} is not a valid sweep file:\n{lines}")
    try:
        json.dumps(config.raw)
    except (TypeError, ValueError) as exc:
        return _fail(f"{args.file} holds a value JSON cannot represent: {exc}")
    for key in config.ignored:
        print(f"warning: {key!r} is accepted for compatibility but has no effect", file=sys.stderr)
    try:
        sweep = _api(args).create(config.raw)
    except (ApiError, ConfigError) as exc:
        return _fail(str(exc))
    if args.json:
        _print(sweep, True)
    else:
        print(f"created sweep {sweep['id']}; run agents with: preemptwatch agent {sweep['id']}")
    return 0


def list_sweeps(args: argparse.Namespace) -> int:
    """Print the project's sweeps."""
    try:
        sweeps = _api(args).list()
    except (ApiError, ConfigError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(sweeps, indent=2, sort_keys=True))
    for sweep in [] if args.json else sweeps:
        print(f"{sweep['id']}  {sweep['state']:<9}  {sweep['method']:<6}  {sweep['suggested']}")
    return 0


def show(args: argparse.Namespace) -> int:
    """Print one sweep."""
    try:
        sweep = _api(args).get(args.id)
    except (ApiError, ConfigError) as exc:
        return _fail(str(exc))
    _print(sweep, args.json)
    return 0


def transition(args: argparse.Namespace) -> int:
    """Pause, resume or cancel."""
    try:
        sweep = _api(args).transition(args.id, args.action)
    except (ApiError, ConfigError) as exc:
        return _fail(str(exc))
    _print(sweep, args.json)
    return 0
